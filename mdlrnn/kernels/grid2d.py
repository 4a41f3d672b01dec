"""grid_scan on 2D grids as one pair of torch custom ops, mdlrnn::grid_scan_2d and its backward.

The tile path on the tile kernels (mdlrnn.kernels.tiles) with the chain rule written out: gather into tiles,
transfer, exits, the scan across tiles, read-out, scatter back; and in reverse read-out, across-tiles adjoint,
exits and transfer adjoints, gathers' adjoints. As single ops the index plans stay inside them, so
torch.compile(fullgraph=True) traces a 2D pLSTM layer without a graph break; nothing is recomputed: the
forward hands the scalar weights, phi and the entering border states to the backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..ops.grid.chunk import TorchAcross, _from_tiles, gather_tiles
from ..ops.grid.plan import TilePlan, tile_plan
from .tiles import (TritonTiles, _ranks, tile_exits, tile_exits_backward, tile_readout, tile_readout_backward,
                    tile_transfer, tile_transfer_backward)


def _plan(q: torch.Tensor) -> TilePlan:
    sizes = tuple(q.shape[1:3])
    return tile_plan(sizes, q.device, TritonTiles.tile(sizes))


def _tile_slots(x: torch.Tensor, plan: TilePlan, batch: int, heads: int) -> torch.Tensor:
    """(B, P, H, F) -> (T * B * H, P_t, F) with zeros in the padding: the adjoint of _from_tiles."""
    features = x.shape[-1]
    slots = x.new_zeros(batch, plan.num_tiles * plan.tile_size, heads, features)
    slots[:, plan.scatter] = x.reshape(batch, -1, heads, features)
    slots = slots.view(batch, plan.num_tiles, plan.tile_size, heads, features).permute(1, 0, 3, 2, 4)
    return slots.reshape(-1, plan.tile_size, features)


def _untile(x_t: torch.Tensor, plan: TilePlan, shape) -> torch.Tensor:
    """(T * B * H, P_t, F) -> (B, *S, H, F) summed over every copy the gather made: the adjoint of _to_tiles."""
    batch, heads, features = shape[0], shape[-2], x_t.shape[-1]
    x = x_t.view(plan.num_tiles, batch, heads, plan.tile_size, features).permute(1, 0, 3, 2, 4)
    x = x.reshape(batch, -1, heads, features)
    out = x.new_zeros(batch, plan.scatter.numel(), heads, features).index_add_(1, plan.gather, x)
    return out.view(*shape[:-1], features)


@torch.library.custom_op("mdlrnn::grid_scan_2d", mutates_args=())
def grid_scan_2d(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, source: torch.Tensor, transition: torch.Tensor,
                 mark: torch.Tensor, direct: Optional[torch.Tensor], scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[y (B, X, Y, H, Dv) float32, weights, exits, phi, entering] (entering empty for a one-tile grid).

    q, k, v: one dtype (float32, float16, bfloat16); gates float32, in grid_scan's shapes."""
    with torch.autocast(q.device.type, enabled=False):  # the torch steps in here stay in float32
        return _forward(q, k, v, source, transition, mark, direct, scale)


def _forward(q, k, v, source, transition, mark, direct, scale):
    batch, heads, dk, dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    plan = _plan(q)
    q_t, k_t, v_t, s_t, m_t, t_t, d_t = gather_tiles(plan, q, k, v, source, transition, mark, direct)
    weights, exits, phi = tile_transfer(s_t, t_t, m_t, d_t, _ranks(plan.tile, q.device), *plan.tile)
    entering = None
    if plan.num_tiles > 1:
        tiles_by_group, border, size = (plan.num_tiles, batch * heads), plan.num_border, plan.tile_size
        local = tile_exits(k_t, v_t, exits).view(*tiles_by_group, border, dk * dv)
        entering = TorchAcross.states(local, exits[..., size:].reshape(*tiles_by_group, border, border), plan)
        entering = entering.view(-1, border, dk, dv)
    y = scale * _from_tiles(tile_readout(q_t, k_t, v_t, weights, entering), plan, batch, heads)
    return y.view(*q.shape[:-1], dv), weights, exits, phi, entering if entering is not None else y.new_empty(0)


@grid_scan_2d.register_fake
def _(q, k, v, source, transition, mark, direct, scale):
    sizes = tuple(q.shape[1:3])
    rows, cols = TritonTiles.tile(sizes)
    tiles = -(-sizes[0] // rows) * -(-sizes[1] // cols)
    size, border, groups = rows * cols, rows + cols, q.shape[0] * q.shape[-2]
    new = lambda *shape: q.new_empty(*shape, dtype=torch.float32)
    entering = new(tiles * groups, border, q.shape[-1], v.shape[-1]) if tiles > 1 else new(0)
    return (new(*q.shape[:-1], v.shape[-1]), new(tiles * groups, size, size + border),
            new(tiles * groups, border, size + border), new(tiles * groups, 2 * size, size + border), entering)


@torch.library.custom_op("mdlrnn::grid_scan_2d_backward", mutates_args=())
def grid_scan_2d_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, source: torch.Tensor,
                          transition: torch.Tensor, mark: torch.Tensor, direct: Optional[torch.Tensor],
                          weights: torch.Tensor, exits: torch.Tensor, phi: torch.Tensor, entering: torch.Tensor,
                          dy: torch.Tensor, scale: float) -> list[torch.Tensor]:
    """[dq, dk, dv, d_source, d_transition, d_mark, d_direct] in float32 (d_direct empty without direct)."""
    with torch.autocast(q.device.type, enabled=False):  # backward may run under the caller's autocast
        return _backward_steps(q, k, v, source, transition, mark, direct, weights, exits, phi, entering, dy, scale)


def _backward_steps(q, k, v, source, transition, mark, direct, weights, exits, phi, entering, dy, scale):
    batch, heads, dk, dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    plan = _plan(q)
    size, border = plan.tile_size, plan.num_border
    q_t, k_t, v_t, s_t, m_t, t_t, d_t = gather_tiles(plan, q, k, v, source, transition, mark, direct)
    has_border = plan.num_tiles > 1
    dy_t = _tile_slots(scale * dy.float(), plan, batch, heads)
    dq_t, dk_t, dv_t, d_weights, d_entering = tile_readout_backward(
        q_t, k_t, v_t, weights, entering if has_border else None, dy_t)
    d_exits = torch.zeros_like(exits)
    if has_border:
        tiles_by_group = (plan.num_tiles, batch * heads)
        exit_border = exits[..., size:].reshape(*tiles_by_group, border, border)
        d_local = TorchAcross.adjoint(d_entering.view(*tiles_by_group, border, dk * dv), exit_border, plan)
        states = entering.view(-1, border, dk * dv)
        d_exits[..., size:] = d_local.flatten(0, 1) @ states.transpose(1, 2)
        dk_exits, dv_exits, d_exits_local = tile_exits_backward(k_t, v_t, exits, d_local.view(-1, border, dk, dv))
        d_exits += d_exits_local
        dk_t, dv_t = dk_t + dk_exits, dv_t + dv_exits
    ds, dt, dm, dd = tile_transfer_backward(t_t, m_t, direct is not None, _ranks(plan.tile, q.device), phi,
                                            d_weights, d_exits, *plan.tile)
    shape = q.shape
    grads = [_untile(x, plan, shape) for x in (dq_t, dk_t, dv_t, ds, dt, dm)]
    grads[4] = grads[4].view(*shape[:-1], 2, 2)
    return [*grads, _untile(dd, plan, shape)[..., 0] if direct is not None else dy.new_empty(0)]


@grid_scan_2d_backward.register_fake
def _(q, k, v, source, transition, mark, direct, weights, exits, phi, entering, dy, scale):
    f32 = lambda x: torch.empty_like(x, dtype=torch.float32)
    return [f32(q), f32(k), f32(v), f32(source), f32(transition), f32(mark),
            f32(direct) if direct is not None else dy.new_empty(0)]


def _setup_context(ctx, inputs, output):
    q, k, v, source, transition, mark, direct, scale = inputs
    _, weights, exits, phi, entering = output
    ctx.save_for_backward(q, k, v, source, transition, mark, direct, weights, exits, phi, entering)
    ctx.mark_non_differentiable(weights, exits, phi, entering)
    ctx.scale = scale


def _backward(ctx, dy, *_):
    *inputs, weights, exits, phi, entering = ctx.saved_tensors
    grads = grid_scan_2d_backward(*inputs, weights, exits, phi, entering, dy, ctx.scale)
    return *grads[:6], grads[6] if inputs[6] is not None else None, None


grid_scan_2d.register_autograd(_backward, setup_context=_setup_context)
