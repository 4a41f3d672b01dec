"""pLSTM layers on N-D grids (1D sequences, 2D images, 3D volumes), built on mdlrnn.ops.grid_scan."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ..ops.grid import grid_scan_orientations

__all__ = ["PLSTM", "PLSTM1D", "PLSTM2D", "PLSTM3D"]

MODES = ("P", "D")


class PLSTM(nn.Module):
    r"""pLSTM on an N-D grid, scanned from all 2^N corners; input and output (B, *S, dim), channels last.

    Per head, q/k/v and a direct weight D are shared by the orientations; each orientation has its own
    Source, Transition and Mark gates, computed from the input at every position. The orientations' outputs
    are summed, the direct term added once, each head RMS-normalised, and projected back to `dim`:

    .. math::
        C_a[p] = \sum_b T[p,a,b] C_b[p - e_b] + S[p,a] k_p v_p^\top, \quad
        y_p = W_o \operatorname{RMSNorm}\Big(\sum_{o} q_p^\top \sum_b M[p,b] C^{(o)}_b[p - e_b]
              + D (q_p \cdot k_p) v_p\Big) / \sqrt{d_k}

    Modes, both stable by construction (no state can grow along a path):

    * ``"P"`` (propagation): the state arriving on any edge is split over the outgoing axes,
      T[p, a, b] = tau_p o_p[a] with tau = tanh(5 z) and o = softmax over axes, so
      sum_a |T[p, a, b]| = |tau| <= 1; S[p, a] = s_p o_p[a]; M[p, b] = m_p.
    * ``"D"`` (diffusion): the line graph pruned to a multitree: a state moving along axis b may turn
      onto axes a <= b only (T[p, a, b] = 0 for a > b), |T| = |tanh(5 z)| <= 1, so every source reaches
      every target by exactly one path; S and M one sigmoid gate per axis.

    Sources and marks are sigmoid gates (bias -4), D a sigmoid of a learned constant per head (-6), and
    transitions start near one (bias 1).

    Args:
        dim: channels in and out.
        num_heads: heads; head_dim defaults to dim // num_heads.
        ndim: number of spatial axes N.
        mode: "P" or "D".
        backend: grid_scan backend.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ndim: int = 2,
        mode: str = "P",
        head_dim: int | None = None,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"PLSTM: `mode` must be 'P' or 'D', got {mode!r}")
        if head_dim is None and dim % num_heads:
            raise ValueError(f"PLSTM: `dim` ({dim}) must be divisible by `num_heads` ({num_heads}) or give head_dim")
        dd = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.ndim, self.mode, self.backend = dim, num_heads, ndim, mode, backend
        self.head_dim = head_dim or dim // num_heads
        self.orientations = tuple(itertools.product((False, True), repeat=ndim))  # flip each axis or not
        inner = num_heads * self.head_dim
        self.gates_per_head = (3 + ndim) if mode == "P" else (2 * ndim + ndim * (ndim + 1) // 2)
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias, **dd)
        self.gate = nn.Linear(dim, len(self.orientations) * num_heads * self.gates_per_head, **dd)
        self.direct = nn.Parameter(torch.empty(num_heads, **dd))
        self.norm = nn.RMSNorm(self.head_dim, eps=1e-6, **dd)
        self.proj = nn.Linear(inner, dim, bias=proj_bias, **dd)
        self.reset_parameters()

    def _gate_bias(self) -> torch.Tensor:
        """Initial gate biases per head, in the column order that scan_gates reads."""
        n = self.ndim
        if self.mode == "P":  # source, mark, transition, split logits
            bias = [-4.0, -4.0, 1.0] + [0.0] * n
        else:  # sources, marks, transitions a <= b
            bias = [-4.0] * (2 * n) + [1.0] * (n * (n + 1) // 2)
        return torch.tensor(bias).repeat(len(self.orientations) * self.num_heads)

    def reset_parameters(self) -> None:
        for linear in (self.qkv, self.proj, self.gate):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        with torch.no_grad():
            self.gate.bias.copy_(self._gate_bias())
        nn.init.constant_(self.direct, -6.0)
        self.norm.reset_parameters()

    def scan_gates(self, x: torch.Tensor):
        """Source (B, *S, O, H, N), transition (B, *S, O, H, N, N) and mark (B, *S, O, H, N) of every
        orientation O, in the grid_scan convention of the orientation's own (flipped) frame."""
        n = self.ndim
        z = self.gate(x).unflatten(-1, (len(self.orientations), self.num_heads, self.gates_per_head))
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # gates in at least float32
        if self.mode == "P":
            s, m, t, split = z[..., 0:1].sigmoid(), z[..., 1:2].sigmoid(), torch.tanh(5 * z[..., 2:3]), z[..., 3:]
            share = split.softmax(-1)  # o[a]: how a state divides over the outgoing axes
            source = s * share
            transition = (t * share)[..., :, None].expand(*share.shape, n)
            mark = m.expand(*share.shape)
        else:
            source, mark = z[..., :n].sigmoid(), z[..., n : 2 * n].sigmoid()
            rows, cols = torch.triu_indices(n, n, device=x.device)  # a <= b
            transition = z.new_zeros(*z.shape[:-1], n, n)
            transition[..., rows, cols] = torch.tanh(5 * z[..., 2 * n :])
        return source, transition, mark

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim + 2 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{type(self).__name__}: `x` must have shape (B, *S, dim) with {self.ndim} spatial axes and "
                f"dim={self.dim}, got {tuple(x.shape)}"
            )
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        # all orientations in one scan (on the 2D kernels without flipped copies)
        y = grid_scan_orientations(q, k, v, *self.scan_gates(x), self.orientations, backend=self.backend)
        direct = torch.sigmoid(self.direct)[:, None] * (q * k).sum(-1, keepdim=True) * v
        y = y + direct * self.head_dim**-0.5
        return self.proj(self.norm(y.to(self.norm.weight.dtype)).flatten(-2))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, ndim={self.ndim}, mode={self.mode!r}"


class PLSTM1D(PLSTM):
    """pLSTM on sequences (B, L, dim): both directions."""

    def __init__(self, dim: int, num_heads: int, mode: str = "P", **kwargs):
        super().__init__(dim, num_heads, ndim=1, mode=mode, **kwargs)


class PLSTM2D(PLSTM):
    """pLSTM on images (B, X, Y, dim): four orientations."""

    def __init__(self, dim: int, num_heads: int, mode: str = "P", **kwargs):
        super().__init__(dim, num_heads, ndim=2, mode=mode, **kwargs)


class PLSTM3D(PLSTM):
    """pLSTM on volumes (B, X, Y, Z, dim): eight orientations."""

    def __init__(self, dim: int, num_heads: int, mode: str = "P", **kwargs):
        super().__init__(dim, num_heads, ndim=3, mode=mode, **kwargs)
