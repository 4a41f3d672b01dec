"""LightNet layers: LightNetAttention (with MD-LRPE) and the multi-dimensional Toeplitz encoding MD-TPE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import grid_scan, lightnet_scan
from ..ops._tables import device_tables
from ..ops.grid.plan import coordinates

__all__ = ["LightNetAttention", "MDTPE", "md_lrpe_angles"]


@device_tables
def md_lrpe_angles(sizes: tuple[int, ...], head_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """Angles (*S, 1, head_dim) of the multi-dimensional LRPE: the channels are split into one block per
    axis, and channel j of block a turns with position p_a at frequency base^(-j / block)."""
    ndim = len(sizes)
    block = math.ceil(head_dim / ndim)
    # on the target device: torch.compile traces this, and inductor (torch 2.11) failed on CPU arithmetic feeding
    # CUDA ops ("Unhandled FakeTensor Device Propagation"); float64, so that every device rounds alike
    channel = torch.arange(head_dim, device=device)
    frequency = base ** (-(channel % block).double() / block)
    position = coordinates(sizes).to(device, torch.float64)[:, channel // block]  # (P, head_dim): p_a per channel's axis
    return (position * frequency).float().reshape(*sizes, 1, head_dim)


class LightNetAttention(nn.Module):
    r"""LightNet attention on (B, *S, dim): a softmax per key channel over each position's region.

    .. math::
        y_p = W_o\big(\operatorname{RMSNorm}(\sum_c q_p[c] \sum_{s \in R(p)} \operatorname{softmax}_s(k_s[c])
              \cos(\theta_p[c] - \theta_s[c]) v_s) \odot \sigma(W_2 W_1 x_p)\big)

    with q = SiLU(W_q x), key logits k = W_k x, v = W_v x, per-head RMSNorm, a sigmoid output gate from a
    low-rank projection, and MD-LRPE angles theta (one block of channels per axis; off with md_lrpe=False).
    R(p) is every position ("global"), the row-major prefix ("causal") or the box s <= p ("box").
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mode: str = "global",
        md_lrpe: bool = True,
        head_dim: int | None = None,
        gate_rank: int | None = None,
        qkv_bias: bool = False,
        lrpe_base: float = 10000.0,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if head_dim is None and dim % num_heads:
            raise ValueError(f"LightNetAttention: `dim` ({dim}) must be divisible by `num_heads` ({num_heads})")
        dd = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.mode, self.md_lrpe, self.backend = dim, num_heads, mode, md_lrpe, backend
        self.head_dim = head_dim or dim // num_heads
        self.lrpe_base = lrpe_base
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias, **dd)
        rank = gate_rank or max(num_heads, dim // 16)
        self.gate = nn.Sequential(nn.Linear(dim, rank, bias=False, **dd), nn.Linear(rank, inner, **dd))
        self.norm = nn.RMSNorm(self.head_dim, eps=1e-6, **dd)
        self.proj = nn.Linear(inner, dim, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.qkv, self.proj, *self.gate):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        self.norm.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[-1] != self.dim:
            raise ValueError(f"LightNetAttention: `x` must have shape (B, *S, dim={self.dim}), got {tuple(x.shape)}")
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        angles = None
        if self.md_lrpe:
            angles = md_lrpe_angles(tuple(x.shape[1:-1]), self.head_dim, self.lrpe_base, x.device)
        y = lightnet_scan(F.silu(q), k, v, mode=self.mode, angles=angles, backend=self.backend)
        y = self.norm(y.to(self.norm.weight.dtype)).flatten(-2) * torch.sigmoid(self.gate(x))
        return self.proj(y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, mode={self.mode!r}, md_lrpe={self.md_lrpe}"


class MDTPE(nn.Module):
    r"""Multi-dimensional Toeplitz positional encoding on (B, *S, dim): along every axis a causal Toeplitz
    kernel with a learned decay per head, summed over the axes,

    .. math::
        y_p = W_o \operatorname{RMSNorm}\Big(\sum_a \sum_{i \le p_a} \lambda_{a,h}^{p_a - i}
              (q_p \cdot k_{p - (p_a - i) e_a}) v_{p - (p_a - i) e_a}\Big) / \sqrt{d_k}

    Each axis is a 1D grid_scan (S = 1, T = M = lambda, D = 1) with the other axes folded into the batch.
    """

    def __init__(self, dim: int, num_heads: int, ndim: int = 2, head_dim: int | None = None, backend="auto",
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dim, self.num_heads, self.ndim, self.backend = dim, num_heads, ndim, backend
        self.head_dim = head_dim or dim // num_heads
        inner = num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=False, **dd)
        self.decay = nn.Parameter(torch.empty(ndim, num_heads, **dd))  # lambda = sigmoid(decay)
        self.norm = nn.RMSNorm(self.head_dim, eps=1e-6, **dd)
        self.proj = nn.Linear(inner, dim, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.qkv, self.proj):
            nn.init.trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        with torch.no_grad():  # decays spread over heads, from short to long memory
            rates = torch.linspace(1.0, 4.0, self.num_heads, device=self.decay.device)
            self.decay.copy_(rates.expand(self.ndim, -1))
        self.norm.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.ndim + 2 or x.shape[-1] != self.dim:
            raise ValueError(f"MDTPE: `x` must have shape (B, *S, dim={self.dim}) with {self.ndim} spatial axes, "
                             f"got {tuple(x.shape)}")
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).unbind(-3)
        decay = torch.sigmoid(self.decay.to(torch.promote_types(self.decay.dtype, torch.float32)))
        y = 0
        for axis in range(self.ndim):
            # the scanned axis second, every other axis folded into the batch
            line = lambda t: t.movedim(1 + axis, -3).flatten(0, -4)
            lq, lk, lv = line(q), line(k), line(v)
            ones = lq.new_ones(lq.shape[:-1], dtype=decay.dtype)
            lam = (ones * decay[axis])[..., None]
            out = grid_scan(lq, lk, lv, ones[..., None], lam[..., None], lam, ones, backend=self.backend)
            shape = [x.shape[0]] + [s for a, s in enumerate(x.shape[1:-1]) if a != axis] + [x.shape[1 + axis]]
            y = y + out.reshape(*shape, self.num_heads, self.head_dim).movedim(-3, 1 + axis)
        return self.proj(self.norm(y.to(self.norm.weight.dtype)).flatten(-2))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, ndim={self.ndim}"
