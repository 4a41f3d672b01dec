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
        backend: "auto" (the Triton kernels on CUDA for causal mode and box mode on 1D and 2D grids, up to 128
            key channels (causal: 2 Dk with angles) and 128 values per head; the torch path elsewhere),
            "reference", "torch" or "triton" (also global mode: a fused reduction).

    .. math::
        y_p = \text{scale} \sum_c q_p[c] \sum_{s \in R(p)} \operatorname{softmax}_{s \in R(p)}(k_s[c])
              \cos(\theta_p[c] - \theta_s[c])\, v_s

    The torch path runs causal mode on the grid scan and 2D box mode as tiled linear attention (grid scan where
    logits spread too far for it); the kernels run causal mode as linear attention with decays from running
    maxima (mdlrnn.kernels.lightnet) and 2D box mode as box attention in Triton (mdlrnn.kernels.box_attention),
    or as a sweep down the rows with running maxima where logits spread too far (mdlrnn.kernels.lightnet_box).
    Large logits are handled with running maxima.
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
    channels = (1 if angles is None else 2) * q.shape[-1]  # what the kernel's q' and k' hold per head
    if _on_kernels(op, backend, mode, q, channels, v.shape[-1], dtype):
        return _on_triton(q, k, v, mode, scale, angles, channels)
    args = [q.to(dtype), k.to(dtype), v.to(dtype), mode, scale, None if angles is None else angles.to(dtype)]
    with torch.autocast(q.device.type, enabled=False):
        return _BACKENDS["torch" if backend == "auto" else backend](*args).to(v.dtype)


def _on_kernels(op: str, backend: str, mode: str, q: torch.Tensor, channels: int, values: int,
                dtype: torch.dtype) -> bool:
    """Whether the Triton kernels run it: causal mode (up to 128 key channels per head, Dk or 2 Dk with
    angles), global mode and box mode on 1D and 2D grids (up to 128 key channels), up to 128 values; "auto"
    takes them on CUDA, but for global mode."""
    from ... import kernels

    if mode == "global" and backend == "auto":  # the fused reduction: no faster than torch's matmuls (RESULTS.md)
        return False
    if backend not in ("auto", "triton") or not kernels.usable(q.device):
        # no kernel module imported (it needs triton, an optional dependency): False, or why backend="triton" can't
        return kernels.choose(op, backend, q.device, dtype)
    from ...kernels.lightnet import MAX_DK, MAX_DV

    fits = values <= MAX_DV and (_causal_fits(mode, q, channels, values) or (
        (mode == "global" or (mode == "box" and q.dim() == 5)) and q.shape[-1] <= MAX_DK))
    unfit = None if fits else (
        f"runs causal mode (and box mode on 1D grids) with up to {MAX_DK} key channels per head (Dk, or 2 Dk with "
        f"angles; with half inputs on GPUs of less than 128 KiB of shared memory per block, channels x values up "
        f"to 128 x 64), global mode and box mode on 2D grids with Dk up to {MAX_DK}, and up to {MAX_DV} values; "
        f"got mode={mode!r} on {q.dim() - 3} axes, Dk={q.shape[-1]}, {channels} channels, {values} values and "
        f"{q.dtype} inputs")
    return kernels.choose(op, backend, q.device, dtype, unfit)


def _causal_fits(mode: str, q: torch.Tensor, channels: int, values: int) -> bool:
    """Whether the causal kernels take it: causal mode, or box mode with at most one axis longer than 1 (causal
    mode on the flattened sequence), with up to 128 channels (2 Dk with angles), in the device's shared memory."""
    from ...kernels.lightnet import MAX_DK, fits_shared_memory

    along_one_axis = sum(size > 1 for size in q.shape[1:-2]) <= 1
    return ((mode == "causal" or (mode == "box" and along_one_axis)) and channels <= MAX_DK
            and fits_shared_memory(channels, values, q.element_size(), q.device))


def _on_triton(q, k, v, mode: str, scale: float, angles, channels: int):
    """Global mode: its fused reduction (mdlrnn.kernels.lightnet_global); causal mode and box mode along one
    axis: the causal kernels; box mode on other 2D grids: its op (mdlrnn.kernels.lightnet_box)."""
    from ...kernels import dot_precision

    precision = dot_precision(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        if mode == "global":
            from ...kernels.lightnet_global import lightnet_global_triton

            return lightnet_global_triton(q, k, v, scale, angles, precision=precision).to(v.dtype)
        if not _causal_fits(mode, q, channels, v.shape[-1]):
            from ...kernels.lightnet_box import lightnet_box_triton

            return lightnet_box_triton(q, k, v, scale, angles).to(v.dtype)
        from ...kernels.lightnet import lightnet_causal_triton

        return lightnet_causal_triton(q, k, v, scale, angles, precision=precision).to(v.dtype)
