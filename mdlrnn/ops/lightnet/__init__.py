"""lightnet_scan: LightNet's additive linear recurrence (global, causal, box) on the scan core."""

from __future__ import annotations

import torch

from .._checks import check_backend, check_qkv, check_same_device, check_tensor, compute_dtype
from .naive import lightnet_scan_reference
from .prefix import lightnet_scan_torch

__all__ = ["MODES", "lightnet_scan", "lightnet_scan_reference", "lightnet_scan_torch"]

MODES = ("global", "causal", "box")
_BACKENDS = {"reference": lightnet_scan_reference, "torch": lightnet_scan_torch}


def lightnet_scan(q, k, v, *, mode, scale=None, angles=None, backend="auto"):
    r"""LightNet attention: per key channel c, a softmax over each position's region R(p).

    Args:
        q: (B, *S, H, Dk) queries; k: (B, *S, H, Dk) key logits (no activation); v: (B, *S, H, Dv).
        mode: "global" (R(p) = all positions), "causal" (positions up to p in row-major order) or
            "box" (positions s <= p on every axis).
        scale: defaults to Dk ** -0.5.
        angles: optional rotary angles (B, *S, H, Dk) (or broadcastable): each channel's weights are multiplied
            by cos(angles_p[c] - angles_s[c]), the relative positional encoding (LRPE) of LightNet.
        backend: "auto" (the torch path), "reference", "torch" or "triton" (causal mode, and box mode on 1D
            grids: the scan on the 1D grid kernels, one head per key channel; opt-in, being slower on an H100).

    .. math::
        y_p = \text{scale} \sum_c q_p[c] \sum_{s \in R(p)} \operatorname{softmax}_{s \in R(p)}(k_s[c])
              \cos(\theta_p[c] - \theta_s[c])\, v_s

    Causal and box modes run on the grid scan; large logits are handled with running maxima.
    Returns y: (B, *S, H, Dv) in the dtype of v.
    """
    op = "lightnet_scan"
    check_backend(op, backend, ("auto", *_BACKENDS, "triton"))
    if mode not in MODES:
        raise ValueError(f"{op}: `mode` must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    check_qkv(op, q, k, v, "(B, *S, H, Dk)")
    if q.dim() < 4:
        raise ValueError(f"{op}: `q` must have shape (B, *S, H, Dk) with at least one spatial axis, got {tuple(q.shape)}")
    if angles is not None:
        check_tensor(op, "angles", angles)
        check_same_device(op, q, angles=angles)
        try:
            angles = angles.expand(q.shape)
        except RuntimeError:
            raise ValueError(
                f"{op}: `angles` must broadcast to the shape of `q` (B, *S, H, Dk) = {tuple(q.shape)}, "
                f"got {tuple(angles.shape)}"
            ) from None
    if v.numel() == 0 or q.numel() == 0:
        return v.new_zeros(v.shape)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dtype = compute_dtype(q)
    args = [q.to(dtype), k.to(dtype), v.to(dtype), mode, scale, None if angles is None else angles.to(dtype)]
    with torch.autocast(q.device.type, enabled=False):
        features = (1 if angles is None else 2) * v.shape[-1] + 1  # what each channel's scan sums: [v (cos, sin), 1]
        if _on_1d_kernels(op, backend, mode, q, features, dtype):
            from ...kernels.grid1d import grid_scan_triton

            return lightnet_scan_torch(*args, grid_scan=grid_scan_triton).to(v.dtype)
        return _BACKENDS["torch" if backend == "auto" else backend](*args).to(v.dtype)


def _on_1d_kernels(op: str, backend: str, mode: str, q: torch.Tensor, features: int, dtype: torch.dtype) -> bool:
    """Whether the scan runs on the 1D grid kernels: causal mode, or box mode on a 1D grid, in float32
    compute, with backend="triton" (an error naming what does not fit). "auto" keeps the torch path: with one
    scan head of Dk = 1 per key channel the 1D kernels took 442 ms forward+backward against the torch path's
    43 ms (B=64, 196 tokens, H=3, D=64, H100), the gradient kernel 92% of it; LightNet needs its own kernel."""
    from ... import kernels

    if backend == "auto":
        return False

    fits = (mode == "causal" or (mode == "box" and q.dim() == 4)) and features <= 128
    unfit = None if fits else (
        f"runs causal mode and box mode on 1D grids with up to 128 summed features per channel (Dv + 1, or "
        f"2 Dv + 1 with angles); got mode={mode!r} on {q.dim() - 3} axes and {features} features")
    return kernels.choose(op, backend, q.device, dtype, unfit)
