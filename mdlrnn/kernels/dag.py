"""Triton kernels for the two recurrences of dag_scan (mdlrnn.ops.dag.level.DagScan does the rest).

One launch per recurrence. Every element (i, j) of a state C_e is an independent scalar recurrence, so
programs split the work by head and by a (BLOCK_K, BLOCK_V) block of the state and never talk to each
other; each program walks the levels in order, and within a level a block of BLOCK_E edges at a time, as a
(BLOCK_E, BLOCK_K * BLOCK_V) tile (the state block flattened: 2D tiles compile on every Triton version).
The line edges entering a block's edges are read through CSR offsets (loop to the block's largest
in-degree, masked), so no atomics are needed and the result is deterministic.
A barrier between levels makes a level's stores visible to the program's threads before the next reads them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import cdiv, next_power_of_2, on_device


@triton.jit
def _neighbour(T, LINE_ID, POSITION, TENSOR, line, carries, h, H, DK, DV, tile_offset, tile):
    """For a step of line edges (masked by `carries`): their transitions T[LINE_ID[line], h] and the tile of
    TENSOR (states or adjoints) at the neighbouring sorted positions POSITION[line]."""
    # lanes that carry nothing read line edge 0 (one exists whenever a lane carries) and are zeroed: masked
    # loads of indices trip a layout pass of Triton 3.6 ("mask type matches ptr type") for some tile shapes
    line = tl.where(carries, line, 0)
    t = tl.where(carries, tl.load(T + tl.load(LINE_ID + line) * H + h), 0.0)
    row = tl.load(POSITION + line) * H + h
    x = tl.load(TENSOR + row[:, None] * (DK * DV) + tile_offset[None, :], mask=carries[:, None] & tile[None, :], other=0.0)
    return t, x


@triton.jit
def _state_block(DK, DV, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """This program's (BLOCK_K, BLOCK_V) block of a state, flattened: the row and column of each element,
    whether it lies inside (Dk, Dv), and its offset in a row-major state."""
    ik = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K * BLOCK_V) // BLOCK_V
    jv = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_K * BLOCK_V) % BLOCK_V
    return ik, jv, (ik < DK) & (jv < DV), ik * DV + jv


@triton.jit
def _entries(PTR, pos, edge, stop):
    """CSR start and length of the line edges of each position (length 0 past the level's end)."""
    safe = tl.minimum(pos, stop - 1)  # unmasked, in-range reads (see _neighbour)
    lo = tl.load(PTR + safe)
    return lo, tl.where(edge, tl.load(PTR + safe + 1) - lo, 0)


@triton.jit(do_not_specialize=["num_levels", "H", "DK", "DV"])  # one compilation for every graph
def _states_kernel(K_SRC, V_SRC, T, STATES, EDGE_BOUNDS, IN_PTR, LINE_BY_OUT, FWD_IN, num_levels, H, DK, DV,
                   BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """C[p] = S k v^T (pre-multiplied, at sorted position p) + sum over entering line edges T_j C[p_in]."""
    h = tl.program_id(0)
    ik, jv, tile, tile_offset = _state_block(DK, DV, BLOCK_K, BLOCK_V)
    for level in range(num_levels):
        start = tl.load(EDGE_BOUNDS + level)
        stop = tl.load(EDGE_BOUNDS + level + 1)
        for first in range(start, stop, BLOCK_E):
            pos = first + tl.arange(0, BLOCK_E)
            edge = pos < stop
            row = pos * H + h
            inside = edge[:, None] & tile[None, :]
            k = tl.load(K_SRC + row[:, None] * DK + ik[None, :], mask=inside, other=0.0)
            v = tl.load(V_SRC + row[:, None] * DV + jv[None, :], mask=inside, other=0.0)
            acc = k * v
            lo, count = _entries(IN_PTR, pos, edge, stop)
            for step in range(tl.max(count, 0)):
                carries = step < count
                t, c = _neighbour(T, LINE_BY_OUT, FWD_IN, STATES, lo + step, carries, h, H, DK, DV, tile_offset, tile)
                acc += t[:, None] * c
            tl.store(STATES + row[:, None] * (DK * DV) + tile_offset[None, :], acc, mask=inside)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["num_levels", "H", "DK", "DV", "NUM_BLOCKS"])
def _adjoint_kernel(ADJ, T, STATES, D_T, EDGE_BOUNDS, OUT_PTR, LINE_BY_IN, BWD_OUT, num_levels, H, DK, DV, NUM_BLOCKS,
                    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """dC[p] += sum over leaving line edges T_j dC[p_out] (levels in reverse), and each dT_j's share of
    this program's block of the state, <dC[p_out], C[p]> restricted to it, in D_T[j, h, block]."""
    h = tl.program_id(0)
    _, _, tile, tile_offset = _state_block(DK, DV, BLOCK_K, BLOCK_V)
    for back in range(num_levels):
        level = num_levels - 1 - back
        start = tl.load(EDGE_BOUNDS + level)
        stop = tl.load(EDGE_BOUNDS + level + 1)
        for first in range(start, stop, BLOCK_E):
            pos = first + tl.arange(0, BLOCK_E)
            edge = pos < stop
            where = (pos * H + h)[:, None] * (DK * DV) + tile_offset[None, :]
            inside = edge[:, None] & tile[None, :]
            lo, count = _entries(OUT_PTR, pos, edge, stop)
            if tl.max(count, 0) > 0:
                acc = tl.load(ADJ + where, mask=inside, other=0.0)
                c = tl.load(STATES + where, mask=inside, other=0.0)
                for step in range(tl.max(count, 0)):
                    carries = step < count
                    line = lo + step
                    t, a = _neighbour(T, LINE_BY_IN, BWD_OUT, ADJ, line, carries, h, H, DK, DV, tile_offset, tile)
                    d_t = tl.sum(a * c, 1)
                    block = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
                    tl.store(D_T + (line * H + h) * NUM_BLOCKS + block, d_t, mask=carries)
                    acc += t[:, None] * a
                tl.store(ADJ + where, acc, mask=inside)
        tl.debug_barrier()


def _launch(heads: int, dk: int, dv: int, device: torch.device) -> tuple[tuple[int, int, int], dict]:
    """Grid and tile sizes: state blocks of up to 16 x 16, halved on a GPU until there are programs for most
    of its multiprocessors (the interpreter runs programs one by one), and as many edges per step as keep a
    tile near 2048 elements."""
    block_k, block_v = min(next_power_of_2(dk), 16), min(next_power_of_2(dv), 16)
    while device.type == "cuda" and heads * cdiv(dk, block_k) * cdiv(dv, block_v) < 128 and max(block_k, block_v) > 4:
        if block_k >= block_v:
            block_k //= 2
        else:
            block_v //= 2
    block_e = max(1, min(128, 2048 // (block_k * block_v)))
    grid = (heads, cdiv(dk, block_k), cdiv(dv, block_v))
    return grid, dict(BLOCK_E=block_e, BLOCK_K=block_k, BLOCK_V=block_v)


class TritonScanner:
    """The recurrences of mdlrnn.ops.dag.level.TorchScanner as two Triton kernels (same contracts)."""

    @staticmethod
    def states(k_src, v_src, transition, graph):
        edges, heads, dk = k_src.shape
        dv = v_src.shape[-1]
        states = k_src.new_empty(edges, heads, dk, dv)
        if edges == 0:
            return states
        grid, blocks = _launch(heads, dk, dv, states.device)
        with on_device(states.device):
            _states_kernel[grid](k_src.contiguous(), v_src.contiguous(), transition.contiguous(), states,
                                 graph.level_ptr, graph.line_out_ptr, graph.line_by_out, graph.fwd_in,
                                 graph.num_levels, heads, dk, dv, **blocks)
        return states

    @staticmethod
    def adjoint(adjoint, transition, states, graph):
        edges, heads, dk, dv = states.shape
        grid, blocks = _launch(heads, dk, dv, states.device)
        d_t = adjoint.new_zeros(graph.num_line_edges, heads, grid[1] * grid[2])
        adjoint = adjoint.contiguous()
        if edges:
            with on_device(states.device):
                _adjoint_kernel[grid](adjoint, transition.contiguous(), states, d_t, graph.level_ptr,
                                      graph.line_in_ptr, graph.line_by_in, graph.bwd_out,
                                      graph.num_levels, heads, dk, dv, grid[1] * grid[2], **blocks)
        return adjoint, d_t.sum(-1)


def dag_scan_triton(q, k, v, source, transition, mark, direct, graph, scale: float) -> torch.Tensor:
    from ..ops.dag.level import DagScan

    return DagScan.apply(q, k, v, source, transition, mark, direct, graph, scale, TritonScanner)
