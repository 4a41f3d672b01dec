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
        backend: "auto", "reference" or "torch".

    .. math::
        y_p = \text{scale} \sum_c q_p[c] \sum_{s \in R(p)} \operatorname{softmax}_{s \in R(p)}(k_s[c])
              \cos(\theta_p[c] - \theta_s[c])\, v_s

    Causal and box modes run on the grid scan; large logits are handled with running maxima.
    Returns y: (B, *S, H, Dv) in the dtype of v.
    """
    op = "lightnet_scan"
    check_backend(op, backend)
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
    run = _BACKENDS["torch" if backend == "auto" else backend]
    cast = lambda x: None if x is None else x.to(dtype)
    with torch.autocast(q.device.type, enabled=False):
        return run(cast(q), cast(k), cast(v), mode, scale, cast(angles)).to(v.dtype)
