"""Parallel PyTorch grid scan: tiles with an intra-tile transfer matrix and border states passed between tiles.

Inside a tile every state is a linear function of the tile's own keys/values and of the states on the
border edges entering it. A scalar wavefront over the tile's hyperplanes computes those weights
(phi, one vector of length P_t + E per edge, for all tiles at once); everything with Dk x Dv states is
then a few batched matrix products:

    y_intra  = (G_local * Q K^T) V                      the masked, quadratic form inside a tile
    C_exit   = phi_exit,local K (x) V + phi_exit,border C_enter
    y_border = q_p^T sum_j G[p, j] C_enter,j

and the only loop with matrix states runs over the tile grid's hyperplanes. Memory stays linear in the
number of positions; autograd differentiates every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .plan import TilePlan, tile_plan


def _to_tiles(x: torch.Tensor, plan: TilePlan, batch: int, heads: int) -> torch.Tensor:
    """(B, P, H, F) -> (B * H * T, P_t, F), tiles and positions in wavefront order, padding zero."""
    features = x.shape[-1]
    x = F.pad(x, (0, 0, 0, 0, 0, 1)).index_select(1, plan.gather)
    x = x.view(batch, plan.num_tiles, plan.tile_size, heads, features).permute(0, 3, 1, 2, 4)
    return x.reshape(batch * heads * plan.num_tiles, plan.tile_size, features)


def _from_tiles(y: torch.Tensor, plan: TilePlan, batch: int, heads: int) -> torch.Tensor:
    """(B * H * T, P_t, F) -> (B, P, H, F), padding dropped."""
    features = y.shape[-1]
    y = y.view(batch, heads, plan.num_tiles, plan.tile_size, features).permute(0, 2, 3, 1, 4)
    return y.reshape(batch, plan.num_tiles * plan.tile_size, heads, features).index_select(1, plan.scatter)


def _entering(prev: torch.Tensor, rows: torch.Tensor, shape) -> torch.Tensor:
    """Gather the states entering a hyperplane from the previous one's (R, L, ..., F) states."""
    flat = prev.flatten(1, -2)
    flat = F.pad(flat, (0, 0, 0, 1))  # the zero row for edges from outside
    return flat.index_select(1, rows).view(shape)


def _split(x: torch.Tensor, steps, dim: int = 1) -> tuple[torch.Tensor, ...]:
    """Per-step views along dim 1; one split (whose backward is one cat) instead of a slice per step,
    whose backward would write a full-size zero gradient every step."""
    return torch.split(x, [step.stop - step.start for step in steps], dim=dim)


def _transfer(plan: TilePlan, source, transition, mark):
    """Scalar wavefront inside the tiles: phi (R, P_t, N, P_t + E) and G (R, P_t, P_t + E).

    phi[p, a] weighs each local source and each entering border edge in the state leaving p along a;
    G[p] weighs them in the marked sum that q_p reads.
    """
    rows, ndim = source.shape[0], source.shape[-1]
    width = plan.tile_size + plan.num_border
    steps = plan.inside
    entries = _split(plan.entry.to(source.dtype), steps, dim=0)
    owns = _split(plan.own.to(source.dtype), steps, dim=0)
    phis, marks, prev = [], [], None
    for step, s, t, m, entry, own in zip(
        steps, _split(source, steps), _split(transition, steps), _split(mark, steps), entries, owns
    ):
        shape = (rows, step.stop - step.start, ndim, width)
        incoming = entry.expand(shape) if prev is None else _entering(prev, step.rows, shape) + entry
        prev = torch.addcmul(t @ incoming, s[..., None], own)
        phis.append(prev)
        marks.append((m[:, :, None, :] @ incoming).squeeze(-2))
    return torch.cat(phis, 1), torch.cat(marks, 1)


def _across_tiles(plan: TilePlan, exit_local, exit_border, groups: int) -> torch.Tensor:
    """Border states entering every tile: C_exit = A C_enter + U, tile hyperplane after hyperplane.

    exit_local: (G, T, E, Dk * Dv) the U term; exit_border: (G, T, E, E) the A term.
    Returns (G, T, E, Dk * Dv).
    """
    entering, prev = [], None
    _, _, border, width = exit_local.shape
    steps = plan.across
    for step, local, through in zip(steps, _split(exit_local, steps), _split(exit_border, steps)):
        shape = (groups, step.stop - step.start, border, width)
        c_in = exit_local.new_zeros(shape) if prev is None else _entering(prev, step.rows, shape)
        prev = through @ c_in + local
        entering.append(c_in)
    return torch.cat(entering, 1)


def grid_scan_torch(q, k, v, source, transition, mark, direct, scale: float) -> torch.Tensor:
    batch, *sizes, heads, dk = q.shape
    dv, ndim = v.shape[-1], len(sizes)
    plan = tile_plan(tuple(sizes), q.device)
    num_positions, tile_size = math.prod(sizes), plan.tile_size

    def tiles(x, features):
        return _to_tiles(x.reshape(batch, num_positions, heads, features), plan, batch, heads)

    q_t, k_t, v_t = tiles(q, dk), tiles(k, dk), tiles(v, dv)
    s_t, m_t = tiles(source, ndim), tiles(mark, ndim)
    t_t = tiles(transition, ndim * ndim).unflatten(-1, (ndim, ndim))

    phi, weights = _transfer(plan, s_t, t_t, m_t)
    y = (weights[..., :tile_size] * (q_t @ k_t.transpose(-1, -2))) @ v_t

    if plan.num_tiles > 1:
        groups, border = batch * heads, plan.num_border
        exits = phi.flatten(1, 2).index_select(1, plan.exits)  # (R, E, P_t + E)
        # sum_s phi[e, s] k_s v_s^T as K^T (phi_e * V): no (R, P_t, Dk, Dv) outer products
        exit_local = k_t.transpose(-1, -2)[:, None] @ (exits[..., :tile_size, None] * v_t[:, None])
        c_in = _across_tiles(
            plan,
            exit_local.reshape(groups, plan.num_tiles, border, dk * dv),
            exits[..., tile_size:].reshape(groups, plan.num_tiles, border, border),
            groups,
        ).reshape(-1, border, dk, dv)
        q_c = q_t[:, None] @ c_in  # (R, E, P_t, Dv): q_p^T C_j
        y = y + (weights[..., tile_size:].transpose(1, 2)[..., None] * q_c).sum(1)

    y = _from_tiles(y, plan, batch, heads).reshape(batch, *sizes, heads, dv)
    if direct is not None:
        y = y + direct[..., None] * (q * k).sum(-1, keepdim=True) * v
    return scale * y
