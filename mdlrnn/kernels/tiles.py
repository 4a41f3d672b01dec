r"""Triton kernels for the matrix-valued work of grid_scan's tile path (N >= 2), forward and backward.

The tile path (mdlrnn.ops.grid.chunk) gets, per tile row r (tile x batch x head), scalar weights from one
small triangular system: W (P, P + E), what each position reads from each local source and each entering
border edge (the direct weight on its diagonal), and X (E, P + E), what each exit edge gets from them. Two
kernels do the rest without materialising anything per (position, border edge, Dk, Dv):

    readout: y_p   = sum_s W[p, s] (q_p . k_s) v_s + sum_j W[p, P + j] q_p^T C_j      (C_j entering border states)
    exits:   U_e   = sum_s X[e, s] k_s v_s^T                                           (the local part of C_exit)

Positions inside a tile are in wavefront order, so W[p, s] = 0 for s after p: the readout's loop over
sources stops at the query block. Products run on tensor cores in the inputs' dtype (float32 inputs: exact
float32 products), accumulate in float32; weights and states are float32, and products with states
(or their adjoints) take float32 operands (tf32 for half inputs), which keeps bfloat16 gradients of the gates
within 1e-2 on 64x64 grids.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops.grid.chunk import TorchTiles
from ..ops.grid.plan import tile_shape, wavefront
from . import empty, on_device


@triton.jit
def _block_of(X, r, s_r, s_p, idx, idx_ok, feats, feats_ok):
    """X[r, idx, feats] for a (R, P, F) tensor with row strides s_r, s_p and unit last stride (zero where masked)."""
    return tl.load(X + r * s_r + idx[:, None] * s_p + feats[None, :], mask=idx_ok[:, None] & feats_ok[None, :], other=0.0)


@triton.jit
def _source_block(K, V, w_rows, r, s_kr, s_kp, s_vr, s_vp, start, P, row_ok, dks, dk_ok, dvs, dv_ok,
                  BS: tl.constexpr):
    """k, v of sources start:start + BS and the read-out weights W[rows, sources]."""
    cols = start + tl.arange(0, BS)
    col_ok = cols < P
    k = _block_of(K, r, s_kr, s_kp, cols, col_ok, dks, dk_ok)
    v = _block_of(V, r, s_vr, s_vp, cols, col_ok, dvs, dv_ok)
    return k, v, tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _border_state(C, w_rows, r, j, P, E, DK, DV, row_ok, dks, dk_ok, dvs, dv_ok):
    """C_j (float32) and its read-out weights W[rows, P + j] as a column."""
    c = tl.load(C + ((r * E + j) * DK + dks[:, None]) * DV + dvs[None, :], mask=dk_ok[:, None] & dv_ok[None, :], other=0.0)
    return c, tl.load(w_rows + P + j, mask=row_ok[:, None], other=0.0)


@triton.jit
def _own_sources(K, V, s_kr, s_kp, s_vr, s_vp, P, DK, DV, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The tile row, block of sources and whole head dimensions of a program that owns sources: indices, masks, k, v."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BS + tl.arange(0, BS)
    dks, dvs = tl.arange(0, BK), tl.arange(0, BV)
    col_ok, dk_ok, dv_ok = cols < P, dks < DK, dvs < DV
    k = _block_of(K, r, s_kr, s_kp, cols, col_ok, dks, dk_ok)
    v = _block_of(V, r, s_vr, s_vp, cols, col_ok, dvs, dv_ok)
    return r, cols, col_ok, dks, dk_ok, dvs, dv_ok, k, v


@triton.jit
def _readout_kernel(Q, K, V, W, C, Y, s_qr, s_qp, s_kr, s_kp, s_vr, s_vp, P, E, WIDTH, DK, DV,
                    BP: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    HAS_BORDER: tl.constexpr, PRECISION: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BP + tl.arange(0, BP)
    dvs = tl.program_id(2) * BV + tl.arange(0, BV)
    dks = tl.arange(0, BK)
    row_ok, dk_ok, dv_ok = rows < P, dks < DK, dvs < DV
    q = _block_of(Q, r, s_qr, s_qp, rows, row_ok, dks, dk_ok)
    acc = tl.zeros((BP, BV), dtype=tl.float32)
    w_rows = W + r * P * WIDTH + rows[:, None] * WIDTH
    for start in range(0, tl.minimum((tl.program_id(1) + 1) * BP, P), BS):  # sources up to the last query
        k, v, w = _source_block(K, V, w_rows, r, s_kr, s_kp, s_vr, s_vp, start, P, row_ok, dks, dk_ok, dvs, dv_ok, BS)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * w
        acc += tl.dot(scores.to(v.dtype), v, input_precision=PRECISION)
    if HAS_BORDER:
        q32 = q.to(tl.float32)  # states stay float32 (tf32 products for half inputs)
        for j in range(E):
            c, w_j = _border_state(C, w_rows, r, j, P, E, DK, DV, row_ok, dks, dk_ok, dvs, dv_ok)
            acc += w_j * tl.dot(q32, c, input_precision=PRECISION)
    tl.store(Y + (r * P + rows[:, None]) * DV + dvs[None, :], acc, mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _readout_sources_kernel(Q, K, V, W, DY, DK_, DV_, DW, s_qr, s_qp, s_kr, s_kp, s_vr, s_vp, P, WIDTH, DK, DV,
                            BP: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            PRECISION: tl.constexpr):
    """Per block of sources s: dk_s, dv_s and dW[:, s] (local columns), over the queries p >= s."""
    r, cols, col_ok, dks, dk_ok, dvs, dv_ok, k, v = _own_sources(K, V, s_kr, s_kp, s_vr, s_vp, P, DK, DV, BS, BK, BV)
    dk_acc = tl.zeros((BS, BK), dtype=tl.float32)
    dv_acc = tl.zeros((BS, BV), dtype=tl.float32)
    for start in range(tl.program_id(1) * BS // BP * BP, P, BP):
        rows = start + tl.arange(0, BP)
        row_ok = rows < P
        q = _block_of(Q, r, s_qr, s_qp, rows, row_ok, dks, dk_ok)
        dy = tl.load(DY + (r * P + rows[:, None]) * DV + dvs[None, :], mask=row_ok[:, None] & dv_ok[None, :],
                     other=0.0).to(q.dtype)
        w_ptrs = W + (r * P + rows[:, None]) * WIDTH + cols[None, :]
        w_mask = row_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (q_p . k_s)
        d_scores = tl.dot(dy, tl.trans(v), input_precision=PRECISION)  # (dy_p . v_s)
        tl.store(DW + (r * P + rows[:, None]) * WIDTH + cols[None, :], d_scores * scores, mask=w_mask)
        dv_acc += tl.dot(tl.trans((scores * w).to(q.dtype)), dy, input_precision=PRECISION)
        dk_acc += tl.dot(tl.trans((d_scores * w).to(q.dtype)), q, input_precision=PRECISION)
    tl.store(DK_ + (r * P + cols[:, None]) * DK + dks[None, :], dk_acc, mask=col_ok[:, None] & dk_ok[None, :])
    tl.store(DV_ + (r * P + cols[:, None]) * DV + dvs[None, :], dv_acc, mask=col_ok[:, None] & dv_ok[None, :])


@triton.jit
def _readout_queries_kernel(Q, K, V, W, C, DY, DQ, DW, s_qr, s_qp, s_kr, s_kp, s_vr, s_vp, P, E, WIDTH, DK, DV,
                            BP: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                            HAS_BORDER: tl.constexpr, PRECISION: tl.constexpr):
    """Per block of queries p: dq_p, and dW[p, P + j] for the border columns."""
    r = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BP + tl.arange(0, BP)
    dks, dvs = tl.arange(0, BK), tl.arange(0, BV)
    row_ok, dk_ok, dv_ok = rows < P, dks < DK, dvs < DV
    q = _block_of(Q, r, s_qr, s_qp, rows, row_ok, dks, dk_ok)
    dy32 = tl.load(DY + (r * P + rows[:, None]) * DV + dvs[None, :], mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    dy = dy32.to(q.dtype)
    dq = tl.zeros((BP, BK), dtype=tl.float32)
    w_rows = W + (r * P + rows[:, None]) * WIDTH
    for start in range(0, tl.minimum((tl.program_id(1) + 1) * BP, P), BS):
        k, v, w = _source_block(K, V, w_rows, r, s_kr, s_kp, s_vr, s_vp, start, P, row_ok, dks, dk_ok, dvs, dv_ok, BS)
        d_scores = tl.dot(dy, tl.trans(v), input_precision=PRECISION) * w
        dq += tl.dot(d_scores.to(q.dtype), k, input_precision=PRECISION)
    if HAS_BORDER:
        q32 = q.to(tl.float32)
        for j in range(E):
            c, w_j = _border_state(C, w_rows, r, j, P, E, DK, DV, row_ok, dks, dk_ok, dvs, dv_ok)
            read = tl.dot(q32, c, input_precision=PRECISION)  # q_p^T C_j
            tl.store(DW + (r * P + rows) * WIDTH + P + j, tl.sum(read * dy32, 1), mask=row_ok)
            dq += w_j * tl.dot(dy32, tl.trans(c), input_precision=PRECISION)
    tl.store(DQ + (r * P + rows[:, None]) * DK + dks[None, :], dq, mask=row_ok[:, None] & dk_ok[None, :])


@triton.jit
def _outer_sums_kernel(A, B, WT, OUT, s_ar, s_ap, s_br, s_bp, w_r, w_e, w_s, P, E, DA, DB,
                       BS: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr, PRECISION: tl.constexpr):
    """OUT[r, e] = sum_s WT[r, e, s] a_s b_s^T (DA x DB, float32) for one e and a block of DB: the states leaving a
    tile (a = k, b = v, WT = X) and the adjoint of those entering it (a = q, b = dy, WT = W's border columns)."""
    r = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1)
    das = tl.arange(0, BA)
    dbs = tl.program_id(2) * BB + tl.arange(0, BB)
    da_ok, db_ok = das < DA, dbs < DB
    acc = tl.zeros((BA, BB), dtype=tl.float32)
    for start in range(0, P, BS):
        cols = start + tl.arange(0, BS)
        col_ok = cols < P
        a = _block_of(A, r, s_ar, s_ap, cols, col_ok, das, da_ok)
        b = _block_of(B, r, s_br, s_bp, cols, col_ok, dbs, db_ok).to(a.dtype)
        w = tl.load(WT + r * w_r + e * w_e + cols * w_s, mask=col_ok, other=0.0)
        acc += tl.dot(tl.trans((a * w[:, None]).to(a.dtype)), b, input_precision=PRECISION)
    tl.store(OUT + ((r * E + e) * DA + das[:, None]) * DB + dbs[None, :], acc, mask=da_ok[:, None] & db_ok[None, :])


@triton.jit
def _exits_backward_kernel(K, V, X, DU, DK_, DV_, DX, s_kr, s_kp, s_vr, s_vp, P, E, WIDTH, DK, DV,
                           BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """Per block of sources s: dk_s, dv_s and dX[:, s], over every exit edge."""
    r, cols, col_ok, dks, dk_ok, dvs, dv_ok, k, v = _own_sources(K, V, s_kr, s_kp, s_vr, s_vp, P, DK, DV, BS, BK, BV)
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
        dk_acc += x[:, None] * tl.dot(v, tl.trans(du), input_precision=PRECISION)
    tl.store(DK_ + (r * P + cols[:, None]) * DK + dks[None, :], dk_acc, mask=col_ok[:, None] & dk_ok[None, :])
    tl.store(DV_ + (r * P + cols[:, None]) * DV + dvs[None, :], dv_acc, mask=col_ok[:, None] & dv_ok[None, :])


@triton.jit
def _transfer_rows(PHI, r, i, j, ok, cols, col_ok, P, C1, WIDTH):
    """What enters position (i, j) of a 2D tile along axis 0 and axis 1 (rows over the columns): the phi row of
    the edge from the neighbour inside the tile, or the indicator of its border column."""
    mask = ok[:, None] & col_ok[None, :]
    pos = i * C1 + j
    from_above = tl.load(PHI + ((r * P + pos - C1) * 2)[:, None] * WIDTH + cols[None, :],
                         mask=mask & (i > 0)[:, None], other=0.0)
    from_left = tl.load(PHI + ((r * P + pos - 1) * 2 + 1)[:, None] * WIDTH + cols[None, :],
                        mask=mask & (j > 0)[:, None], other=0.0)
    in0 = tl.where((i > 0)[:, None], from_above, (cols[None, :] == (P + j)[:, None]).to(tl.float32))
    in1 = tl.where((j > 0)[:, None], from_left, (cols[None, :] == (P + C1 + i)[:, None]).to(tl.float32))
    return in0, in1


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
def _transfer_kernel(S, T, M, D, RANK, PHI, W, X, s_r, s_p, t_r, t_p, m_r, m_p, d_r, d_p, C0, C1, P, WIDTH,
                     BI: tl.constexpr, BC: tl.constexpr, HAS_DIRECT: tl.constexpr):
    """One tile row r of a 2D tile, anti-diagonal after anti-diagonal: phi (every edge's row over the P local
    sources and E border columns), W (each position's read-out row, the direct weight on its own column) and X
    (the exit edges' rows, the axis-0 face by column, then the axis-1 face by row)."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BC)
    col_ok = cols < WIDTH
    E = C0 + C1
    for d in range(C0 + C1 - 1):
        i, j, ok, rank = _diagonal(RANK, d, C0, C1, BI)
        in0, in1 = _transfer_rows(PHI, r, i, j, ok, cols, col_ok, P, C1, WIDTH)
        own = (cols[None, :] == rank[:, None]).to(tl.float32)
        s0, s1 = tl.load(S + r * s_r + rank * s_p, mask=ok), tl.load(S + r * s_r + rank * s_p + 1, mask=ok)
        t = T + r * t_r + rank * t_p
        t00, t01 = tl.load(t, mask=ok), tl.load(t + 1, mask=ok)
        t10, t11 = tl.load(t + 2, mask=ok), tl.load(t + 3, mask=ok)
        m0, m1 = tl.load(M + r * m_r + rank * m_p, mask=ok), tl.load(M + r * m_r + rank * m_p + 1, mask=ok)
        phi0 = s0[:, None] * own + t00[:, None] * in0 + t01[:, None] * in1
        phi1 = s1[:, None] * own + t10[:, None] * in0 + t11[:, None] * in1
        w = m0[:, None] * in0 + m1[:, None] * in1
        if HAS_DIRECT:
            w += tl.load(D + r * d_r + rank * d_p, mask=ok)[:, None] * own
        mask = ok[:, None] & col_ok[None, :]
        row = (r * P + i * C1 + j) * 2
        tl.store(PHI + row[:, None] * WIDTH + cols[None, :], phi0, mask=mask)
        tl.store(PHI + (row + 1)[:, None] * WIDTH + cols[None, :], phi1, mask=mask)
        tl.store(W + (r * P + rank)[:, None] * WIDTH + cols[None, :], w, mask=mask)
        tl.store(X + (r * E + j)[:, None] * WIDTH + cols[None, :], phi0, mask=mask & (i == C0 - 1)[:, None])
        tl.store(X + (r * E + C1 + i)[:, None] * WIDTH + cols[None, :], phi1, mask=mask & (j == C1 - 1)[:, None])
        tl.debug_barrier()  # the next diagonal reads these rows


@triton.jit
def _successor(T, M, DW, LAM, r, rank_q, ok_q, row_q, cols, col_ok, t_r, t_p, m_r, m_p, WIDTH, AXIS: tl.constexpr):
    """The adjoint an edge leaving along AXIS gets from the position q it enters: M[q, AXIS] dW[q] +
    sum_a T[q, a, AXIS] lambda[(q, a)]."""
    mask = ok_q[:, None] & col_ok[None, :]
    t = T + r * t_r + rank_q * t_p + AXIS
    m = tl.load(M + r * m_r + rank_q * m_p + AXIS, mask=ok_q, other=0.0)
    dw = tl.load(DW + rank_q[:, None] * WIDTH + cols[None, :], mask=mask, other=0.0)  # DW: this row's
    lam0 = tl.load(LAM + row_q[:, None] * WIDTH + cols[None, :], mask=mask, other=0.0)
    lam1 = tl.load(LAM + (row_q + 1)[:, None] * WIDTH + cols[None, :], mask=mask, other=0.0)
    return (m[:, None] * dw + tl.load(t, mask=ok_q, other=0.0)[:, None] * lam0
            + tl.load(t + 2, mask=ok_q, other=0.0)[:, None] * lam1)


@triton.jit
def _transfer_backward_kernel(T, M, RANK, PHI, DW, DX, LAM, DS, DT, DM, DD, t_r, t_p, m_r, m_p, C0, C1, P, WIDTH,
                              BI: tl.constexpr, BC: tl.constexpr, HAS_DIRECT: tl.constexpr):
    """The adjoint of _transfer_kernel, anti-diagonals in reverse: lambda (dLoss/dphi of every edge, kept in LAM)
    from the read-outs, transitions and exits downstream, then the gates' gradients (contiguous, rank order)."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BC)
    col_ok = cols < WIDTH
    E = C0 + C1
    DW = DW + r * P * WIDTH
    for back in range(C0 + C1 - 1):
        d = C0 + C1 - 2 - back
        i, j, ok, rank = _diagonal(RANK, d, C0, C1, BI)
        mask = ok[:, None] & col_ok[None, :]
        below = ok & (i + 1 < C0)
        rank_below = tl.load(RANK + (i + 1) * C1 + j, mask=below, other=0)
        lam0 = _successor(T, M, DW, LAM, r, rank_below, below, (r * P + (i + 1) * C1 + j) * 2, cols, col_ok,
                          t_r, t_p, m_r, m_p, WIDTH, 0)
        lam0 += tl.load(DX + (r * E + j)[:, None] * WIDTH + cols[None, :], mask=mask & (i == C0 - 1)[:, None], other=0.0)
        right = ok & (j + 1 < C1)
        rank_right = tl.load(RANK + i * C1 + j + 1, mask=right, other=0)
        lam1 = _successor(T, M, DW, LAM, r, rank_right, right, (r * P + i * C1 + j + 1) * 2, cols, col_ok,
                          t_r, t_p, m_r, m_p, WIDTH, 1)
        lam1 += tl.load(DX + (r * E + C1 + i)[:, None] * WIDTH + cols[None, :], mask=mask & (j == C1 - 1)[:, None],
                        other=0.0)
        row = (r * P + i * C1 + j) * 2
        tl.store(LAM + row[:, None] * WIDTH + cols[None, :], lam0, mask=mask)
        tl.store(LAM + (row + 1)[:, None] * WIDTH + cols[None, :], lam1, mask=mask)
        in0, in1 = _transfer_rows(PHI, r, i, j, ok, cols, col_ok, P, C1, WIDTH)
        own = (cols[None, :] == rank[:, None]).to(tl.float32)
        dw = tl.load(DW + rank[:, None] * WIDTH + cols[None, :], mask=mask, other=0.0)
        out = r * P + rank
        tl.store(DS + out * 2, tl.sum(lam0 * own, 1), mask=ok)
        tl.store(DS + out * 2 + 1, tl.sum(lam1 * own, 1), mask=ok)
        tl.store(DT + out * 4, tl.sum(lam0 * in0, 1), mask=ok)
        tl.store(DT + out * 4 + 1, tl.sum(lam0 * in1, 1), mask=ok)
        tl.store(DT + out * 4 + 2, tl.sum(lam1 * in0, 1), mask=ok)
        tl.store(DT + out * 4 + 3, tl.sum(lam1 * in1, 1), mask=ok)
        tl.store(DM + out * 2, tl.sum(dw * in0, 1), mask=ok)
        tl.store(DM + out * 2 + 1, tl.sum(dw * in1, 1), mask=ok)
        if HAS_DIRECT:
            tl.store(DD + out, tl.sum(dw * own, 1), mask=ok)
        tl.debug_barrier()  # the previous diagonal reads these adjoints


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _precision(x: torch.Tensor) -> str:
    # float32 inputs: exact float32 products (the CPU bound is 1e-5); half inputs run on half tensor cores
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _row_strides(*xs: torch.Tensor) -> list[int]:
    return [s for x in xs for s in (x.stride(0), x.stride(1))]


def _sizes(q, v, weights):
    rows, positions, dk = q.shape
    return rows, positions, weights.shape[-1] - positions, weights.shape[-1], dk, v.shape[-1]


BLOCK_P = 64  # query and source blocks of the readout


@torch.library.custom_op("mdlrnn::tile_readout", mutates_args=())
def tile_readout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor,
                 entering: Optional[torch.Tensor]) -> torch.Tensor:
    """y (R, P, Dv) float32. q, k: (R, P, Dk), v: (R, P, Dv), unit last stride, one dtype; weights (R, P, P + E)
    float32 contiguous; entering (R, E, Dk, Dv) float32 contiguous, or None where no state enters (E unused)."""
    rows, positions, border, width, dk, dv = _sizes(q, v, weights)
    y = empty(rows, positions, dv, device=q.device)
    bv = min(64, _block(dv))
    with on_device(q.device):
        _readout_kernel[(rows, triton.cdiv(positions, BLOCK_P), triton.cdiv(dv, bv))](
            q, k, v, weights, entering if entering is not None else weights, y, *_row_strides(q, k, v),
            positions, border, width, dk, dv, BP=BLOCK_P, BS=BLOCK_P, BK=_block(dk), BV=bv,
            HAS_BORDER=entering is not None, PRECISION=_precision(q))
    return y


@tile_readout.register_fake
def _(q, k, v, weights, entering):
    return q.new_empty(*q.shape[:2], v.shape[-1], dtype=torch.float32)


@torch.library.custom_op("mdlrnn::tile_readout_backward", mutates_args=())
def tile_readout_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weights: torch.Tensor,
                          entering: Optional[torch.Tensor], dy: torch.Tensor) -> list[torch.Tensor]:
    """[dq, dk, dv, d_weights, d_entering] in float32 (d_entering empty without entering states)."""
    rows, positions, border, width, dk, dv = _sizes(q, v, weights)
    dy = dy.float().contiguous()
    f32 = dict(device=q.device, dtype=torch.float32)
    dq, dk_, dv_ = (empty(rows, positions, n, device=q.device) for n in (dk, dk, dv))
    d_weights = torch.zeros(rows, positions, width, **f32)  # W[p, s] for s after p is never read: zero
    d_entering = empty(rows, border, dk, dv, device=q.device) if entering is not None else dy.new_empty(0)
    blocks, common = triton.cdiv(positions, BLOCK_P), dict(BK=_block(dk), BV=_block(dv), PRECISION=_precision(q))
    bv = min(64, _block(dv))
    with on_device(q.device):
        _readout_sources_kernel[(rows, blocks)](
            q, k, v, weights, dy, dk_, dv_, d_weights, *_row_strides(q, k, v), positions, width, dk, dv,
            BP=BLOCK_P, BS=BLOCK_P, **common)
        _readout_queries_kernel[(rows, blocks)](
            q, k, v, weights, entering if entering is not None else weights, dy, dq, d_weights,
            *_row_strides(q, k, v), positions, border, width, dk, dv, BP=BLOCK_P, BS=BLOCK_P,
            HAS_BORDER=entering is not None, **common)
        if entering is not None:
            _outer_sums_kernel[(rows, border, triton.cdiv(dv, bv))](  # dC_j = sum_p W[p, P + j] q_p dy_p^T
                q, dy, weights[..., positions:], d_entering, q.stride(0), q.stride(1), dy.stride(0), dy.stride(1),
                positions * width, 1, width, positions, border, dk, dv, BS=BLOCK_P, BA=_block(dk), BB=bv,
                PRECISION=_precision(q))
    return [dq, dk_, dv_, d_weights, d_entering]


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
    rows, positions, dk = k.shape
    border, dv = exits.shape[1], v.shape[-1]
    u = empty(rows, border, dk, dv, device=k.device)
    bv = min(64, _block(dv))
    with on_device(k.device):
        _outer_sums_kernel[(rows, border, triton.cdiv(dv, bv))](  # U_e = sum_s X[e, s] k_s v_s^T
            k, v, exits, u, *_row_strides(k, v), border * exits.shape[-1], exits.shape[-1], 1, positions, border,
            dk, dv, BS=BLOCK_P, BA=_block(dk), BB=bv, PRECISION=_precision(k))
    return u


@tile_exits.register_fake
def _(k, v, exits):
    return k.new_empty(k.shape[0], exits.shape[1], k.shape[-1], v.shape[-1], dtype=torch.float32)


@torch.library.custom_op("mdlrnn::tile_exits_backward", mutates_args=())
def tile_exits_backward(k: torch.Tensor, v: torch.Tensor, exits: torch.Tensor, du: torch.Tensor) -> list[torch.Tensor]:
    """[dk, dv, d_exits] in float32 (d_exits zero in its last E columns)."""
    rows, positions, dk = k.shape
    border, width, dv = exits.shape[1], exits.shape[-1], v.shape[-1]
    du = du.float().contiguous()
    f32 = dict(device=k.device, dtype=torch.float32)
    dk_, dv_ = empty(rows, positions, dk, device=k.device), empty(rows, positions, dv, device=k.device)
    d_exits = torch.zeros(rows, border, width, **f32)
    with on_device(k.device):
        _exits_backward_kernel[(rows, triton.cdiv(positions, BLOCK_P))](
            k, v, exits, du, dk_, dv_, d_exits, *_row_strides(k, v), positions, border, width, dk, dv,
            BS=BLOCK_P, BK=_block(dk), BV=_block(dv), PRECISION=_precision(k))
    return [dk_, dv_, d_exits]


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


def _gate_strides(*xs: Optional[torch.Tensor]) -> list[int]:
    return [s for x in xs for s in ((x.stride(0), x.stride(1)) if x is not None else (0, 0))]


@lru_cache(maxsize=64)
def _ranks(tile: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(C0 * C1,) wavefront rank of each position of a 2D tile, in row-major order."""
    order = wavefront(tile).order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank.to(device, torch.int32)


@torch.library.custom_op("mdlrnn::tile_transfer", mutates_args=())
def tile_transfer(source: torch.Tensor, transition: torch.Tensor, mark: torch.Tensor, direct: Optional[torch.Tensor],
                  ranks: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[W (R, P, P + E), X (R, E, P + E), phi (R, 2 P, P + E)] of rows x cols tiles, float32.

    source, mark (R, P, 2), transition (R, P, 4), direct (R, P, 1) or None: float32 gates in wavefront order
    with unit last stride; ranks: _ranks((rows, cols))."""
    tiles, positions = source.shape[:2]
    border = rows + cols
    width = positions + border
    phi = empty(tiles, 2 * positions, width, device=source.device)
    weights = empty(tiles, positions, width, device=source.device)
    exits = empty(tiles, border, width, device=source.device)
    with on_device(source.device):
        _transfer_kernel[(tiles,)](
            source, transition, mark, direct if direct is not None else source, ranks, phi, weights, exits,
            *_gate_strides(source, transition, mark, direct), rows, cols, positions, width,
            BI=_block(min(rows, cols)), BC=_block(width), HAS_DIRECT=direct is not None, num_warps=8)
    return weights, exits, phi


@tile_transfer.register_fake
def _(source, transition, mark, direct, ranks, rows, cols):
    tiles, positions = source.shape[:2]
    width = positions + rows + cols
    new = lambda *shape: source.new_empty(*shape, dtype=torch.float32)
    return new(tiles, positions, width), new(tiles, rows + cols, width), new(tiles, 2 * positions, width)


@torch.library.custom_op("mdlrnn::tile_transfer_backward", mutates_args=())
def tile_transfer_backward(transition: torch.Tensor, mark: torch.Tensor, has_direct: bool, ranks: torch.Tensor,
                           phi: torch.Tensor, d_weights: torch.Tensor, d_exits: torch.Tensor, rows: int,
                           cols: int) -> list[torch.Tensor]:
    """[d_source, d_transition, d_mark, d_direct] (d_direct empty without direct), float32 contiguous."""
    tiles, positions = mark.shape[:2]
    width = positions + rows + cols
    d_source, d_mark = empty(tiles, positions, 2, device=mark.device), empty(tiles, positions, 2, device=mark.device)
    d_transition = empty(tiles, positions, 4, device=mark.device)
    d_direct = empty(tiles, positions, 1, device=mark.device) if has_direct else d_source.new_empty(0)
    adjoints = empty(*phi.shape, device=mark.device)
    with on_device(mark.device):
        _transfer_backward_kernel[(tiles,)](
            transition, mark, ranks, phi, d_weights.float().contiguous(), d_exits.float().contiguous(), adjoints,
            d_source, d_transition, d_mark, d_direct if has_direct else d_source, *_gate_strides(transition, mark),
            rows, cols, positions, width, BI=_block(min(rows, cols)), BC=_block(width), HAS_DIRECT=has_direct,
            num_warps=8)
    return [d_source, d_transition, d_mark, d_direct]


@tile_transfer_backward.register_fake
def _(transition, mark, has_direct, ranks, phi, d_weights, d_exits, rows, cols):
    f32 = lambda x: x.new_empty(x.shape, dtype=torch.float32)  # contiguous, as the real gradients
    grads = [f32(mark), f32(transition), f32(mark)]
    return [*grads, mark.new_empty(*mark.shape[:2], 1, dtype=torch.float32) if has_direct else mark.new_empty(0)]


# Tiles of the Triton path: grids of up to WHOLE_GRID positions are one tile (no state crosses a border:
# the readout alone, a masked quadratic form like attention); larger grids use tiles of TILE_EDGE per axis.
WHOLE_GRID = 256
TILE_EDGE = 16


class TritonTiles(TorchTiles):
    """mdlrnn.ops.grid.chunk.TorchTiles with the read-out and exits on the kernels above and its own tile shape
    (3D grids; 2D grids run all of it, the transfer kernel too, as mdlrnn.kernels.grid2d's op)."""

    @staticmethod
    def tile(sizes: tuple[int, ...]) -> tuple[int, ...]:
        if len(sizes) != 2:  # the torch weight solve is dense per tile: keep the torch path's small tiles
            return tile_shape(sizes)
        if math.prod(sizes) <= WHOLE_GRID:
            return sizes
        return tuple(min(s, TILE_EDGE) for s in sizes)

    exits = staticmethod(tile_exits)
    readout = staticmethod(tile_readout)
