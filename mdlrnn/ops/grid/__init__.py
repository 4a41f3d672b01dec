"""grid_scan: the pLSTM recurrence on an N-D grid (N = 1: chunkwise linear RNN; N = 2: images; N = 3: volumes)."""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from .._checks import check_backend, check_qkv, check_same_device, check_shape, compute_dtype
from .chunk import grid_scan_torch
from .naive import grid_scan_reference

__all__ = ["grid_scan", "grid_scan_orientations", "grid_scan_reference", "grid_scan_torch"]

_BACKENDS = {"reference": grid_scan_reference, "torch": grid_scan_torch}


def _pick_backend(op: str, backend: str, q: torch.Tensor, dv: int, ndim: int, dtype: torch.dtype) -> str:
    """"auto": the Triton kernels on CUDA for 1D and 2D grids (float32 compute), else the torch path."""
    from ... import kernels

    dk = q.shape[-1]
    # the 1D gradient kernel holds whole (Dk, Dv) states per program, the tile kernels whole rows of q, k, v
    unfit = None if max(dk, dv) <= 128 else f"takes head dimensions up to 128, got Dk={dk}, Dv={dv}"
    if ndim > 2 and backend == "auto":  # 3D tiles run the torch transfer beside the kernels: not timed on a GPU
        return "torch"
    if kernels.choose(op, backend, q.device, dtype, unfit):
        return "triton"
    return "torch" if backend == "auto" else backend


def _kernel_inputs(q, k, v, dtype):
    """q, k, v as the tile kernels take them: bfloat16 or float32 as given; float16 and mixed dtypes go to the
    compute dtype, since the kernels round path weights to the inputs' dtype and float16 can overflow there."""
    if q.dtype == k.dtype == v.dtype and q.dtype in (torch.bfloat16, torch.float32):
        return q, k, v
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _on_2d_kernels(q, k, v, source, transition, mark, direct, scale: float, orientations: list[int], dtype):
    """mdlrnn::grid_scan_2d: gates with an orientation axis, orientations as flip bit masks; y in v's dtype."""
    from ...kernels.grid2d import grid_scan_2d_triton

    gates = [g.to(torch.float32) for g in (source, transition, mark)]
    direct = None if direct is None else direct.to(torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        return grid_scan_2d_triton(*_kernel_inputs(q, k, v, dtype), *gates, direct, scale, orientations).to(v.dtype)


def grid_scan(q, k, v, source, transition, mark, direct=None, *, scale=None, backend="auto"):
    r"""Scan an N-D grid from its origin corner with matrix-valued states on the grid's edges.

    Args:
        q, k: (B, *S, H, Dk); v: (B, *S, H, Dv).
        source: (B, *S, H, N), S[p, a] weighs k_p v_p^T on the edge leaving p along axis a.
        transition: (B, *S, H, N, N), T[p, a, b] carries the edge entering p along b onto the edge
            leaving p along a.
        mark: (B, *S, H, N), M[p, b] weighs the edge entering p along b in p's output.
        direct: (B, *S, H) or None, weight of the position's own key/value.
        scale: defaults to Dk ** -0.5.
        backend: "auto" (Triton on CUDA for 1D and 2D grids, else torch), "reference", "torch" or "triton" (1D: the
            chunk kernels; N >= 2: the tile path on the tile kernels, mdlrnn.kernels.tiles).

    .. math::
        C_a[p] = \sum_b T[p,a,b] C_b[p - e_b] + S[p,a] k_p v_p^\top, \qquad
        y_p = \text{scale}\,\big(q_p^\top \sum_b M[p,b] C_b[p - e_b] + D_p (q_p \cdot k_p) v_p\big)

    Returns y: (B, *S, H, Dv) in the dtype of v, accumulated in float32 (float64 for float64 inputs).
    """
    op = "grid_scan"
    check_backend(op, backend, ("auto", *_BACKENDS, "triton"))
    check_qkv(op, q, k, v, "(B, *S, H, Dk)")
    if q.dim() < 4:
        raise ValueError(f"{op}: `q` must have shape (B, *S, H, Dk) with at least one spatial axis, got {tuple(q.shape)}")
    batch, *sizes, heads, dk = q.shape
    ndim = len(sizes)
    lead = (batch, *sizes, heads)
    check_shape(op, "source", source, (*lead, ndim), "(B, *S, H, N)")
    check_shape(op, "transition", transition, (*lead, ndim, ndim), "(B, *S, H, N, N)")
    check_shape(op, "mark", mark, (*lead, ndim), "(B, *S, H, N)")
    if direct is not None:
        check_shape(op, "direct", direct, lead, "(B, *S, H)")
    check_same_device(op, q, source=source, transition=transition, mark=mark, direct=direct)
    if v.numel() == 0 or q.numel() == 0:
        return v.new_zeros(*lead, v.shape[-1])
    scale = dk**-0.5 if scale is None else float(scale)

    dtype = compute_dtype(q, source, transition, mark, direct)
    backend = _pick_backend(op, backend, q, v.shape[-1], ndim, dtype)
    if backend == "triton" and ndim == 1:
        from ...kernels.grid1d import grid_scan_triton

        with torch.autocast(q.device.type, enabled=False):  # q, k, v keep their dtype; products accumulate in fp32
            return grid_scan_triton(q, k, v, source, transition, mark, direct, scale).to(v.dtype)
    if backend == "triton" and ndim == 2:  # one orientation, unflipped
        return _on_2d_kernels(q, k, v, source.unsqueeze(-3), transition.unsqueeze(-4), mark.unsqueeze(-3), direct,
                              scale, [0], dtype)
    args = [x if x is None else x.to(dtype) for x in (q, k, v, source, transition, mark, direct)]
    if backend == "triton":  # 3D: the tile path with the read-out and exits on the tile kernels
        from ...kernels.tiles import TritonTiles

        args[:3] = _kernel_inputs(q, k, v, dtype)
        run = partial(grid_scan_torch, tiles=TritonTiles)
    else:
        run = _BACKENDS[backend]
    with torch.autocast(q.device.type, enabled=False):
        if backend == "torch" and torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in args):
            # keep only the inputs; the tile states (a few Dk x Dv per position) are recomputed in backward.
            # (The 2D tile kernels' op likewise keeps only its inputs and recomputes the rest.)
            return checkpoint(run, *args, scale, use_reentrant=False).to(v.dtype)
        return run(*args, scale).to(v.dtype)


def _flip(t: torch.Tensor, flips) -> torch.Tensor:
    dims = [1 + a for a, flip in enumerate(flips) if flip]
    return t.flip(dims) if dims else t


def grid_scan_orientations(q, k, v, source, transition, mark, orientations, *, scale=None, backend="auto"):
    """The sum over orientations of grid_scan from each orientation's corner, at the original positions.

    Args:
        q, k, v: (B, *S, H, D), shared by the orientations.
        source, mark: (B, *S, O, H, N); transition: (B, *S, O, H, N, N): orientation o's gates at each position,
            in the grid_scan convention of its own frame (the grid flipped along the axes that o flips).
        orientations: O tuples of N bools, whether each axis is flipped.

    On the 2D tile kernels the flips are read through the kernels' slot table; elsewhere the flipped grids
    are stacked on the batch for one grid_scan.
    """
    batch, *sizes, heads, dk = q.shape
    ndim, count = len(sizes), len(orientations)
    check_shape("grid_scan_orientations", "source", source, (batch, *sizes, count, heads, ndim), "(B, *S, O, H, N)")
    check_shape("grid_scan_orientations", "mark", mark, (batch, *sizes, count, heads, ndim), "(B, *S, O, H, N)")
    check_shape("grid_scan_orientations", "transition", transition, (batch, *sizes, count, heads, ndim, ndim),
                "(B, *S, O, H, N, N)")
    dtype = compute_dtype(q, source, transition, mark)
    if q.numel() == 0 or v.numel() == 0:
        return v.new_zeros(v.shape)
    if ndim == 2 and _pick_backend("grid_scan", backend, q, v.shape[-1], ndim, dtype) == "triton":
        masks = [sum(int(flip) << axis for axis, flip in enumerate(flips)) for flips in orientations]
        scale = dk**-0.5 if scale is None else float(scale)
        return _on_2d_kernels(q, k, v, source, transition, mark, None, scale, masks, dtype)
    stacked = lambda t: torch.cat([_flip(t, flips) for flips in orientations])
    per_orientation = lambda g: torch.cat([_flip(g.select(1 + ndim, o), flips) for o, flips in enumerate(orientations)])
    y = grid_scan(stacked(q), stacked(k), stacked(v), *(per_orientation(g) for g in (source, transition, mark)), None,
                  scale=scale, backend=backend)
    return sum(_flip(part, flips) for part, flips in zip(y.split(batch), orientations))
