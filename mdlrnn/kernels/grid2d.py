"""grid_scan on 2D grids as one pair of torch custom ops, mdlrnn::grid_scan_2d and its backward.

The tile path on the tile kernels (mdlrnn.kernels.tiles) with the chain rule written out: gather into tiles,
transfer, exits, the scan across tiles, read-out, scatter back; and in reverse read-out, across-tiles adjoint,
exits and transfer adjoints, gathers' adjoints. As single ops the index plans stay inside them, so
torch.compile(fullgraph=True) traces a 2D pLSTM layer without a graph break. The forward hands the entering
border states to the backward, which recomputes the scalar weights (one transfer launch) rather than keep
them: they are a few times P_t floats per position, several times the memory of q, k and v.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch

from ..ops.grid.chunk import TorchAcross
from ..ops.grid.plan import TilePlan, coordinates, row_major_strides, tile_plan
from .tiles import (TritonTiles, _ranks, tile_exits, tile_exits_backward, tile_readout, tile_readout_backward,
                    tile_transfer, tile_transfer_backward)


def _plan(q: torch.Tensor) -> TilePlan:
    sizes = tuple(q.shape[1:3])
    return tile_plan(sizes, q.device, TritonTiles.tile(sizes))


@lru_cache(maxsize=64)
def _oriented(plan: TilePlan, sizes: tuple[int, int], orientations: tuple[int, ...]):
    """Per orientation (bit a set: axis a flipped), the plan's gather and scatter in the original frame: the
    orientation's grid is the original read through the flip, so no flipped copy is ever made."""
    strides = torch.tensor(row_major_strides(sizes))
    out = []
    for mask in orientations:
        coords = coordinates(sizes)
        for axis in range(2):
            if mask >> axis & 1:
                coords[:, axis] = sizes[axis] - 1 - coords[:, axis]
        flip = (coords * strides).sum(-1).to(plan.gather.device)  # an involution
        out.append((flip[plan.gather], plan.scatter[flip]))
    return tuple(out)


def _to_tiles(x: torch.Tensor, plan: TilePlan, gathers, shared: bool) -> torch.Tensor:
    """(B, P, H, F) shared by the orientations, or (B, P, O, H, F) -> (T * O * B * H, P_t, F)."""
    parts = [(x if shared else x[:, :, o]).index_select(1, gather) for o, (gather, _) in enumerate(gathers)]
    batch, _, heads, features = parts[0].shape
    x = torch.stack(parts).view(len(parts) * batch, plan.num_tiles, plan.tile_size, heads, features)
    return x.permute(1, 0, 3, 2, 4).reshape(-1, plan.tile_size, features)


def _slots(x_t: torch.Tensor, plan: TilePlan, groups: int, heads: int) -> torch.Tensor:
    """(T * O * B * H, P_t, F) -> (O * B, T * P_t, H, F)."""
    features = x_t.shape[-1]
    x = x_t.view(plan.num_tiles, groups, heads, plan.tile_size, features).permute(1, 0, 3, 2, 4)
    return x.reshape(groups, -1, heads, features)


def _from_tiles(y_t: torch.Tensor, plan: TilePlan, gathers, batch: int, heads: int) -> torch.Tensor:
    """(T * O * B * H, P_t, F) -> (B, P, H, F): each orientation's outputs at their original positions, summed."""
    y = _slots(y_t, plan, len(gathers) * batch, heads).unflatten(0, (len(gathers), batch))
    return sum(y[o].index_select(1, scatter) for o, (_, scatter) in enumerate(gathers))


def _tile_slots(dy: torch.Tensor, plan: TilePlan, gathers) -> torch.Tensor:
    """(B, P, H, F) -> (T * O * B * H, P_t, F), zero in the padding: the adjoint of _from_tiles."""
    batch, _, heads, features = dy.shape
    slots = dy.new_zeros(len(gathers), batch, plan.num_tiles * plan.tile_size, heads, features)
    for o, (_, scatter) in enumerate(gathers):
        slots[o][:, scatter] = dy
    slots = slots.view(-1, plan.num_tiles, plan.tile_size, heads, features).permute(1, 0, 3, 2, 4)
    return slots.reshape(-1, plan.tile_size, features)


def _untile(x_t: torch.Tensor, plan: TilePlan, gathers, batch: int, heads: int, shared: bool) -> torch.Tensor:
    """The adjoint of _to_tiles: (B, P, H, F) summed over orientations and copies, or (B, P, O, H, F)."""
    x = _slots(x_t, plan, len(gathers) * batch, heads).unflatten(0, (len(gathers), batch))
    positions = plan.scatter.numel()
    outs = [x.new_zeros(batch, positions, heads, x.shape[-1]).index_add_(1, gather, x[o])
            for o, (gather, _) in enumerate(gathers)]
    return sum(outs) if shared else torch.stack(outs, 2)


def _gather(plan, gathers, q, k, v, source, transition, mark, direct):
    """q, k, v, S, M, T (N * N flattened), D or None in tiles: one gather of q, k, v and one of the gates per
    orientation."""
    batch, *sizes, heads, _ = q.shape
    flat = lambda x: x.reshape(batch, math.prod(sizes), *x.shape[3:])
    qkv = [flat(x) for x in (q, k, v)]
    gates = [flat(source), flat(mark), flat(transition.flatten(-2))]
    if direct is not None:  # the same direct weight in every orientation's scan
        gates.append(flat(direct)[:, :, None, :, None].expand(-1, -1, len(gathers), -1, -1))
    split = lambda parts, shared: _to_tiles(torch.cat(parts, -1), plan, gathers, shared).split(
        [x.shape[-1] for x in parts], -1)
    tiles = split(gates, False)
    return (*split(qkv, True), *tiles[:3], tiles[3] if direct is not None else None)


@torch.library.custom_op("mdlrnn::grid_scan_2d", mutates_args=())
def grid_scan_2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, source: torch.Tensor, transition: torch.Tensor,
                 mark: torch.Tensor, direct: Optional[torch.Tensor], scale: float, orientations: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """[y (B, X, Y, H, Dv) float32, entering] (the border states entering each tile, empty for a one-tile grid).

    q, k, v (B, X, Y, H, D): one dtype (float32, float16, bfloat16), shared by the orientations; gates float32 with
    an orientation axis: source, mark (B, X, Y, O, H, 2), transition (B, X, Y, O, H, 2, 2), each in its
    orientation's frame; direct (B, X, Y, H) or None. orientations: O bit masks (bit a: axis a flipped). y sums
    the orientations' scans, each at the original positions."""
    with torch.autocast(q.device.type, enabled=False):  # the torch steps in here stay in float32
        return _forward(q, k, v, source, transition, mark, direct, scale, tuple(orientations))


def _forward(q, k, v, source, transition, mark, direct, scale, orientations):
    batch, heads, dk, dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    plan = _plan(q)
    gathers = _oriented(plan, tuple(q.shape[1:3]), orientations)
    q_t, k_t, v_t, s_t, m_t, t_t, d_t = _gather(plan, gathers, q, k, v, source, transition, mark, direct)
    weights, exits, _ = tile_transfer(s_t, t_t, m_t, d_t, _ranks(plan.tile, q.device), *plan.tile)
    entering = None
    if plan.num_tiles > 1:
        tiles_by_group, border, size = (plan.num_tiles, len(gathers) * batch * heads), plan.num_border, plan.tile_size
        local = tile_exits(k_t, v_t, exits).view(*tiles_by_group, border, dk * dv)
        entering = TorchAcross.states(local, exits[..., size:].reshape(*tiles_by_group, border, border), plan)
        entering = entering.view(-1, border, dk, dv)
    y = scale * _from_tiles(tile_readout(q_t, k_t, v_t, weights, entering), plan, gathers, batch, heads)
    return y.view(*q.shape[:-1], dv), entering if entering is not None else y.new_empty(0)


@grid_scan_2d.register_fake
def _(q, k, v, source, transition, mark, direct, scale, orientations):
    sizes = tuple(q.shape[1:3])
    rows, cols = TritonTiles.tile(sizes)
    tiles = -(-sizes[0] // rows) * -(-sizes[1] // cols)
    border, groups = rows + cols, len(orientations) * q.shape[0] * q.shape[-2]
    new = lambda *shape: q.new_empty(*shape, dtype=torch.float32)
    entering = new(tiles * groups, border, q.shape[-1], v.shape[-1]) if tiles > 1 else new(0)
    return new(*q.shape[:-1], v.shape[-1]), entering


@torch.library.custom_op("mdlrnn::grid_scan_2d_backward", mutates_args=())
def grid_scan_2d_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, source: torch.Tensor,
                          transition: torch.Tensor, mark: torch.Tensor, direct: Optional[torch.Tensor],
                          entering: torch.Tensor, dy: torch.Tensor, scale: float,
                          orientations: list[int]) -> list[torch.Tensor]:
    """[dq, dk, dv, d_source, d_transition, d_mark, d_direct] in float32 (d_direct empty without direct)."""
    with torch.autocast(q.device.type, enabled=False):  # backward may run under the caller's autocast
        return _backward_steps(q, k, v, source, transition, mark, direct, entering, dy, scale, tuple(orientations))


def _backward_steps(q, k, v, source, transition, mark, direct, entering, dy, scale, orientations):
    batch, heads, dk, dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    plan = _plan(q)
    gathers = _oriented(plan, tuple(q.shape[1:3]), orientations)
    size, border = plan.tile_size, plan.num_border
    q_t, k_t, v_t, s_t, m_t, t_t, d_t = _gather(plan, gathers, q, k, v, source, transition, mark, direct)
    weights, exits, phi = tile_transfer(s_t, t_t, m_t, d_t, _ranks(plan.tile, q.device), *plan.tile)
    has_border = plan.num_tiles > 1
    dy_t = _tile_slots(scale * dy.float().reshape(batch, -1, heads, dv), plan, gathers)
    dq_t, dk_t, dv_t, d_weights, d_entering = tile_readout_backward(
        q_t, k_t, v_t, weights, entering if has_border else None, dy_t)
    d_exits = torch.zeros_like(exits)
    if has_border:
        tiles_by_group = (plan.num_tiles, len(gathers) * batch * heads)
        exit_border = exits[..., size:].reshape(*tiles_by_group, border, border)
        states = entering.view(*tiles_by_group, border, dk * dv)
        d_local, d_border = TorchAcross.adjoint(d_entering.view_as(states), exit_border, states, plan)
        d_exits[..., size:] = d_border.flatten(0, 1)
        dk_exits, dv_exits, d_exits_local = tile_exits_backward(k_t, v_t, exits, d_local.view(-1, border, dk, dv))
        d_exits += d_exits_local
        dk_t, dv_t = dk_t + dk_exits, dv_t + dv_exits
    ds, dt, dm, dd = tile_transfer_backward(t_t, m_t, direct is not None, _ranks(plan.tile, q.device), phi,
                                            d_weights, d_exits, *plan.tile)
    untile = lambda x, shared, shape: _untile(x, plan, gathers, batch, heads, shared).view(shape)
    grads = [untile(x, True, y.shape) for x, y in ((dq_t, q), (dk_t, k), (dv_t, v))]
    grads += [untile(x, False, y.shape) for x, y in ((ds, source), (dt, transition), (dm, mark))]
    if direct is None:
        return [*grads, dy.new_empty(0)]
    return [*grads, _untile(dd, plan, gathers, batch, heads, False).sum(2).view(direct.shape)]


@grid_scan_2d_backward.register_fake
def _(q, k, v, source, transition, mark, direct, entering, dy, scale, orientations):
    f32 = lambda x: x.new_empty(x.shape, dtype=torch.float32)  # contiguous, as the real gradients
    return [f32(q), f32(k), f32(v), f32(source), f32(transition), f32(mark),
            f32(direct) if direct is not None else dy.new_empty(0)]


def _setup_context(ctx, inputs, output):
    q, k, v, source, transition, mark, direct, scale, orientations = inputs
    ctx.save_for_backward(q, k, v, source, transition, mark, direct, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.scale, ctx.orientations = scale, orientations


def _backward(ctx, dy, *_):
    *inputs, entering = ctx.saved_tensors
    grads = grid_scan_2d_backward(*inputs, entering, dy, ctx.scale, ctx.orientations)
    return *grads[:6], grads[6] if inputs[6] is not None else None, None, None


grid_scan_2d.register_autograd(_backward, setup_context=_setup_context)
