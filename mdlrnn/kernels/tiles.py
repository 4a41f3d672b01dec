r"""Triton kernels for the matrix-valued work of grid_scan's tile path (N >= 2), forward and backward.

The tile path (mdlrnn.ops.grid.chunk) gets, per tile row r (tile x orientation x batch x head), scalar weights from one
small triangular system: W (P, P + E), what each position reads from each local source and each entering
border edge (the direct weight on its diagonal), and X (E, P + E), what each exit edge gets from them. Two
kernels do the rest without materialising anything per (position, border edge, Dk, Dv):

    readout: y_p   = sum_s W[p, s] (q_p . k_s) v_s + sum_j W[p, P + j] q_p^T C_j      (C_j entering border states)
    exits:   U_e   = sum_s X[e, s] k_s v_s^T                                           (the local part of C_exit)

Positions inside a tile are in wavefront order, so W[p, s] = 0 for s after p: the readout's loop over
sources stops at the query block. Products run on tensor cores in the inputs' dtype (float32 inputs: three
tf32 products, as accurate as float32 ones; see `kernels.dot_precision`), accumulate in float32; weights and
states are float32, and products with states (or their adjoints) take float32 operands (tf32 for half inputs),
which keeps bfloat16 gradients of the gates within 1e-2 on 64x64 grids.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..ops._tables import device_tables
from ..ops.grid.chunk import TorchTiles
from ..ops.grid.plan import tile_shape, wavefront
from . import cdiv, dot_precision, empty, next_power_of_2, on_device, shared_memory


@triton.jit
def _row(r, NO, NB, NH):
    """Tile row r = ((t * O + o) * B + b) * H + h: its tile t, orientation o, batch b and head h."""
    h = r % NH
    b = (r // NH) % NB
    o = (r // (NH * NB)) % NO
    return r // (NH * NB * NO), o, b, h


@triton.jit
def _slots(SLOT, t, o, NT, P, idx, idx_ok):
    """Grid positions of tile slots idx of tile t in orientation o (0 in padding) and which slots hold one."""
    pos = tl.load(SLOT + (o * NT + t) * P + idx, mask=idx_ok, other=-1)
    return tl.maximum(pos, 0).to(tl.int64), pos >= 0


@triton.jit
def _dense(o, b, h, pos, N, NO, NH, F):
    """Offsets of positions pos in a contiguous (B, N, O, H, F) tensor."""
    return (((b * N + pos) * NO + o) * NH + h) * F


@triton.jit
def _block_of(X, base, pos, s_pos, ok, feats, feats_ok):
    """X[base + pos * s_pos + feats] for a block of positions (zero where masked; unit feature stride)."""
    return tl.load(X + base + pos[:, None] * s_pos + feats[None, :], mask=ok[:, None] & feats_ok[None, :], other=0.0)


@triton.jit
def _source_block(K, V, SLOT, w_rows, t, o, k_base, k_p, v_base, v_p, start, NT, P, row_ok, dks, dk_ok, dvs, dv_ok,
                  BS: tl.constexpr):
    """k, v of source slots start:start + BS and the read-out weights W[rows, sources]."""
    cols = start + tl.arange(0, BS)
    col_ok = cols < P
    pos, real = _slots(SLOT, t, o, NT, P, cols, col_ok)
    k = _block_of(K, k_base, pos, k_p, real, dks, dk_ok)
    v = _block_of(V, v_base, pos, v_p, real, dvs, dv_ok)
    return k, v, tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _entering_row(SOURCE, r, t, j, G, E):
    """Whether a state enters edge j of tile row r (tile t, G rows a tile), not from outside the grid, and the row of
    the exit states it is: r + (SOURCE[t, j] - t) G, that of the tile it comes from."""
    src = tl.load(SOURCE + t * E + j)
    return src >= 0, r + (src - t) * G


@triton.jit
def _border_state(C, w_rows, row, j, P, E, DK, DV, row_ok, dks, dk_ok, dvs, dv_ok):
    """State j of row `row` of C (float32) and the read-out weights W[rows, P + j] as a column."""
    c = tl.load(C + ((row * E + j) * DK + dks[:, None]) * DV + dvs[None, :], mask=dk_ok[:, None] & dv_ok[None, :],
                other=0.0)
    return c, tl.load(w_rows + P + j, mask=row_ok[:, None], other=0.0)


@triton.jit
def _own_sources(K, V, SLOT, k_b, k_h, k_p, v_b, v_h, v_p, NT, NO, NB, NH, P, DK, DV,
                 BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """A program that owns a block of source slots: its tile row, the row's place, the slots' positions and masks,
    whole head dimensions, k and v."""
    r = tl.program_id(0).to(tl.int64)
    t, o, b, h = _row(r, NO, NB, NH)
    cols = tl.program_id(1) * BS + tl.arange(0, BS)
    pos, real = _slots(SLOT, t, o, NT, P, cols, cols < P)
    dks, dvs = tl.arange(0, BK), tl.arange(0, BV)
    dk_ok, dv_ok = dks < DK, dvs < DV
    k = _block_of(K, b * k_b + h * k_h, pos, k_p, real, dks, dk_ok)
    v = _block_of(V, b * v_b + h * v_h, pos, v_p, real, dvs, dv_ok)
    return r, t, o, b, h, cols, pos, real, dks, dk_ok, dvs, dv_ok, k, v


@triton.jit
def _readout_kernel(Q, K, V, W, C, SOURCE, Y, SLOT, q_b, q_h, q_p, k_b, k_h, k_p, v_b, v_h, v_p, scale,
                    NT, NO, NB, NH, N, P, E, WIDTH, DK, DV, BP: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, HAS_BORDER: tl.constexpr, PRECISION: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    t, o, b, h = _row(r, NO, NB, NH)
    rows = tl.program_id(1) * BP + tl.arange(0, BP)
    dvs = tl.program_id(2) * BV + tl.arange(0, BV)
    dks = tl.arange(0, BK)
    row_ok, dk_ok, dv_ok = rows < P, dks < DK, dvs < DV
    pos, real = _slots(SLOT, t, o, NT, P, rows, row_ok)
    q = _block_of(Q, b * q_b + h * q_h, pos, q_p, real, dks, dk_ok)
    acc = tl.zeros((BP, BV), dtype=tl.float32)
    w_rows = W + r * P * WIDTH + rows[:, None] * WIDTH
    for start in range(0, tl.minimum((tl.program_id(1) + 1) * BP, P), BS):  # sources up to the last query
        k, v, w = _source_block(K, V, SLOT, w_rows, t, o, b * k_b + h * k_h, k_p, b * v_b + h * v_h, v_p, start, NT, P,
                                row_ok, dks, dk_ok, dvs, dv_ok, BS)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * w
        acc = tl.dot(scores.to(v.dtype), v, acc, input_precision=PRECISION)
    if HAS_BORDER:
        q32 = q.to(tl.float32)  # states stay float32 (tf32 products for half inputs)
        for j in range(E):
            enters, row = _entering_row(SOURCE, r, t, j, NO * NB * NH, E)
            if enters:
                c, w_j = _border_state(C, w_rows, row, j, P, E, DK, DV, row_ok, dks, dk_ok, dvs, dv_ok)
                acc = tl.dot(w_j * q32, c, acc, input_precision=PRECISION)  # accumulated in the product
    tl.store(Y + _dense(o, b, h, pos, N, NO, NH, DV)[:, None] + dvs[None, :], scale * acc,
             mask=real[:, None] & dv_ok[None, :])


@triton.jit
def _readout_sources_kernel(Q, K, V, W, DY, DK_, DV_, DW, SLOT, q_b, q_h, q_p, k_b, k_h, k_p, v_b, v_h, v_p,
                            NT, NO, NB, NH, N, P, WIDTH, DK, DV, BP: tl.constexpr, BS: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """Per block of sources s: dk_s, dv_s and dW[:, s] (local columns), over the queries p >= s."""
    r, t, o, b, h, cols, pos_s, real_s, dks, dk_ok, dvs, dv_ok, k, v = _own_sources(
        K, V, SLOT, k_b, k_h, k_p, v_b, v_h, v_p, NT, NO, NB, NH, P, DK, DV, BS, BK, BV)
    dk_acc = tl.zeros((BS, BK), dtype=tl.float32)
    dv_acc = tl.zeros((BS, BV), dtype=tl.float32)
    for start in range(tl.program_id(1) * BS // BP * BP, P, BP):
        rows = start + tl.arange(0, BP)
        row_ok = rows < P
        pos, real = _slots(SLOT, t, o, NT, P, rows, row_ok)
        q = _block_of(Q, b * q_b + h * q_h, pos, q_p, real, dks, dk_ok)
        dy = _block_of(DY, 0, _dense(0, b, h, pos, N, 1, NH, DV), 1, real, dvs, dv_ok).to(q.dtype)
        w_ptrs = W + (r * P + rows[:, None]) * WIDTH + cols[None, :]
        w_mask = row_ok[:, None] & (cols < P)[None, :]
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (q_p . k_s)
        d_scores = tl.dot(dy, tl.trans(v), input_precision=PRECISION)  # (dy_p . v_s)
        tl.store(DW + (r * P + rows[:, None]) * WIDTH + cols[None, :], d_scores * scores, mask=w_mask)
        dv_acc = tl.dot(tl.trans((scores * w).to(q.dtype)), dy, dv_acc, input_precision=PRECISION)
        dk_acc = tl.dot(tl.trans((d_scores * w).to(q.dtype)), q, dk_acc, input_precision=PRECISION)
    tl.store(DK_ + _dense(o, b, h, pos_s, N, NO, NH, DK)[:, None] + dks[None, :], dk_acc,
             mask=real_s[:, None] & dk_ok[None, :])
    tl.store(DV_ + _dense(o, b, h, pos_s, N, NO, NH, DV)[:, None] + dvs[None, :], dv_acc,
             mask=real_s[:, None] & dv_ok[None, :])


@triton.jit
def _readout_queries_kernel(Q, K, V, W, C, SOURCE, DY, DQ, DW, SLOT, q_b, q_h, q_p, k_b, k_h, k_p, v_b, v_h, v_p,
                            NT, NO, NB, NH, N, P, E, WIDTH, DK, DV, BP: tl.constexpr, BS: tl.constexpr,
                            BK: tl.constexpr, BV: tl.constexpr, HAS_BORDER: tl.constexpr, PRECISION: tl.constexpr):
    """Per block of queries p: dq_p, and dW[p, P + j] for the border columns."""
    r = tl.program_id(0).to(tl.int64)
    t, o, b, h = _row(r, NO, NB, NH)
    rows = tl.program_id(1) * BP + tl.arange(0, BP)
    dks, dvs = tl.arange(0, BK), tl.arange(0, BV)
    row_ok, dk_ok, dv_ok = rows < P, dks < DK, dvs < DV
    pos, real = _slots(SLOT, t, o, NT, P, rows, row_ok)
    q = _block_of(Q, b * q_b + h * q_h, pos, q_p, real, dks, dk_ok)
    dy32 = _block_of(DY, 0, _dense(0, b, h, pos, N, 1, NH, DV), 1, real, dvs, dv_ok)  # zero in padding
    dy = dy32.to(q.dtype)
    dq = tl.zeros((BP, BK), dtype=tl.float32)
    w_rows = W + (r * P + rows[:, None]) * WIDTH
    for start in range(0, tl.minimum((tl.program_id(1) + 1) * BP, P), BS):
        k, v, w = _source_block(K, V, SLOT, w_rows, t, o, b * k_b + h * k_h, k_p, b * v_b + h * v_h, v_p, start, NT, P,
                                row_ok, dks, dk_ok, dvs, dv_ok, BS)
        d_scores = tl.dot(dy, tl.trans(v), input_precision=PRECISION) * w
        dq = tl.dot(d_scores.to(q.dtype), k, dq, input_precision=PRECISION)
    if HAS_BORDER:
        q32 = q.to(tl.float32)
        for j in range(E):  # dW[p, P + j] stays zero where no state enters
            enters, row = _entering_row(SOURCE, r, t, j, NO * NB * NH, E)
            if enters:
                c, w_j = _border_state(C, w_rows, row, j, P, E, DK, DV, row_ok, dks, dk_ok, dvs, dv_ok)
                read = tl.dot(q32, c, input_precision=PRECISION)  # q_p^T C_j
                tl.store(DW + (r * P + rows) * WIDTH + P + j, tl.sum(read * dy32, 1), mask=row_ok)
                dq = tl.dot(w_j * dy32, tl.trans(c), dq, input_precision=PRECISION)
    tl.store(DQ + _dense(o, b, h, pos, N, NO, NH, DK)[:, None] + dks[None, :], dq, mask=real[:, None] & dk_ok[None, :])


@triton.jit
def _outer_sums_kernel(A, B, WT, OUT, SLOT, a_b, a_h, a_p, b_b, b_h, b_p, w_r, w_e, w_s, NT, NO, NB, NH, P, E, DA, DB,
                       BS: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, G: tl.constexpr,
                       PRECISION: tl.constexpr):
    """OUT[r, e] = sum_s WT[r, e, s] a_s b_s^T (DA x DB, float32) for G edges e and a block of DB: the states leaving
    a tile (a = k, b = v, WT = X) and the adjoint of those entering it (a = q, b = dy, WT = W's border columns).
    One product per block of sources: the G weighted copies of a^T stacked into (G DA) rows against b, so that a
    and b are read once for G edges."""
    r = tl.program_id(0).to(tl.int64)
    t, o, bt, h = _row(r, NO, NB, NH)
    es = tl.program_id(1) * G + tl.arange(0, G)
    das = tl.arange(0, BA)
    dbs = tl.program_id(2) * BB + tl.arange(0, BB)
    e_ok, da_ok, db_ok = es < E, das < DA, dbs < DB
    acc = tl.zeros((G * BA, BB), dtype=tl.float32)
    for start in range(0, P, BS):
        cols = start + tl.arange(0, BS)
        col_ok = cols < P
        pos, real = _slots(SLOT, t, o, NT, P, cols, col_ok)
        a = _block_of(A, bt * a_b + h * a_h, pos, a_p, real, das, da_ok)
        b = _block_of(B, bt * b_b + h * b_h, pos, b_p, real, dbs, db_ok).to(a.dtype)
        w = tl.load(WT + r * w_r + es[:, None] * w_e + cols[None, :] * w_s, mask=e_ok[:, None] & col_ok[None, :],
                    other=0.0)
        stacked = tl.reshape(tl.trans(a)[None, :, :] * w[:, None, :], (G * BA, BS))  # row g BA + c: a[:, c] w_g
        acc = tl.dot(stacked.to(a.dtype), b, acc, input_precision=PRECISION)
    out = OUT + ((r * E + es[:, None, None]) * DA + das[None, :, None]) * DB + dbs[None, None, :]
    tl.store(out, tl.reshape(acc, (G, BA, BB)), mask=e_ok[:, None, None] & da_ok[None, :, None] & db_ok[None, None, :])


@triton.jit
def _exits_backward_kernel(K, V, X, DU, DK_, DV_, DX, SLOT, k_b, k_h, k_p, v_b, v_h, v_p, NT, NO, NB, NH, N, P, E,
                           WIDTH, DK, DV, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr):
    """Per block of sources s: dk_s, dv_s (added to DK_, DV_ if ACCUMULATE) and dX[:, s], over every exit edge."""
    r, t, o, b, h, cols, pos, real, dks, dk_ok, dvs, dv_ok, k, v = _own_sources(
        K, V, SLOT, k_b, k_h, k_p, v_b, v_h, v_p, NT, NO, NB, NH, P, DK, DV, BS, BK, BV)
    col_ok = cols < P
    dk_acc = tl.zeros((BS, BK), dtype=tl.float32)
    dv_acc = tl.zeros((BS, BV), dtype=tl.float32)
    du_ptrs = DU + r * E * DK * DV + dks[:, None] * DV + dvs[None, :]
    k, v = k.to(tl.float32), v.to(tl.float32)  # the state adjoints stay float32 (tf32 products for half inputs)
    for e in range(E):
        du = tl.load(du_ptrs + e * DK * DV, mask=dk_ok[:, None] & dv_ok[None, :], other=0.0)
        x = tl.load(X + (r * E + e) * WIDTH + cols, mask=col_ok, other=0.0)
        k_du = tl.dot(k, du, input_precision=PRECISION)  # k_s^T dU_e, (BS, BV)
        tl.store(DX + (r * E + e) * WIDTH + cols, tl.sum(k_du * v, 1), mask=col_ok)
        dv_acc += x[:, None] * k_du
        dk_acc = tl.dot(x[:, None] * v, tl.trans(du), dk_acc, input_precision=PRECISION)
    dk_ptrs = DK_ + _dense(o, b, h, pos, N, NO, NH, DK)[:, None] + dks[None, :]
    dv_ptrs = DV_ + _dense(o, b, h, pos, N, NO, NH, DV)[:, None] + dvs[None, :]
    dk_mask, dv_mask = real[:, None] & dk_ok[None, :], real[:, None] & dv_ok[None, :]
    if ACCUMULATE:  # each real slot is one program's: read-modify-write without atomics
        dk_acc += tl.load(dk_ptrs, mask=dk_mask, other=0.0)
        dv_acc += tl.load(dv_ptrs, mask=dv_mask, other=0.0)
    tl.store(dk_ptrs, dk_acc, mask=dk_mask)
    tl.store(dv_ptrs, dv_acc, mask=dv_mask)


@triton.jit
def _ring(RING, slot, axis, t, BI: tl.constexpr, BC: tl.constexpr):
    """Where rows t (slots of an anti-diagonal) of one axis' edges lie in slot `slot` of a program's two-diagonal
    ring, (2 slots, 2 axes, BI, BC) floats: what the transfer's adjoint passes to the previous diagonal."""
    return RING + ((slot * 2 + axis) * BI + t)[:, None] * BC + tl.arange(0, BC)[None, :]


@triton.jit
def _transfer_rows(PHI, r, i, j, ok, cols, col_ok, P, C1, WIDTH, BORDER: tl.constexpr):
    """What enters position (i, j) of a 2D tile along axis 0 and axis 1 (rows over the columns): the phi row of
    the edge from the neighbour inside the tile, or the indicator of its border column (zero without BORDER: a
    one-tile grid, where nothing enters from outside and the rows have no border columns)."""
    mask = ok[:, None] & col_ok[None, :]
    pos = i * C1 + j
    from_above = tl.load(PHI + ((r * P + pos - C1) * 2)[:, None] * WIDTH + cols[None, :],
                         mask=mask & (i > 0)[:, None], other=0.0)
    from_left = tl.load(PHI + ((r * P + pos - 1) * 2 + 1)[:, None] * WIDTH + cols[None, :],
                        mask=mask & (j > 0)[:, None], other=0.0)
    if BORDER:
        from_above = tl.where((i > 0)[:, None], from_above, (cols[None, :] == (P + j)[:, None]).to(tl.float32))
        from_left = tl.where((j > 0)[:, None], from_left, (cols[None, :] == (P + C1 + i)[:, None]).to(tl.float32))
    return from_above, from_left


@triton.jit
def _diagonal(RANK, d, C0, C1, BI: tl.constexpr):
    """Positions (i, j) of anti-diagonal i + j = d of a C0 x C1 tile, their validity and wavefront ranks."""
    i = tl.maximum(d - C1 + 1, 0) + tl.arange(0, BI)
    ok = (i < C0) & (i <= d)
    i = tl.where(ok, i, 0)
    j = tl.where(ok, d - i, 0)
    rank = tl.load(RANK + i * C1 + j, mask=ok, other=0)
    return i, j, ok, rank


@triton.jit
def _gate_pair(G, base, pos, s_pos, ok):
    return tl.load(G + base + pos * s_pos, mask=ok, other=0.0), tl.load(G + base + pos * s_pos + 1, mask=ok, other=0.0)


@triton.jit
def _transfer_kernel(S, T, M, D, RANK, SLOT, PHI, W, X, s_o, s_b, s_h, s_p, t_o, t_b, t_h, t_p, m_o, m_b, m_h, m_p,
                     d_b, d_h, d_p, NT, NO, NB, NH, C0, C1, P, WIDTH,
                     BI: tl.constexpr, BC: tl.constexpr, HAS_DIRECT: tl.constexpr, BORDER: tl.constexpr):
    """One tile row r of a 2D tile, anti-diagonal after anti-diagonal: phi (every edge's row over the P local
    sources and, with BORDER, E border columns), W (each position's read-out row, the direct weight on its own
    column) and, with BORDER, X (the exit edges' rows, the axis-0 face by column, then the axis-1 face by row).
    Gates are read at the grid positions of the tile's slots (zero in padding). Columns are independent: each
    program takes a block of BC."""
    r = tl.program_id(0).to(tl.int64)
    tile, o, b, h = _row(r, NO, NB, NH)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    col_ok = cols < WIDTH
    E = C0 + C1
    for d in range(C0 + C1 - 1):
        i, j, ok, rank = _diagonal(RANK, d, C0, C1, BI)
        pos, real = _slots(SLOT, tile, o, NT, P, rank, ok)
        in0, in1 = _transfer_rows(PHI, r, i, j, ok, cols, col_ok, P, C1, WIDTH, BORDER)
        own = (cols[None, :] == rank[:, None]).to(tl.float32)
        s0, s1 = _gate_pair(S, o * s_o + b * s_b + h * s_h, pos, s_p, real)
        t00, t01 = _gate_pair(T, o * t_o + b * t_b + h * t_h, pos, t_p, real)
        t10, t11 = _gate_pair(T, o * t_o + b * t_b + h * t_h + 2, pos, t_p, real)
        m0, m1 = _gate_pair(M, o * m_o + b * m_b + h * m_h, pos, m_p, real)
        phi0 = s0[:, None] * own + t00[:, None] * in0 + t01[:, None] * in1
        phi1 = s1[:, None] * own + t10[:, None] * in0 + t11[:, None] * in1
        w = m0[:, None] * in0 + m1[:, None] * in1
        if HAS_DIRECT:
            w += tl.load(D + b * d_b + h * d_h + pos * d_p, mask=real, other=0.0)[:, None] * own
        mask = ok[:, None] & col_ok[None, :]
        row = (r * P + i * C1 + j) * 2
        tl.store(PHI + row[:, None] * WIDTH + cols[None, :], phi0, mask=mask)
        tl.store(PHI + (row + 1)[:, None] * WIDTH + cols[None, :], phi1, mask=mask)
        tl.store(W + (r * P + rank)[:, None] * WIDTH + cols[None, :], w, mask=mask)
        if BORDER:
            tl.store(X + (r * E + j)[:, None] * WIDTH + cols[None, :], phi0, mask=mask & (i == C0 - 1)[:, None])
            tl.store(X + (r * E + C1 + i)[:, None] * WIDTH + cols[None, :], phi1, mask=mask & (j == C1 - 1)[:, None])
        tl.debug_barrier()  # the next diagonal reads these rows


@triton.jit
def _successor(T, M, DW, RING, slot, t_q, t_base, t_p, m_base, m_p, pos_q, real_q, ok_q, rank_q, cols, col_ok,
               WIDTH, BI: tl.constexpr, BC: tl.constexpr, AXIS: tl.constexpr):
    """The adjoint an edge leaving along AXIS gets from the position q it enters (row t_q of the ring slot of
    q's diagonal): M[q, AXIS] dW[q] + sum_a T[q, a, AXIS] lambda[(q, a)]."""
    mask = ok_q[:, None] & col_ok[None, :]
    t = T + t_base + pos_q * t_p + AXIS
    m = tl.load(M + m_base + pos_q * m_p + AXIS, mask=real_q, other=0.0)
    dw = tl.load(DW + rank_q[:, None] * WIDTH + cols[None, :], mask=mask, other=0.0)  # DW: this row's
    lam0 = tl.load(_ring(RING, slot, 0, t_q, BI, BC), mask=ok_q[:, None], other=0.0)
    lam1 = tl.load(_ring(RING, slot, 1, t_q, BI, BC), mask=ok_q[:, None], other=0.0)
    return (m[:, None] * dw + tl.load(t, mask=real_q, other=0.0)[:, None] * lam0
            + tl.load(t + 2, mask=real_q, other=0.0)[:, None] * lam1)


@triton.jit
def _transfer_backward_kernel(T, M, RANK, SLOT, PHI, DW, DX, RING, DS, DT, DM, DD, t_o, t_b, t_h, t_p,
                              m_o, m_b, m_h, m_p, NT, NO, NB, NH, N, C0, C1, P, WIDTH,
                              BI: tl.constexpr, BC: tl.constexpr, HAS_DIRECT: tl.constexpr, BORDER: tl.constexpr):
    """The adjoint of _transfer_kernel, anti-diagonals in reverse: lambda (dLoss/dphi of every edge, passed to the
    previous diagonal through a ring of two diagonals per program, not a phi-sized buffer) from the read-outs,
    transitions and exits downstream, then the gates' gradients, written at the grid positions of the slots into
    contiguous (blocks, B, N, O, H, F) tensors: each block of BC columns, one program, gives its part of the sums
    over columns."""
    r = tl.program_id(0).to(tl.int64)
    tile, o, b, h = _row(r, NO, NB, NH)
    t_base, m_base = o * t_o + b * t_b + h * t_h, o * m_o + b * m_b + h * m_h
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    part = tl.program_id(1).to(tl.int64) * NB * N * NO * NH
    col_ok = cols < WIDTH
    E = C0 + C1
    DW = DW + r * P * WIDTH
    RING += (r * tl.num_programs(1) + tl.program_id(1)) * 4 * BI * BC
    for back in range(C0 + C1 - 1):
        d = C0 + C1 - 2 - back
        i, j, ok, rank = _diagonal(RANK, d, C0, C1, BI)
        mask = ok[:, None] & col_ok[None, :]
        after = tl.maximum(d + 2 - C1, 0)  # the first row of diagonal d + 1 (its slot 0 in the ring)
        below = ok & (i + 1 < C0)
        rank_below = tl.load(RANK + (i + 1) * C1 + j, mask=below, other=0)
        pos_below, real_below = _slots(SLOT, tile, o, NT, P, rank_below, below)
        lam0 = _successor(T, M, DW, RING, (d + 1) % 2, i + 1 - after, t_base, t_p, m_base, m_p, pos_below, real_below,
                          below, rank_below, cols, col_ok, WIDTH, BI, BC, 0)
        if BORDER:
            lam0 += tl.load(DX + (r * E + j)[:, None] * WIDTH + cols[None, :], mask=mask & (i == C0 - 1)[:, None],
                            other=0.0)
        right = ok & (j + 1 < C1)
        rank_right = tl.load(RANK + i * C1 + j + 1, mask=right, other=0)
        pos_right, real_right = _slots(SLOT, tile, o, NT, P, rank_right, right)
        lam1 = _successor(T, M, DW, RING, (d + 1) % 2, i - after, t_base, t_p, m_base, m_p, pos_right, real_right,
                          right, rank_right, cols, col_ok, WIDTH, BI, BC, 1)
        if BORDER:
            lam1 += tl.load(DX + (r * E + C1 + i)[:, None] * WIDTH + cols[None, :],
                            mask=mask & (j == C1 - 1)[:, None], other=0.0)
        tl.store(_ring(RING, d % 2, 0, tl.arange(0, BI), BI, BC), lam0)
        tl.store(_ring(RING, d % 2, 1, tl.arange(0, BI), BI, BC), lam1)
        in0, in1 = _transfer_rows(PHI, r, i, j, ok, cols, col_ok, P, C1, WIDTH, BORDER)
        own = (cols[None, :] == rank[:, None]).to(tl.float32)
        dw = tl.load(DW + rank[:, None] * WIDTH + cols[None, :], mask=mask, other=0.0)
        pos, real = _slots(SLOT, tile, o, NT, P, rank, ok)
        pair, quad = _dense(o, b, h, pos, N, NO, NH, 2) + part * 2, _dense(o, b, h, pos, N, NO, NH, 4) + part * 4
        tl.store(DS + pair, tl.sum(lam0 * own, 1), mask=real)
        tl.store(DS + pair + 1, tl.sum(lam1 * own, 1), mask=real)
        tl.store(DT + quad, tl.sum(lam0 * in0, 1), mask=real)
        tl.store(DT + quad + 1, tl.sum(lam0 * in1, 1), mask=real)
        tl.store(DT + quad + 2, tl.sum(lam1 * in0, 1), mask=real)
        tl.store(DT + quad + 3, tl.sum(lam1 * in1, 1), mask=real)
        tl.store(DM + pair, tl.sum(dw * in0, 1), mask=real)
        tl.store(DM + pair + 1, tl.sum(dw * in1, 1), mask=real)
        if HAS_DIRECT:
            tl.store(DD + _dense(o, b, h, pos, N, NO, NH, 1) + part, tl.sum(dw * own, 1), mask=real)
        tl.debug_barrier()  # the previous diagonal reads this one's ring slot (and overwrites the other)


def _block(n: int) -> int:
    return max(16, next_power_of_2(n))


class Rows(NamedTuple):
    """Where the kernels' tile rows are. Row r = ((t * O + o) * B + b) * H + h is tile t of orientation o, batch b,
    head h; slot p of it is grid position slots[o, t, p] (-1 in a tile's padding) of tensors laid out
    (B, N, H, F) (q, k, v, dy; one for all orientations) or (B, N, O, H, F) (gates and per-orientation outputs)."""

    slots: torch.Tensor  # (O, T, P_t) int32
    tiles: int
    orientations: int
    batch: int
    heads: int
    positions: int  # N

    @property
    def count(self) -> int:
        return self.tiles * self.orientations * self.batch * self.heads

    @property
    def size(self) -> int:  # P_t
        return self.slots.shape[-1]

    def args(self) -> tuple:
        """What every tile kernel takes after the slot table: tiles, orientations, batch, heads."""
        return self.tiles, self.orientations, self.batch, self.heads

    def outputs(self, features: int, device) -> torch.Tensor:
        """A float32 (B, N, O, H, features) buffer for per-orientation results."""
        return empty(self.batch, self.positions, self.orientations, self.heads, features, device=device)


@device_tables
def _identity_slots(positions: int, device: torch.device) -> torch.Tensor:
    return torch.arange(positions, dtype=torch.int32, device=device)[None, None]


def tile_rows(rows: int, positions: int, device: torch.device) -> Rows:
    """Rows of (R, P_t, F) tensors already in tiles, viewed as (R, P_t, 1, F): one tile, one orientation, R batches."""
    return Rows(_identity_slots(positions, device), 1, 1, rows, 1, positions)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, position) strides of a (B, N, H, F) tensor with unit feature stride."""
    return x.stride(0), x.stride(2), x.stride(1)


def _gate_strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(orientation, batch, head, position) strides of a (B, N, O, H, F) tensor with unit feature stride."""
    return x.stride(2), x.stride(0), x.stride(3), x.stride(1)


BLOCK_P = 64  # query and source blocks of the tile kernels (some take 128 where border states enter)
# Border edges per program of the state sums (their sources read once for all of them), with Triton's four warps:
# 689 -> 522 us at 64x64 B=8 on an H200; two edges 627, eight warps 751, eight edges of 64 rows 1,930 (spills).
OUTER_EDGES = 4


def _outer_edges(a: torch.Tensor) -> int:
    """Border edges per program of the state sums over operand a (k or q): for half inputs (measured) at most 256
    stacked rows, edges x Dk (32 KiB of shared memory compiled for sm_86; the accumulator spills a little on
    Hopper and was still faster); one for float32 inputs, whose stacked operand would take up to 113 KiB, more
    than consumer GPUs' 99."""
    return max(1, min(OUTER_EDGES, 256 // _block(a.shape[-1]))) if a.element_size() == 2 else 1


def _stages(size: int) -> int:
    """Pipeline stages of the read-out kernels and the exits' adjoint for tiles of `size` positions: one (no loads
    staged in shared memory) up to 16 x 16, Triton's default three above. H200, bf16, per f+b: 14x14 B=64 the
    three read-out kernels 119 -> 94 us; 64x64 B=8 read-out, queries and exits' adjoint 1797 -> 1667 us (sources
    97 -> 100; the states' sums lose with one stage, 688 -> 846, and keep three); one 32x32 tile loses (447 ->
    480). Measured on 2D grids; the 3D tile path's read-out and exits take the same rule (same bits either way)."""
    return 1 if size <= 256 else 3


def _readout_blocks(q: torch.Tensor, has_border: bool) -> tuple[int, int]:
    """(query and source block, warps) of the forward read-out. Each program reads all of its tile's entering
    states, so blocks of 128 queries read them half as often (forward 2.0 -> 1.5 ms at 64x64 B=8, bf16, H200);
    one-tile grids have none and keep more, smaller programs (14x14 B=64: 0.4 ms at 64, 0.8 at 128). With half
    inputs and Dk <= 64 blocks of 128 take 160 KiB of shared memory compiled for an A100 (which has 163) and 176
    for Hopper (227) with Triton's default three pipeline stages (less with the one of `_stages`); float32 inputs
    would take 225 KiB, too close to Hopper's limit."""
    fits = q.element_size() == 2 and q.shape[-1] <= 64 and shared_memory(q.device) >= 160 * 1024
    return (128, 8) if fits and has_border else (BLOCK_P, 4)


def _border_blocks(q: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    """(block, warps) of the queries' adjoint and the exits' adjoint where border states enter or leave: each of
    their programs reads all of its tile's border states (Dk x Dv float32 each), so blocks of 128 queries or
    sources read them half as often. 64x64 B=8, bf16, on the H200: queries' adjoint 687 -> 561 us, exits' adjoint
    630 -> 476 (821 on four warps), the same bits. Measured for half inputs with Dk, Dv <= 64 (97 KiB of shared
    memory compiled for an A100 or Hopper); others keep blocks of BLOCK_P."""
    fits = q.element_size() == 2 and max(q.shape[-1], v.shape[-1]) <= 64 and shared_memory(q.device) >= 100 * 1024
    return (128, 8) if fits else (BLOCK_P, 4)


@device_tables
def _own_rows(border: int, device: torch.device) -> torch.Tensor:
    """The source table (one tile, E edges) of border states stored per entering edge: each edge reads its own row."""
    return torch.zeros(1, border, dtype=torch.int32, device=device)


def _border_args(states, sources, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """The read-out kernels' C and SOURCE: the rows' own entering states where no sources are given; without states
    (HAS_BORDER off, nothing read) any tensors."""
    if states is None:
        return rows.slots, rows.slots
    if sources is None and rows.tiles != 1:  # the own-rows table has one tile: later tiles would read past it
        raise ValueError(f"tile read-out: states of {rows.tiles} tiles need their `sources` table")
    return states, sources if sources is not None else _own_rows(states.shape[1], states.device)


def readout(q, k, v, weights, states, rows: Rows, scale: float = 1.0, sources=None) -> torch.Tensor:
    """y (B, N, O, H, Dv) float32 = scale * (the local quadratic form + the entering border states' part).

    q, k (B, N, H, Dk), v (B, N, H, Dv): one dtype, unit feature stride; weights (R, P_t, >= P_t + E) float32;
    states (R, E, Dk, Dv) float32 contiguous, or None where no state enters. With `sources` (T, E) int32 the
    state entering edge j of tile t is the exit j of tile sources[t, j] (none for -1): row r + (sources[t, j] -
    t) R / T of `states`; without, row r (states entering each tile, a single-tile Rows)."""
    size, width, dk, dv = rows.size, weights.shape[-1], q.shape[-1], v.shape[-1]
    has_border, border = states is not None, states.shape[1] if states is not None else 0
    y = rows.outputs(dv, q.device)
    bv, (block, warps) = min(64, _block(dv)), _readout_blocks(q, has_border)
    states, sources = _border_args(states, sources, rows)
    with on_device(q.device):
        _readout_kernel[(rows.count, cdiv(size, block), cdiv(dv, bv))](
            q, k, v, weights, states, sources, y, rows.slots, *_strides(q), *_strides(k), *_strides(v), scale,
            *rows.args(), rows.positions, size, border, width, dk, dv, BP=block, BS=block, BK=_block(dk), BV=bv,
            HAS_BORDER=has_border, PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=_stages(size))
    return y


def readout_backward(q, k, v, weights, states, dy, rows: Rows, sources=None):
    """[dq, dk, dv (B, N, O, H, D), d_weights (weights' shape), d_entering (R, E, Dk, Dv) or None], float32.
    dy: (B, N, H, Dv) float32 contiguous; states and sources as in `readout`. d_entering holds the adjoint of every
    entering edge (those from outside the grid too, unused)."""
    size, width, dk, dv = rows.size, weights.shape[-1], q.shape[-1], v.shape[-1]
    has_border, border = states is not None, states.shape[1] if states is not None else 0
    dq, dk_, dv_ = rows.outputs(dk, q.device), rows.outputs(dk, q.device), rows.outputs(dv, q.device)
    d_weights = torch.zeros(rows.count, size, width, device=q.device)  # W[p, s] for s after p is never read: zero
    d_entering = empty(rows.count, border, dk, dv, device=q.device) if has_border else None
    states, sources = _border_args(states, sources, rows)
    blocks, common = cdiv(size, BLOCK_P), dict(BK=_block(dk), BV=_block(dv), PRECISION=dot_precision(q.dtype),
                                               num_stages=_stages(size))
    qkv = (*_strides(q), *_strides(k), *_strides(v))
    bv = min(64, _block(dv))
    with on_device(q.device):
        _readout_sources_kernel[(rows.count, blocks)](
            q, k, v, weights, dy, dk_, dv_, d_weights, rows.slots, *qkv, *rows.args(), rows.positions, size, width,
            dk, dv, BP=BLOCK_P, BS=BLOCK_P, **common)
        queries, warps = _border_blocks(q, v) if has_border else (BLOCK_P, 4)
        _readout_queries_kernel[(rows.count, cdiv(size, queries))](
            q, k, v, weights, states, sources, dy, dq, d_weights, rows.slots, *qkv, *rows.args(), rows.positions, size,
            border, width, dk, dv, BP=queries, BS=BLOCK_P, HAS_BORDER=has_border, num_warps=warps, **common)
        if has_border:
            edges = _outer_edges(q)  # dC_j = sum_p W[p, P + j] q_p dy_p^T
            _outer_sums_kernel[(rows.count, cdiv(border, edges), cdiv(dv, bv))](
                q, dy, weights[..., size:], d_entering, rows.slots, *_strides(q), *_strides(dy), size * width, 1,
                width, *rows.args(), size, border, dk, dv, BS=BLOCK_P, BA=_block(dk), BB=bv, G=edges,
                PRECISION=dot_precision(q.dtype))
    return dq, dk_, dv_, d_weights, d_entering


def exit_states(k, v, exits, rows: Rows) -> torch.Tensor:
    """U (R, E, Dk, Dv) float32: sum_s X[e, s] k_s v_s^T, from exits (R, E, P_t + E) float32 contiguous (its first
    P_t columns)."""
    border, width, dk, dv = exits.shape[1], exits.shape[-1], k.shape[-1], v.shape[-1]
    u = empty(rows.count, border, dk, dv, device=k.device)
    bv, edges = min(64, _block(dv)), _outer_edges(k)
    with on_device(k.device):
        _outer_sums_kernel[(rows.count, cdiv(border, edges), cdiv(dv, bv))](
            k, v, exits, u, rows.slots, *_strides(k), *_strides(v), border * width, width, 1, *rows.args(),
            rows.size, border, dk, dv, BS=BLOCK_P, BA=_block(dk), BB=bv, G=edges, PRECISION=dot_precision(k.dtype))
    return u


def exits_backward(k, v, exits, du, rows: Rows, dk, dv, d_exits, accumulate: bool) -> None:
    """Writes dX into d_exits' first P_t columns and dk, dv (B, N, O, H, D) float32, added to their values when
    `accumulate`. du: (R, E, Dk, Dv) float32 contiguous."""
    border, width = exits.shape[1], exits.shape[-1]
    sources, warps = _border_blocks(k, v)
    with on_device(k.device):
        _exits_backward_kernel[(rows.count, cdiv(rows.size, sources))](
            k, v, exits, du, dk, dv, d_exits, rows.slots, *_strides(k), *_strides(v), *rows.args(),
            rows.positions, rows.size, border, width, k.shape[-1], v.shape[-1], BS=sources, BK=_block(k.shape[-1]),
            BV=_block(v.shape[-1]), ACCUMULATE=accumulate, PRECISION=dot_precision(k.dtype), num_warps=warps,
            num_stages=_stages(rows.size))


@device_tables
def _ranks(tile: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(C0 * C1,) wavefront rank of each position of a 2D tile, in row-major order."""
    order = wavefront(tile).order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank.to(device, torch.int32)


# columns (sources) per program of the transfer kernels: 32 beat 64 and 16 at one-tile grids (H200, RESULTS.md)
TRANSFER_COLUMNS = 32


def transfer(source, transition, mark, direct, rows: Rows, tile: tuple[int, int], border: bool):
    """[W (R, P, F), X (R, E, F) or None without `border`, phi (R, 2 P, F)] of a rows x cols tile, float32: F >= P
    + E columns, the P local sources, the E border edges (none without `border`: a one-tile grid, which nothing
    enters and nothing leaves) and zero columns up to a multiple of 16 (aligned rows).

    source, mark (B, N, O, H, 2), transition (B, N, O, H, 4): float32 with unit last stride; direct (B, N, H, 1)
    or None."""
    device, (c0, c1) = source.device, tile
    positions, edges = c0 * c1, c0 + c1
    width = cdiv(positions + (edges if border else 0), 16) * 16  # rows padded (with zero columns) to aligned strides
    phi = empty(rows.count, 2 * positions, width, device=device)
    weights = empty(rows.count, positions, width, device=device)
    exits = empty(rows.count, edges, width, device=device) if border else None
    with on_device(device):
        _transfer_kernel[(rows.count, cdiv(width, TRANSFER_COLUMNS))](
            source, transition, mark, direct if direct is not None else source, _ranks(tile, device), rows.slots,
            phi, weights, exits if border else weights, *_gate_strides(source), *_gate_strides(transition),
            *_gate_strides(mark), *(_strides(direct) if direct is not None else (0, 0, 0)), *rows.args(), c0, c1,
            positions, width, BI=_block(min(c0, c1)), BC=TRANSFER_COLUMNS, HAS_DIRECT=direct is not None,
            BORDER=border, num_warps=4)
    return weights, exits, phi


def transfer_backward(transition, mark, has_direct: bool, rows: Rows, tile: tuple[int, int], phi, d_weights, d_exits):
    """[d_source, d_transition, d_mark, d_direct (None without direct)], float32 (B, N, O, H, F). d_exits None for
    a one-tile grid (transfer without `border`)."""
    device, (c0, c1) = mark.device, tile
    positions, width = c0 * c1, phi.shape[-1]
    blocks = cdiv(width, TRANSFER_COLUMNS)
    parts = lambda f: empty(blocks, rows.batch, rows.positions, rows.orientations, rows.heads, f, device=device)
    d_source, d_transition, d_mark = parts(2), parts(4), parts(2)
    d_direct = parts(1) if has_direct else None
    ring = empty(rows.count * blocks * 4 * _block(min(c0, c1)) * TRANSFER_COLUMNS, device=device)
    with on_device(device):
        _transfer_backward_kernel[(rows.count, blocks)](
            transition, mark, _ranks(tile, device), rows.slots, phi, d_weights, d_exits if d_exits is not None else phi,
            ring, d_source, d_transition, d_mark, d_direct if has_direct else d_source, *_gate_strides(transition),
            *_gate_strides(mark), *rows.args(), rows.positions, c0, c1, positions, width,
            BI=_block(min(c0, c1)), BC=TRANSFER_COLUMNS, HAS_DIRECT=has_direct, BORDER=d_exits is not None,
            num_warps=4)
    total = lambda x: x if x is None else x.sum(0) if blocks > 1 else x[0]
    return total(d_source), total(d_transition), total(d_mark), total(d_direct)


# Custom ops on (R, P_t, F) tensors already in tiles: the read-out and exits of the tile path on 3D grids
# (mdlrnn.ops.grid.chunk with TritonTiles), differentiable.
def _tiled(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(2)  # (R, P_t, F) -> (R, P_t, 1, F): B = R, N = P_t, H = 1


@torch.library.custom_op("mdlrnn::tile_readout", mutates_args=())
def tile_readout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor,
                 entering: Optional[torch.Tensor]) -> torch.Tensor:
    """y (R, P, Dv) float32. q, k: (R, P, Dk), v: (R, P, Dv), unit last stride, one dtype; weights (R, P, P + E)
    float32 contiguous; entering (R, E, Dk, Dv) float32 contiguous, or None where no state enters (E unused)."""
    rows = tile_rows(q.shape[0], q.shape[1], q.device)
    return readout(_tiled(q), _tiled(k), _tiled(v), weights, entering, rows).view(*q.shape[:2], v.shape[-1])


@tile_readout.register_fake
def _(q, k, v, weights, entering):
    return q.new_empty(*q.shape[:2], v.shape[-1], dtype=torch.float32)


@torch.library.custom_op("mdlrnn::tile_readout_backward", mutates_args=())
def tile_readout_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor,
                          entering: Optional[torch.Tensor], dy: torch.Tensor) -> list[torch.Tensor]:
    """[dq, dk, dv, d_weights, d_entering] in float32 (d_entering empty without entering states)."""
    rows = tile_rows(q.shape[0], q.shape[1], q.device)
    dq, dk, dv, d_weights, d_entering = readout_backward(
        _tiled(q), _tiled(k), _tiled(v), weights, entering, _tiled(dy.float().contiguous()), rows)
    flat = lambda x: x.view(*x.shape[:2], x.shape[-1])
    return [flat(dq), flat(dk), flat(dv), d_weights, d_entering if d_entering is not None else dy.new_empty(0)]


@tile_readout_backward.register_fake
def _(q, k, v, weights, entering, dy):
    f32 = dict(dtype=torch.float32)
    grads = [q.new_empty(*q.shape[:2], n, **f32) for n in (q.shape[-1], q.shape[-1], v.shape[-1])]
    return [*grads, torch.empty_like(weights), torch.empty_like(entering) if entering is not None else dy.new_empty(0)]


def _readout_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _readout_grad(ctx, dy):
    q, k, v, weights, entering = ctx.saved_tensors
    dq, dk, dv, d_weights, d_entering = tile_readout_backward(q, k, v, weights, entering, dy)
    return dq, dk, dv, d_weights, d_entering if entering is not None else None


tile_readout.register_autograd(_readout_grad, setup_context=_readout_setup)


@torch.library.custom_op("mdlrnn::tile_exits", mutates_args=())
def tile_exits(k: torch.Tensor, v: torch.Tensor, exits: torch.Tensor) -> torch.Tensor:
    """U (R, E, Dk, Dv) float32 from k (R, P, Dk), v (R, P, Dv) and exits (R, E, P + E) float32 contiguous
    (only its first P columns are read)."""
    return exit_states(_tiled(k), _tiled(v), exits, tile_rows(k.shape[0], k.shape[1], k.device))


@tile_exits.register_fake
def _(k, v, exits):
    return k.new_empty(k.shape[0], exits.shape[1], k.shape[-1], v.shape[-1], dtype=torch.float32)


@torch.library.custom_op("mdlrnn::tile_exits_backward", mutates_args=())
def tile_exits_backward(k: torch.Tensor, v: torch.Tensor, exits: torch.Tensor, du: torch.Tensor) -> list[torch.Tensor]:
    """[dk, dv, d_exits] in float32 (d_exits zero in its last E columns)."""
    rows = tile_rows(k.shape[0], k.shape[1], k.device)
    dk, dv = rows.outputs(k.shape[-1], k.device), rows.outputs(v.shape[-1], k.device)
    d_exits = torch.zeros(exits.shape, device=k.device)
    exits_backward(_tiled(k), _tiled(v), exits, du.float().contiguous(), rows, dk, dv, d_exits, accumulate=False)
    return [dk.view(k.shape), dv.view(v.shape), d_exits]


@tile_exits_backward.register_fake
def _(k, v, exits, du):
    f32 = dict(dtype=torch.float32)
    return [k.new_empty(*k.shape, **f32), v.new_empty(*v.shape, **f32), torch.empty_like(exits)]


def _exits_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _exits_grad(ctx, du):
    k, v, exits = ctx.saved_tensors
    return tuple(tile_exits_backward(k, v, exits, du))


tile_exits.register_autograd(_exits_grad, setup_context=_exits_setup)


# Tiles of the Triton path: grids of up to WHOLE_GRID positions and WHOLE_EDGE per axis are one tile (no state
# crosses a border: the read-out alone, a masked quadratic form like attention, after a weight solve of fewer than
# 2 WHOLE_EDGE steps); larger grids use tiles of TILE_EDGE per axis. Up to 32x32 one tile's quadratic work costs
# less than the border states of tiles: f+b on the H200, bf16, 24x24 B=64 2.8 against 7.0 ms (tiles of 12 x 12),
# 32x32 B=32 3.5 against 4.9 ms (16 x 16).
WHOLE_GRID = 1024
WHOLE_EDGE = 32
TILE_EDGE = 16


class TritonTiles(TorchTiles):
    """mdlrnn.ops.grid.chunk.TorchTiles with the read-out and exits on the kernels above and its own tile shape
    (3D grids; 2D grids run all of it, the transfer kernel too, as mdlrnn.kernels.grid2d's op)."""

    @staticmethod
    def tile(sizes: tuple[int, ...]) -> tuple[int, ...]:
        if len(sizes) != 2:  # the torch weight solve is dense per tile: keep the torch path's small tiles
            return tile_shape(sizes)
        if math.prod(sizes) <= WHOLE_GRID and max(sizes) <= WHOLE_EDGE:
            return sizes
        # as many tiles per axis as edges of TILE_EDGE need, made as even as can be: 24 -> 12 + 12, not 16 + 8
        return tuple(-(-s // -(-s // TILE_EDGE)) for s in sizes)

    exits = staticmethod(tile_exits)
    readout = staticmethod(tile_readout)
