"""grid_scan on 2D grids as one pair of torch custom ops, mdlrnn::grid_scan_2d and its backward.

The tile path on the tile kernels (mdlrnn.kernels.tiles, mdlrnn.kernels.across) with the chain rule written out:
transfer, exits, the scan across tiles, read-out; and in reverse read-out, across-tiles adjoint, exits and transfer
adjoints.
The kernels read q, k, v and the gates where they are, through a table of each tile slot's grid position per
orientation, and write per-orientation results in place: no gathered or flipped copies. As single ops the index
plans stay inside them, so torch.compile(fullgraph=True) traces a 2D pLSTM layer without a graph break. The
backward keeps only the op's inputs and recomputes the scalar weights and the border states leaving each tile
(the transfer, the exits and the pass across tiles again): kept, the weights would take a few times P_t floats per
position and the states E x Dk x Dv floats per tile, orientation and head, each several times the memory of q, k
and v.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops._tables import device_tables
from ..ops.grid.plan import TilePlan, coordinates, row_major_strides, tile_plan
from . import across, eager_forward, first_order_only, run, unit_last_stride
from .tiles import (Rows, TritonTiles, exit_states, exits_backward, readout, readout_backward, transfer,
                    transfer_backward)


def _plan(q: torch.Tensor) -> TilePlan:
    sizes = tuple(q.shape[1:3])
    return tile_plan(sizes, q.device, TritonTiles.tile(sizes))


@device_tables
def _slots(plan: TilePlan, sizes: tuple[int, int], orientations: tuple[int, ...]) -> torch.Tensor:
    """(O, T, P_t) int32: per orientation (bit a set: axis a flipped), the grid position in the original frame of
    each tile slot, -1 in padding. The orientation's grid is the original read through the flip: no flipped copy
    is ever made."""
    gather = plan.gather.cpu()
    padding = torch.ones(gather.numel(), dtype=torch.bool)
    padding[plan.scatter.cpu()] = False
    strides = torch.tensor(row_major_strides(sizes))
    slots = []
    for mask in orientations:
        coords = coordinates(sizes)
        for axis in range(2):
            if mask >> axis & 1:
                coords[:, axis] = sizes[axis] - 1 - coords[:, axis]
        slots.append((coords * strides).sum(-1)[gather].masked_fill(padding, -1))
    return torch.stack(slots).view(len(orientations), plan.num_tiles, plan.tile_size).to(plan.device, torch.int32)


def _inputs(q, k, v, source, transition, mark, direct, orientations):
    """Tile rows; q, k, v (B, N, H, D); gates (B, N, O, H, F) with transition's 2 x 2 flattened; direct (B, N, H, 1)."""
    batch, x, y, heads, _ = q.shape
    plan = _plan(q)
    rows = Rows(_slots(plan, (x, y), orientations), plan.num_tiles, len(orientations), batch, heads, x * y)
    flat = lambda t: unit_last_stride(t.flatten(1, 2))
    gates = [flat(source), flat(transition.flatten(-2)), flat(mark)]
    # direct is read through its strides: (B, N, H, 1) as a view, whatever the strides of its H axis
    return plan, rows, [flat(t) for t in (q, k, v)], gates, None if direct is None else direct.flatten(1, 2)[..., None]


def _orientations_summed(x: torch.Tensor) -> torch.Tensor:
    """(B, N, O, H, F) -> (B, N, H, F)."""
    return x.sum(2) if x.shape[2] > 1 else x.squeeze(2)


def _scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, source: torch.Tensor, transition: torch.Tensor,
                 mark: torch.Tensor, direct: Optional[torch.Tensor], scale: float, orientations: list[int]
                 ) -> torch.Tensor:
    """y (B, X, Y, H, Dv) float32.

    q, k, v (B, X, Y, H, D): one dtype (float32, float16, bfloat16), shared by the orientations; gates float32 with
    an orientation axis: source, mark (B, X, Y, O, H, 2), transition (B, X, Y, O, H, 2, 2), each in its
    orientation's frame; direct (B, X, Y, H) or None. orientations: O bit masks (bit a: axis a flipped). y sums
    the orientations' scans, each at the original positions."""
    with torch.autocast(q.device.type, enabled=False):  # the torch steps in here stay in float32
        return _forward(q, k, v, source, transition, mark, direct, scale, tuple(orientations))


grid_scan_2d = torch.library.custom_op("mdlrnn::grid_scan_2d", _scan, mutates_args=())


def _exit_states(k3, v3, exits, rows: Rows, plan: TilePlan) -> Optional[torch.Tensor]:
    """The border states leaving each tile, (R, E, Dk, Dv) float32, which the next tiles read (across.sources):
    the exits' local part, then the pass across tiles. None for a one-tile grid."""
    if plan.num_tiles == 1:
        return None
    return across.states(exit_states(k3, v3, exits, rows), exits, plan)


def _sources(plan: TilePlan) -> Optional[torch.Tensor]:
    """Which tile's exit enters each border edge (across.sources), None for a one-tile grid."""
    return across.sources(plan)[0] if plan.num_tiles > 1 else None


def _forward(q, k, v, source, transition, mark, direct, scale, orientations):
    plan, rows, (q3, k3, v3), gates, direct3 = _inputs(q, k, v, source, transition, mark, direct, orientations)
    weights, exits, _ = transfer(*gates, direct3, rows, plan.tile, border=plan.num_tiles > 1)
    states = _exit_states(k3, v3, exits, rows, plan)
    y = readout(q3, k3, v3, weights, states, rows, scale, _sources(plan))
    return _orientations_summed(y).view(*q.shape[:-1], v.shape[-1])


@grid_scan_2d.register_fake
def _(q, k, v, source, transition, mark, direct, scale, orientations):
    return q.new_empty(*q.shape[:-1], v.shape[-1], dtype=torch.float32)


def _scan_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, source: torch.Tensor,
                          transition: torch.Tensor, mark: torch.Tensor, direct: Optional[torch.Tensor],
                          dy: torch.Tensor, scale: float, orientations: list[int]) -> list[torch.Tensor]:
    """[dq, dk, dv, d_source, d_transition, d_mark, d_direct] in float32 (d_direct empty without direct)."""
    with torch.autocast(q.device.type, enabled=False):  # backward may run under the caller's autocast
        return _backward_steps(q, k, v, source, transition, mark, direct, dy, scale, tuple(orientations))


grid_scan_2d_backward = torch.library.custom_op("mdlrnn::grid_scan_2d_backward", _scan_backward, mutates_args=())


def _backward_steps(q, k, v, source, transition, mark, direct, dy, scale, orientations):
    dv = v.shape[-1]
    plan, rows, (q3, k3, v3), gates, direct3 = _inputs(q, k, v, source, transition, mark, direct, orientations)
    size, border = plan.tile_size, plan.num_border
    weights, exits, phi = transfer(*gates, direct3, rows, plan.tile, border=plan.num_tiles > 1)
    states = _exit_states(k3, v3, exits, rows, plan)
    has_border = states is not None
    dy3 = (scale * dy.float()).reshape(rows.batch, rows.positions, rows.heads, dv).contiguous()
    dq, dk_, dv_, d_weights, d_entering = readout_backward(q3, k3, v3, weights, states, dy3, rows, _sources(plan))
    del weights  # read for the last time: its memory free before the transfer's adjoint allocates its own
    d_exits = torch.zeros_like(exits) if has_border else None
    if has_border:
        d_local, d_border = across.adjoint(d_entering, states, exits, plan)
        d_exits[..., size:size + border] = d_border
        exits_backward(k3, v3, exits, d_local, rows, dk_, dv_, d_exits, accumulate=True)
    ds, dt, dm, dd = transfer_backward(*gates[1:], direct is not None, rows, plan.tile, phi, d_weights, d_exits)
    grads = [_orientations_summed(g).view(x.shape) for g, x in ((dq, q), (dk_, k), (dv_, v))]
    grads += [g.view(x.shape) for g, x in ((ds, source), (dt, transition), (dm, mark))]
    return [*grads, dy.new_empty(0) if direct is None else _orientations_summed(dd).view(direct.shape)]


@grid_scan_2d_backward.register_fake
def _(q, k, v, source, transition, mark, direct, dy, scale, orientations):
    f32 = lambda x: x.new_empty(x.shape, dtype=torch.float32)  # contiguous, as the real gradients
    return [f32(q), f32(k), f32(v), f32(source), f32(transition), f32(mark),
            f32(direct) if direct is not None else dy.new_empty(0)]


def _setup_context(ctx, inputs, output):
    q, k, v, source, transition, mark, direct, scale, orientations = inputs
    ctx.save_for_backward(q, k, v, source, transition, mark, direct)
    ctx.scale, ctx.orientations = scale, orientations


def _gradients(ctx, dy, backward):
    inputs = ctx.saved_tensors
    grads = backward(*inputs, dy, ctx.scale, ctx.orientations)
    return *grads[:6], grads[6] if inputs[6] is not None else None, None, None


grid_scan_2d.register_autograd(lambda ctx, dy: _gradients(ctx, dy, grid_scan_2d_backward), setup_context=_setup_context)


class GridScan2D(torch.autograd.Function):
    """mdlrnn::grid_scan_2d for eager calls (kernels.run): the same forward, context and backward."""

    forward = eager_forward(_scan, _setup_context)

    @staticmethod
    def backward(ctx, dy):
        first_order_only("grid_scan")
        return _gradients(ctx, dy, _scan_backward)


def grid_scan_2d_triton(q, k, v, source, transition, mark, direct, scale: float, orientations: list[int]):
    """mdlrnn::grid_scan_2d, or its autograd.Function outside torch.compile: y (B, X, Y, H, Dv) float32."""
    return run(grid_scan_2d, GridScan2D, q, k, v, source, transition, mark, direct, scale, orientations)
