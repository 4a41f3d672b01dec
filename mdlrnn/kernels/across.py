"""Triton kernels for the scan across tiles of grid_scan's tile path (N >= 2): C_exit = A C_enter + U.

The torch path (mdlrnn.ops.grid.chunk.TorchAcross) runs this as a Python loop over the tile grid's
hyperplanes, a few kernel launches per hyperplane, forward and backward. Here each direction is one launch.
Every feature column of a state is an independent recurrence, so programs split the work by group
(batch x head) and by a block of BLOCK_F features and never talk to each other; each program walks the
hyperplanes in order with a barrier between phases, a block of BLOCK_R (tile, border edge) rows at a time.
Every exit state is read by at most one entering edge (the neighbour tile along its axis), so the adjoint
is scattered back with plain stores.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from . import on_device


@triton.jit(do_not_specialize=["num_steps", "G", "E", "F"])
def _across_kernel(EXITS, ENTERING, A, SOURCE, BOUNDS, num_steps, G, E, F,
                   BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """EXITS (T, G, E, F) holds U and becomes C_exit; ENTERING (T, G, E, F) gets C_enter; A (T, G, E, E);
    SOURCE (T, E): the tile each border edge enters from, or -1; BOUNDS: the tile range of each hyperplane."""
    g = tl.program_id(0).to(tl.int64)  # int64 offsets: (T, G, E, F) buffers pass 2^31 elements on large grids
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    col_mask = cols < F
    for step in range(num_steps):
        first, last = tl.load(BOUNDS + step) * E, tl.load(BOUNDS + step + 1) * E
        # C_enter[t, e] = C_exit[source(t, e), e], zero from outside the grid
        for block in range(first, last, BLOCK_R):
            rows = block + tl.arange(0, BLOCK_R)
            inside = rows < last
            tile, edge = rows // E, rows % E
            source = tl.load(SOURCE + tl.minimum(rows, last - 1))  # unmasked index loads (see kernels/dag.py)
            read = inside & (source >= 0)
            src_row = (tl.where(read, source, 0) * G + g) * E + edge
            c = tl.load(EXITS + src_row[:, None] * F + cols[None, :], mask=read[:, None] & col_mask[None, :], other=0.0)
            tl.store(ENTERING + ((tile * G + g) * E + edge)[:, None] * F + cols[None, :], c,
                     mask=inside[:, None] & col_mask[None, :])
        tl.debug_barrier()
        # C_exit[t, e'] = U[t, e'] + sum_e A[t, e', e] C_enter[t, e]
        for block in range(first, last, BLOCK_R):
            rows = block + tl.arange(0, BLOCK_R)
            inside = rows < last
            tile, edge = rows // E, rows % E
            mask = inside[:, None] & col_mask[None, :]
            own = ((tile * G + g) * E + edge)[:, None] * F + cols[None, :]
            acc = tl.load(EXITS + own, mask=mask, other=0.0)
            for e in range(E):
                a = tl.load(A + ((tile * G + g) * E + edge) * E + e, mask=inside, other=0.0)
                c = tl.load(ENTERING + ((tile * G + g) * E + e)[:, None] * F + cols[None, :], mask=mask, other=0.0)
                acc += a[:, None] * c
            tl.store(EXITS + own, acc, mask=mask)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["num_steps", "G", "E", "F"])
def _across_adjoint_kernel(D_EXITS, D_ENTERING, A, SOURCE, BOUNDS, num_steps, G, E, F,
                           BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """Hyperplanes in reverse: dC_enter[t, e] = d_entering[t, e] + sum_e' A[t, e', e] dC_exit[t, e'], stored as
    dC_exit of the source tile. D_EXITS (T, G, E, F) starts at zero and ends as dLoss/dU."""
    g = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    col_mask = cols < F
    for back in range(num_steps):
        step = num_steps - 1 - back
        first, last = tl.load(BOUNDS + step) * E, tl.load(BOUNDS + step + 1) * E
        for block in range(first, last, BLOCK_R):
            rows = block + tl.arange(0, BLOCK_R)
            inside = rows < last
            tile, edge = rows // E, rows % E
            mask = inside[:, None] & col_mask[None, :]
            acc = tl.load(D_ENTERING + ((tile * G + g) * E + edge)[:, None] * F + cols[None, :], mask=mask, other=0.0)
            for e_out in range(E):
                a = tl.load(A + ((tile * G + g) * E + e_out) * E + edge, mask=inside, other=0.0)
                d = tl.load(D_EXITS + ((tile * G + g) * E + e_out)[:, None] * F + cols[None, :], mask=mask, other=0.0)
                acc += a[:, None] * d
            source = tl.load(SOURCE + tl.minimum(rows, last - 1))
            write = inside & (source >= 0)
            dst_row = (tl.where(write, source, 0) * G + g) * E + edge
            tl.store(D_EXITS + dst_row[:, None] * F + cols[None, :], acc, mask=write[:, None] & col_mask[None, :])
        tl.debug_barrier()


@lru_cache(maxsize=256)
def _sources(plan) -> tuple[torch.Tensor, torch.Tensor]:
    """SOURCE (T * E,) the absolute wavefront rank of the tile each border edge enters from (-1: outside the
    grid) and BOUNDS (steps + 1,) the first tile of each hyperplane, for a TilePlan."""
    parts, bounds, prev_start = [], [0], 0
    for step in plan.across:
        ranks = step.from_tile + prev_start  # from_tile counts within the previous hyperplane
        parts.append(torch.where(step.from_tile >= 0, ranks, -1).reshape(-1))
        bounds.append(step.stop)
        prev_start = step.start
    device = plan.exits.device
    return torch.cat(parts).to(device, torch.int64), torch.tensor(bounds, device=device, dtype=torch.int32)


def _launch(kernel, states, other, exit_border, plan) -> None:
    tiles, groups, border, features = states.shape
    source, bounds = _sources(plan)
    block_f = min(128, triton.next_power_of_2(features))
    block_r = max(16, min(128, triton.next_power_of_2(4096 // block_f)))
    with on_device(states.device):
        kernel[(groups, triton.cdiv(features, block_f))](
            states, other, exit_border, source, bounds, len(plan.across), groups, border, features,
            BLOCK_R=block_r, BLOCK_F=block_f)


class TritonAcross:
    """mdlrnn.ops.grid.chunk.TorchAcross as one kernel launch per direction (same contracts)."""

    @staticmethod
    def states(exit_local, exit_border, plan):
        exits = exit_local.contiguous().clone()
        entering = torch.empty_like(exits)
        _launch(_across_kernel, exits, entering, exit_border.contiguous(), plan)
        return entering

    @staticmethod
    def adjoint(d_entering, exit_border, plan):
        d_local = torch.zeros_like(d_entering)
        _launch(_across_adjoint_kernel, d_local, d_entering.contiguous(), exit_border.contiguous(), plan)
        return d_local
