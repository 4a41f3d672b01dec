"""Parallel PyTorch grid scan: tiles with an intra-tile transfer matrix and border states passed between tiles.

Inside a tile every state is a linear function of the tile's own keys/values and of the states on the
border edges entering it. Those scalar weights (phi, one row of length P_t + E per edge) solve one unit
lower-triangular system over the tile's edges, for all tiles at once. Everything with Dk x Dv states is
then a few batched matrix products:

    y_intra  = (G_local * Q K^T) V                      the masked, quadratic form inside a tile
    C_exit   = phi_exit,local K (x) V + phi_exit,border C_enter
    y_border = q_p^T sum_j G[p, j] C_enter,j

and the only loop runs over the tile grid's hyperplanes, as one autograd op whose backward is the
adjoint scan. Memory stays linear in the number of positions.
"""

from __future__ import annotations

import torch

from .._checks import first_order_only
from .._tables import device_tables
from .plan import TilePlan, tile_plan, tile_shape


def _to_tiles(x: torch.Tensor, plan: TilePlan, batch: int, heads: int) -> torch.Tensor:
    """(B, P, H, F) -> (T * B * H, P_t, F): tiles outermost; tiles and positions inside in wavefront order."""
    features = x.shape[-1]
    x = x.index_select(1, plan.gather)
    x = x.view(batch, plan.num_tiles, plan.tile_size, heads, features).permute(1, 0, 3, 2, 4)
    return x.reshape(plan.num_tiles * batch * heads, plan.tile_size, features)


def _from_tiles(y: torch.Tensor, plan: TilePlan, batch: int, heads: int) -> torch.Tensor:
    """(T * B * H, P_t, F) -> (B, P, H, F), padding dropped."""
    features = y.shape[-1]
    y = y.view(plan.num_tiles, batch, heads, plan.tile_size, features).permute(1, 0, 3, 2, 4)
    return y.reshape(batch, plan.num_tiles * plan.tile_size, heads, features).index_select(1, plan.scatter)


def gather_tiles(plan: TilePlan, q, k, v, source, transition, mark, direct):
    """q, k, v, S, M, T (flattened to N * N) and D (or None) of every tile, (T * B * H, P_t, F) each: one gather for
    q, k, v and one for the gates."""
    batch, heads = q.shape[0], q.shape[-2]

    def gather(parts):
        widths = [x.shape[-1] for x in parts]
        joined = torch.cat([x.reshape(batch, -1, heads, x.shape[-1]) for x in parts], -1)
        return _to_tiles(joined, plan, batch, heads).split(widths, -1)

    gates = gather([source, mark, transition.flatten(-2)] + ([] if direct is None else [direct[..., None]]))
    return (*gather([q, k, v]), *gates[:3], gates[3] if direct is not None else None)


def _transfer(plan: TilePlan, source, transition, mark, direct):
    """phi (R, P_t, N, P_t + E) and G (R, P_t, P_t + E) for every tile.

    phi[p, a] weighs each local source and each entering border edge in the state leaving p along a;
    G[p] weighs them in the marked sum that q_p reads, and G[p, p] = D[p] (direct may be None).
    phi = L phi + rhs is unit lower-triangular and L links consecutive hyperplanes only:
    phi_d = rhs_d + L_d phi_{d-1}, one batched product per hyperplane (one triangular solve for long 1D chunks).
    """
    rows, size, ndim = source.shape[0], plan.tile_size, source.shape[-1]
    edges, width = size * ndim, size + plan.num_border
    values = [source, transition, mark] + ([] if direct is None else [direct])
    placement = plan.gates if direct is None else plan.gates_direct
    gates = torch.cat([x.flatten(1) for x in values], 1)
    dense = gates.new_zeros(rows, sum(plan.sections))
    dense.index_copy_(1, placement.target, gates.index_select(1, placement.source))
    *lower, rhs, mark_lower, mark_border = dense.split(plan.sections, 1)
    rhs = rhs.view(rows, edges, width)
    if plan.blocks is None:
        # unitriangular: the diagonal (zero here) is taken as one, giving I - L
        phi = torch.linalg.solve_triangular(-lower[0].view(rows, edges, edges), rhs, upper=False, unitriangular=True)
    else:
        parts = rhs.split(plan.blocks, 1)
        phis = [parts[0]]
        for d, block in enumerate(lower, 1):
            phis.append(torch.baddbmm(parts[d], block.view(rows, plan.blocks[d], plan.blocks[d - 1]), phis[-1]))
        phi = torch.cat(phis, 1)
    # G = M_lower phi + M_border: marks of inner edges read phi, marks of border edges their own column
    weights = torch.baddbmm(mark_border.view(rows, size, width), mark_lower.view(rows, size, edges), phi)
    return phi.view(rows, size, ndim, width), weights


@torch.compiler.disable
@device_tables
def _entering_rows(plan: TilePlan, groups: int, border: int) -> tuple[torch.Tensor | None, ...]:
    """Per step, the row of each entering border state (tile, group, edge) in the flattened exit states of
    all tiles, whose last row (index T * G * E) stays zero for edges entering from outside the grid."""
    zero_row = plan.num_tiles * groups * border
    rows, prev_start = [], 0
    for step in plan.across:
        if step.start == 0:
            rows.append(None)
        else:
            tile = step.from_tile + prev_start  # (L, E) wavefront rank of the source tile, or < prev_start
            group = torch.arange(groups, device=tile.device)[None, :, None]
            edge = torch.arange(border, device=tile.device)
            flat = (tile[:, None, :] * groups + group) * border + edge
            rows.append(torch.where(step.from_tile[:, None, :] >= 0, flat, zero_row).reshape(-1))
        prev_start = step.start
    return tuple(rows)


class TorchAcross:
    """The scan across tiles as a Python loop over the tile grid's hyperplanes (a few launches each)."""

    @staticmethod
    def states(exit_local, exit_border, plan):
        """C_enter (T, G, E, F) of every tile: C_exit = A C_enter + U, hyperplane after hyperplane."""
        tiles, groups, border, features = exit_local.shape
        all_rows = _entering_rows(plan, groups, border)
        # exits start as U and gain A C_enter in place, hyperplane by hyperplane; the appended zero row is
        # what edges from outside the grid read, and nothing enters the first hyperplane
        exits = torch.cat([exit_local.reshape(-1, features), exit_local.new_zeros(1, features)])
        entering = torch.empty_like(exit_local)
        for step, rows in zip(plan.across, all_rows):
            span = slice(step.start, step.stop)
            if rows is None:
                entering[span].zero_()
                continue
            torch.index_select(exits, 0, rows, out=entering[span].view(-1, features))
            out = exits[step.start * groups * border : step.stop * groups * border].view(-1, border, features)
            out.baddbmm_(exit_border[span].flatten(0, 1), entering[span].flatten(0, 1))
        return entering

    @staticmethod
    def adjoint(d_entering, exit_border, entering, plan):
        """dLoss/dU (T, G, E, F) and dLoss/dA (T, G, E, E): dC_enter += A^T dC_exit, scattered back to the exits
        it was gathered from; dA = dC_exit C_enter^T (dC_exit = dU)."""
        tiles, groups, border, features = d_entering.shape
        all_rows = _entering_rows(plan, groups, border)
        d_exits = d_entering.new_zeros(tiles * groups * border + 1, features)
        for step, rows in zip(reversed(plan.across), reversed(all_rows)):
            if rows is None:
                continue
            span = slice(step.start, step.stop)
            d_out = d_exits[step.start * groups * border : step.stop * groups * border].view(-1, border, features)
            d_in = torch.baddbmm(d_entering[span].flatten(0, 1), exit_border[span].flatten(0, 1).transpose(1, 2), d_out)
            d_exits.index_add_(0, rows, d_in.view(-1, features))
        d_local = d_exits[:-1].view_as(d_entering)
        d_border = d_local.flatten(0, 1) @ entering.flatten(0, 1).transpose(1, 2)
        return d_local, d_border.view_as(exit_border)


class AcrossTiles(torch.autograd.Function):
    """Border states entering every tile: C_exit = A C_enter + U, tile hyperplane after hyperplane.

    exit_local: (T, G, E, F) the U term; exit_border: (T, G, E, E) the A term. Returns C_enter (T, G, E, F).
    Written as one op with the adjoint scan as its backward, so states live in two buffers instead of
    per-step autograd nodes. 2D grids on the GPU take mdlrnn.kernels.across instead (two Triton kernels, one
    program per group and feature block walking all tiles).
    """

    @staticmethod
    def forward(ctx, exit_local, exit_border, plan):
        entering = TorchAcross.states(exit_local, exit_border, plan)
        ctx.save_for_backward(exit_border, entering)
        ctx.plan = plan
        return entering

    @staticmethod
    def backward(ctx, d_entering):
        first_order_only("grid_scan")
        exit_border, entering = ctx.saved_tensors
        with torch.autocast(d_entering.device.type, enabled=False):  # backward under autocast: stay in float32
            d_local, d_border = TorchAcross.adjoint(d_entering, exit_border, entering, ctx.plan)
        return d_local, d_border, None


class TorchTiles:
    """The matrix-valued work of the tile path as batched torch products (the Triton version:
    mdlrnn.kernels.tiles.TritonTiles). `tile` picks the tile shape."""

    tile = staticmethod(tile_shape)

    @staticmethod
    def transfer(plan, source, transition, mark, direct):
        """X (R, E, P_t + E), the exit edges' rows of phi, and W (R, P_t, P_t + E): see _transfer."""
        phi, weights = _transfer(plan, source, transition, mark, direct)
        return phi.flatten(1, 2).index_select(1, plan.exits), weights

    @staticmethod
    def exits(k_t, v_t, exits):
        """U (R, E, Dk, Dv): sum_s X[e, s] k_s v_s^T, all e in one product (R, E * Dk, P_t) @ (R, P_t, Dv)."""
        rows, size, dk = k_t.shape
        weighted_keys = exits[..., None, :size] * k_t.transpose(1, 2)[:, None]
        return (weighted_keys.reshape(rows, -1, size) @ v_t).view(rows, exits.shape[1], dk, v_t.shape[-1])

    @staticmethod
    def readout(q_t, k_t, v_t, weights, c_in):
        """y (R, P_t, Dv) = (W_local * Q K^T) V + q_p^T sum_j W[p, P_t + j] C_j (c_in (R, E, Dk, Dv) or None)."""
        rows, size, dk = q_t.shape
        y = (weights[..., :size] * (q_t @ k_t.transpose(-1, -2))) @ v_t  # direct term on the diagonal
        if c_in is None:
            return y
        border, dv = c_in.shape[1], c_in.shape[-1]
        # contracting first over whichever of Dk and E is smaller
        if dk < border:
            marked = (weights[..., size:] @ c_in.view(rows, border, dk * dv)).view(rows, size, dk, dv)
            return y + (q_t[..., :, None] * marked).sum(-2)
        if dv > size:  # q_p^T C_j as (R, E, P_t, Dv): broadcasting q moves less than transposing C
            q_c = q_t[:, None] @ c_in
            return y + (weights[..., size:].transpose(1, 2)[..., None] * q_c).sum(1)
        q_c = q_t @ c_in.transpose(1, 2).reshape(rows, dk, border * dv)  # (R, P_t, E * Dv), one product per tile
        return y + (weights[..., size:, None] * q_c.view(rows, size, border, dv)).sum(2)


def grid_scan_torch(q, k, v, source, transition, mark, direct, scale: float, tiles=TorchTiles) -> torch.Tensor:
    """The tile path; `tiles` does its matrix-valued work (TorchTiles, or the Triton TritonTiles).

    q, k, v share a dtype and the gates share one; the output has the dtype of the tiles' products."""
    batch, *sizes, heads, dk = q.shape
    dv, ndim = v.shape[-1], len(sizes)
    plan = tile_plan(tuple(sizes), q.device, tiles.tile(tuple(sizes)))
    tile_size = plan.tile_size
    q_t, k_t, v_t, s_t, m_t, t_t, d_t = gather_tiles(plan, q, k, v, source, transition, mark, direct)
    exits, weights = tiles.transfer(plan, s_t, t_t.unflatten(-1, (ndim, ndim)), m_t, d_t)
    c_in = None
    if plan.num_tiles > 1:
        tiles_by_group, border = (plan.num_tiles, batch * heads), plan.num_border
        c_in = AcrossTiles.apply(
            tiles.exits(k_t, v_t, exits).view(*tiles_by_group, border, dk * dv),
            exits[..., tile_size:].reshape(*tiles_by_group, border, border),
            plan,
        ).view(-1, border, dk, dv)
    y = tiles.readout(q_t, k_t, v_t, weights, c_in)
    return scale * _from_tiles(y, plan, batch, heads).reshape(batch, *sizes, heads, dv)
