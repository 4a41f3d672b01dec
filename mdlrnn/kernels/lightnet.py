r"""Triton kernels for LightNet's causal mode: chunkwise linear attention with decays from running maxima.

Per key channel c, y_p = scale sum_c q_p[c] sum_{s<=p} e^{k_s[c]} v_s / sum_{s<=p} e^{k_s[c]}. With the running
maximum m_p = max_{s<=p} k_s and z_p = sum_{s<=p} e^{k_s - m_p} (per channel), let q'_p = scale q_p / z_p and
k'_s = e^{k_s - m_s}. Then

    y_p = sum_{s<=p} (sum_c q'_p[c] k'_s[c] e^{m_s[c] - m_p[c]}) v_s,

linear attention whose per-channel decays e^{m_s - m_p} come from the maxima. The output does not depend on
m, so m carries no gradient: the gradient reaches k through k' and z only. Every exponent is m_a - m_b with a
before b, so every factor is <= 1 and logits of any size stay finite; a product split at a row r between s and
p, e^{m_s - m_p} = e^{m_s - m_r} e^{m_r - m_p}, keeps both halves <= 1. (z is summed in the frame of m, never
as log-sum-exp: a float32 log of size 200 has ulps of 1e-5, which would be the relative error of e^{m - L}.)

Every pass over the sequence is split in two: programs over blocks compute what each block passes on, then
what enters each block is joined from those, so that no program walks the whole sequence.
- prefix (at most MAX_PREFIX_BLOCKS blocks per head, each a run of PREFIX_ROWS-row pieces walked in order):
  `_block_summary_kernel` (each block's max and sum), `_prefix_kernel` (the (m, z) entering its block joined
  from the earlier blocks' summaries, then m, z, q', k' per row: a scan of (m, z) pairs); backward the same two
  for r_s = sum_{p>=s} e^{m_s - m_p} dz_p, the gradient through z, read backwards.
- states (chunks of CHUNK): `_chunk_state_kernel` (what each chunk adds), `_state_carry_kernel` (one short
  sequential pass per state block, four chunks' loads at a time ahead of the carry: the state
  entering each chunk, h_c = sum_{s < c CHUNK} k'_s e^{m_s - m_{c CHUNK - 1}} v_s^T; in reverse the adjoint of the
  state leaving each chunk, from q' and dy).
- `_output_kernel`: SUB rows of y: the entering state, the chunk's earlier blocks as tensor-core products split
  at their last row, and the block itself: one product split at its first row while the maxima rise by less
  than SPREAD inside it, else one key row at a time.
- `_gradient_kernel`: SUB rows of dq', dk' and dv: the entering state and earlier blocks for dq', the leaving
  adjoint state and later blocks for dk' and dv, the block itself for all three.
Rotary angles double the channels: [q' cos, q' sin] and [k' cos, k' sin], since
cos(a_p - a_s) = cos a_p cos a_s + sin a_p sin a_s.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import (cdiv, eager_forward, empty, first_order_only, next_power_of_2, on_device, run, shared_memory,
               unit_last_stride)

SPREAD = tl.constexpr(60.0)  # how far the maxima may rise inside a block for its scores to be one product (e^60 ~ 1e26)
SUB = 32  # rows per block of the output and gradient kernels (64x64 B=8 on the H200, against 16 rows: output 74 ->
# 62 us, gradient 200 -> 177; with rotary angles 151 -> 116 and 615 -> 414; 64 rows: gradient 215): see _block_rows
ROW_STAGES = 1  # pipeline stages of the output and gradient kernels: their short loops over a chunk's blocks gain
# nothing from loads staged in shared memory (16-row blocks, 64x64 B=8 on the H200: gradient 210 -> 200 us, output
# 83 -> 74 us against Triton's default 3; 4 stages 217 and 92)
MAX_DK = 128  # channels (2 Dk with rotary angles) and values one program holds
MAX_DV = 128
CHUNK = 64  # positions per chunk: states stored per chunk, and the sequential passes take one step per chunk


@triton.jit
def _rows(X, base, rows, valid, cols, ncols, row_stride):
    """X[base + rows * row_stride + cols] in float32, zero outside the valid rows and columns."""
    ptr = X + base + tl.cast(rows, tl.int64)[:, None] * row_stride + cols[None, :]
    return tl.load(ptr, mask=valid[:, None] & (cols < ncols)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _row(M, base, row, cols, ncols, row_stride):
    """One row of m (a frame: the maxima at a block boundary)."""
    return tl.load(M + base + tl.cast(row, tl.int64) * row_stride + cols, mask=cols < ncols, other=0.0)


@triton.jit
def _decay(valid, later_m, earlier_m):
    """e^{earlier - later} on valid rows (<= 1 when the earlier frame comes first), zero elsewhere: a row past
    the end reads m = 0, whose exponent could overflow."""
    return tl.where(valid[:, None], tl.exp(tl.where(valid[:, None], earlier_m - later_m, 0.0)), 0.0)


@triton.jit
def _split(m, valid):
    """A block's factors e^{r - m} (<= 1) and e^{m - r} (>= 1) at its first row r, and the largest rise m - r:
    below SPREAD both factors stay well inside float32 and the block's own scores are one product
    (q' e^{r - m}) (k' e^{m - r})^T, masked to s <= p."""
    first = tl.min(tl.where(valid[:, None], m, float("inf")), 0)
    rise = tl.where(valid[:, None], m - first[None, :], 0.0)
    return tl.exp(-rise), tl.exp(rise), tl.max(tl.max(rise, 1), 0)


@triton.jit
def _column_decays(m, valid, M, base, row, N, cols, ncols, row_stride, SUB: tl.constexpr):
    """Where m rises by SPREAD or more inside a block, its scores one key row s at a time: k'_s, and
    e^{m_s - m_p} for the block's rows p >= s (zero elsewhere)."""
    r = tl.arange(0, SUB)
    s = row - (row // SUB) * SUB
    m_s = tl.load(M + base + tl.cast(row, tl.int64) * row_stride + cols, mask=(cols < ncols) & (row < N), other=0.0)
    keep = (valid & (r >= s) & (row < N))[:, None]
    return tl.where(keep, tl.exp(tl.where(keep, m_s[None, :] - m, 0.0)), 0.0)


@triton.jit
def _key_row(q, m, valid, KP, M, base, i0, s, N, cols, ncols, row_stride, SUB: tl.constexpr):
    """Key row s of a block whose maxima rise by SPREAD or more inside it: k'_s, the decays e^{m_s - m_p} of the
    block's rows p >= s (zero elsewhere) and the scores' column s."""
    row = i0 + s
    k_s = _row(KP, base, row, cols, tl.where(row < N, ncols, 0), row_stride)
    decays = _column_decays(m, valid, M, base, row, N, cols, ncols, row_stride, SUB)
    return k_s, decays, tl.sum(q * k_s[None, :] * decays, 1)


@triton.jit
def _chunk_state_kernel(A, M, X, STATES, sxb, sxn, sxh, N, H, K, V, NC,
                        BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
                        PRECISION: tl.constexpr):
    """What chunk c adds to the state passed on (programs over chunks and blocks of the state).
    Forward (A = k', X = v): sum_{s in c} k'_s e^{m_s - m_last} v_s^T, in the frame of the chunk's last row.
    Reverse (A = q', X = dy): sum_{p in c} q'_p e^{m_before - m_p} dy_p^T, in the frame of the row before it."""
    c, bh, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // H, bh % H
    col_k = (block // tl.cdiv(V, BV)) * BK + tl.arange(0, BK)
    col_v = (block % tl.cdiv(V, BV)) * BV + tl.arange(0, BV)
    base_k = (b * N * H + h).to(tl.int64) * K
    rows = c * BC + tl.arange(0, BC)
    valid = rows < N
    a = _rows(A, base_k, rows, valid, col_k, K, H * K)
    m = _rows(M, base_k, rows, valid, col_k, K, H * K)
    x = _rows(X, b.to(tl.int64) * sxb + h * sxh, rows, valid, col_v, V, sxn)
    if REVERSE:
        before = _row(M, base_k, tl.maximum(c * BC - 1, 0), col_k, K, H * K)
        weighted = a * _decay(valid, m, before[None, :])
    else:
        last = _row(M, base_k, tl.minimum(c * BC + BC, N) - 1, col_k, K, H * K)
        weighted = a * _decay(valid, last[None, :], m)
    out = STATES + (bh.to(tl.int64) * NC + c) * K * V + col_k[:, None] * V + col_v[None, :]
    tl.store(out, tl.dot(tl.trans(weighted), x, input_precision=PRECISION),
             mask=(col_k < K)[:, None] & (col_v < V)[None, :])


@triton.jit
def _carry_load(M, ADDED, at, mask, base_k, col_k, step, N, H, K, V, NC, BC: tl.constexpr, REVERSE: tl.constexpr):
    """What chunk step `step` of the carry adds and its rescaling e^{m_before - m_last} (clamped past the end)."""
    c = tl.minimum(step, NC - 1)
    if REVERSE:
        c = NC - 1 - c
    before = _row(M, base_k, tl.maximum(c * BC - 1, 0), col_k, K, H * K)
    last = _row(M, base_k, tl.minimum(c * BC + BC, N) - 1, col_k, K, H * K)
    return tl.load(ADDED + at + c * K * V, mask=mask, other=0.0), tl.exp(before - last)


@triton.jit
def _carry_step(STATES, at, mask, state, added, rescale, step, K, V, NC, REVERSE: tl.constexpr):
    """Stores the state at chunk step `step` (none past the end) and carries it across that chunk."""
    c = step
    if REVERSE:
        c = NC - 1 - step
    tl.store(STATES + at + c * K * V, state, mask=mask & (step < NC))
    return rescale[:, None] * state + added


@triton.jit
def _state_carry_kernel(M, ADDED, STATES, N, H, K, V, NC, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        REVERSE: tl.constexpr):
    """From the chunks' contributions ADDED, one step per chunk: forward, STATES[c] = h_c, the state entering
    chunk c (frame m_{c BC - 1}); reverse, the adjoint of the state leaving chunk c (frame of its last row). A step
    rescales by e^{m_before - m_last} of the chunk it crosses. Four chunks' loads are issued before their four
    steps: a step is a few FMAs, so a loop that loaded one chunk at a time waited a memory latency per chunk
    (both directions at 64x64 B=8 on the H200: 71 us one chunk at a time, 37 four at a time, 36 eight)."""
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    col_k = tl.program_id(1) * BK + tl.arange(0, BK)
    col_v = tl.program_id(2) * BV + tl.arange(0, BV)
    base_k = (b * N * H + h).to(tl.int64) * K
    at = bh.to(tl.int64) * NC * K * V + col_k[:, None] * V + col_v[None, :]
    mask = (col_k < K)[:, None] & (col_v < V)[None, :]
    state = tl.zeros((BK, BV), tl.float32)
    for step in range(0, NC, 4):
        a0, r0 = _carry_load(M, ADDED, at, mask, base_k, col_k, step, N, H, K, V, NC, BC, REVERSE)
        a1, r1 = _carry_load(M, ADDED, at, mask, base_k, col_k, step + 1, N, H, K, V, NC, BC, REVERSE)
        a2, r2 = _carry_load(M, ADDED, at, mask, base_k, col_k, step + 2, N, H, K, V, NC, BC, REVERSE)
        a3, r3 = _carry_load(M, ADDED, at, mask, base_k, col_k, step + 3, N, H, K, V, NC, BC, REVERSE)
        state = _carry_step(STATES, at, mask, state, a0, r0, step, K, V, NC, REVERSE)
        state = _carry_step(STATES, at, mask, state, a1, r1, step + 1, K, V, NC, REVERSE)
        state = _carry_step(STATES, at, mask, state, a2, r2, step + 2, K, V, NC, REVERSE)
        state = _carry_step(STATES, at, mask, state, a3, r3, step + 3, K, V, NC, REVERSE)


@triton.jit
def _output_kernel(QP, KP, M, V, STATES, Y, svb, svn, svh, N, H, K, DV, NC,
                   BC: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    i0 = tl.program_id(0) * SUB
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    c = i0 // BC
    c0 = c * BC
    col_k, col_v = tl.arange(0, BK), tl.arange(0, BV)
    base_k = (b * N * H + h).to(tl.int64) * K
    base_v = b.to(tl.int64) * svb + h * svh
    rows_i = i0 + tl.arange(0, SUB)
    valid_i = rows_i < N
    q = _rows(QP, base_k, rows_i, valid_i, col_k, K, H * K)
    m_i = _rows(M, base_k, rows_i, valid_i, col_k, K, H * K)

    before = _row(M, base_k, tl.maximum(c0 - 1, 0), col_k, K, H * K)
    state = tl.load(STATES + (bh.to(tl.int64) * NC + c) * K * DV + col_k[:, None] * DV + col_v[None, :],
                    mask=(col_k < K)[:, None] & (col_v < DV)[None, :], other=0.0)
    y = tl.dot(q * _decay(valid_i, m_i, before[None, :]), state, input_precision=PRECISION)
    for j0 in range(c0, i0, SUB):  # earlier blocks of the chunk: full, split at their last row
        rows_j = j0 + tl.arange(0, SUB)
        full = rows_j < N
        ref = _row(M, base_k, j0 + SUB - 1, col_k, K, H * K)
        m_j = _rows(M, base_k, rows_j, full, col_k, K, H * K)
        k_j = _rows(KP, base_k, rows_j, full, col_k, K, H * K) * _decay(full, ref[None, :], m_j)
        scores = tl.dot(q * _decay(valid_i, m_i, ref[None, :]), tl.trans(k_j), input_precision=PRECISION)
        y += tl.dot(scores, _rows(V, base_v, rows_j, full, col_v, DV, svn), input_precision=PRECISION)
    k_i = _rows(KP, base_k, rows_i, valid_i, col_k, K, H * K)
    down, up, rise = _split(m_i, valid_i)
    r = tl.arange(0, SUB)
    if rise < SPREAD:
        scores = tl.dot(q * down, tl.trans(k_i * up), input_precision=PRECISION)
        scores = tl.where(r[:, None] >= r[None, :], scores, 0.0)
    else:
        scores = tl.zeros((SUB, SUB), tl.float32)
        for s in range(SUB):
            _, _, column = _key_row(q, m_i, valid_i, KP, M, base_k, i0, s, N, col_k, K, H * K, SUB)
            scores += tl.where(r[None, :] == s, column[:, None], 0.0)
    y += tl.dot(scores, _rows(V, base_v, rows_i, valid_i, col_v, DV, svn), input_precision=PRECISION)
    y_rows = ((b * N + rows_i).to(tl.int64) * H + h) * DV
    tl.store(Y + y_rows[:, None] + col_v[None, :], y.to(Y.dtype.element_ty), mask=valid_i[:, None] & (col_v < DV)[None, :])


@triton.jit
def _gradient_kernel(QP, KP, M, V, DY, STATES, ADJOINTS, DQ, DK, DVOUT, svb, svn, svh, sdb, sdn, sdh,
                     N, H, K, DV, NC, BC: tl.constexpr, SUB: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     PRECISION: tl.constexpr):
    i0 = tl.program_id(0) * SUB
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    c = i0 // BC
    c0 = c * BC
    end = tl.minimum(c0 + BC, N)
    col_k, col_v = tl.arange(0, BK), tl.arange(0, BV)
    mask_kv = (col_k < K)[:, None] & (col_v < DV)[None, :]
    base_k = (b * N * H + h).to(tl.int64) * K
    base_v = b.to(tl.int64) * svb + h * svh
    base_dy = b.to(tl.int64) * sdb + h * sdh
    rows_i = i0 + tl.arange(0, SUB)
    valid_i = rows_i < N
    q_i = _rows(QP, base_k, rows_i, valid_i, col_k, K, H * K)
    k_i = _rows(KP, base_k, rows_i, valid_i, col_k, K, H * K)
    m_i = _rows(M, base_k, rows_i, valid_i, col_k, K, H * K)
    v_i = _rows(V, base_v, rows_i, valid_i, col_v, DV, svn)
    dy_i = _rows(DY, base_dy, rows_i, valid_i, col_v, DV, sdn)
    state_at = (bh.to(tl.int64) * NC + c) * K * DV + col_k[:, None] * DV + col_v[None, :]

    # dq': the state entering the chunk, the chunk's earlier blocks
    before = _row(M, base_k, tl.maximum(c0 - 1, 0), col_k, K, H * K)
    entering = tl.load(STATES + state_at, mask=mask_kv, other=0.0)
    dq = _decay(valid_i, m_i, before[None, :]) * tl.dot(dy_i, tl.trans(entering), input_precision=PRECISION)
    for j0 in range(c0, i0, SUB):
        rows_j = j0 + tl.arange(0, SUB)
        full = rows_j < N
        ref = _row(M, base_k, j0 + SUB - 1, col_k, K, H * K)
        m_j = _rows(M, base_k, rows_j, full, col_k, K, H * K)
        k_j = _rows(KP, base_k, rows_j, full, col_k, K, H * K) * _decay(full, ref[None, :], m_j)
        dy_v = tl.dot(dy_i, tl.trans(_rows(V, base_v, rows_j, full, col_v, DV, svn)), input_precision=PRECISION)
        dq += _decay(valid_i, m_i, ref[None, :]) * tl.dot(dy_v, k_j, input_precision=PRECISION)

    # dk', dv: the adjoint of the state leaving the chunk, the chunk's later blocks (split at this block's last row)
    last = _row(M, base_k, end - 1, col_k, K, H * K)
    adjoint = tl.load(ADJOINTS + state_at, mask=mask_kv, other=0.0)
    leaving = _decay(valid_i, last[None, :], m_i)
    dk = leaving * tl.dot(v_i, tl.trans(adjoint), input_precision=PRECISION)
    dv = tl.dot(k_i * leaving, adjoint, input_precision=PRECISION)
    ref = _row(M, base_k, tl.minimum(i0 + SUB, N) - 1, col_k, K, H * K)
    k_out = k_i * _decay(valid_i, ref[None, :], m_i)
    for p0 in range(i0 + SUB, end, SUB):
        rows_p = p0 + tl.arange(0, SUB)
        valid_p = rows_p < N
        q_p = _rows(QP, base_k, rows_p, valid_p, col_k, K, H * K)
        q_p *= _decay(valid_p, _rows(M, base_k, rows_p, valid_p, col_k, K, H * K), ref[None, :])
        dy_p = _rows(DY, base_dy, rows_p, valid_p, col_v, DV, sdn)
        scores = tl.dot(q_p, tl.trans(k_out), input_precision=PRECISION)  # [p, s]
        dv += tl.dot(tl.trans(scores), dy_p, input_precision=PRECISION)
        dy_v = tl.dot(dy_p, tl.trans(v_i), input_precision=PRECISION)  # [p, s]
        dk += _decay(valid_i, ref[None, :], m_i) * tl.dot(tl.trans(dy_v), q_p, input_precision=PRECISION)

    # the block itself
    down, up, rise = _split(m_i, valid_i)
    r = tl.arange(0, SUB)
    causal = r[:, None] >= r[None, :]
    dy_v = tl.where(causal, tl.dot(dy_i, tl.trans(v_i), input_precision=PRECISION), 0.0)  # [p, s]
    if rise < SPREAD:
        scores = tl.where(causal, tl.dot(q_i * down, tl.trans(k_i * up), input_precision=PRECISION), 0.0)
        dq += down * tl.dot(dy_v, k_i * up, input_precision=PRECISION)
        dk += up * tl.dot(tl.trans(dy_v), q_i * down, input_precision=PRECISION)
    else:
        scores = tl.zeros((SUB, SUB), tl.float32)
        for s in range(SUB):
            k_s, decays, column = _key_row(q_i, m_i, valid_i, KP, M, base_k, i0, s, N, col_k, K, H * K, SUB)
            scores += tl.where(r[None, :] == s, column[:, None], 0.0)
            dy_v_s = tl.sum(tl.where(r[None, :] == s, dy_v, 0.0), 1)  # [p]
            dq += dy_v_s[:, None] * k_s[None, :] * decays
            dk += tl.where(r[:, None] == s, tl.sum(dy_v_s[:, None] * q_i * decays, 0)[None, :], 0.0)
    dv += tl.dot(tl.trans(scores), dy_i, input_precision=PRECISION)

    rows_k = ((b * N + rows_i).to(tl.int64) * H + h) * K
    rows_v = ((b * N + rows_i).to(tl.int64) * H + h) * DV
    mask_k = valid_i[:, None] & (col_k < K)[None, :]
    tl.store(DQ + rows_k[:, None] + col_k[None, :], dq, mask=mask_k)
    tl.store(DK + rows_k[:, None] + col_k[None, :], dk, mask=mask_k)
    tl.store(DVOUT + rows_v[:, None] + col_v[None, :], dv.to(DVOUT.dtype.element_ty),
             mask=valid_i[:, None] & (col_v < DV)[None, :])


@triton.jit
def _max_sum(m1, z1, m2, z2):
    """Combines (m, z) pairs, z summing e^{k - m} in the frame of the running maximum m."""
    m = tl.maximum(m1, m2)
    return m, z1 * tl.exp(m1 - m) + z2 * tl.exp(m2 - m)


@triton.jit
def _affine(a1, b1, a2, b2):
    """Composes x -> b1 + a1 x, then x -> b2 + a2 x."""
    return a1 * a2, b2 + a2 * b1


@triton.jit
def _prefix_ids(N, H, SPAN, BK: tl.constexpr):
    """This program's block of SPAN rows of one (batch, head): ids, first row, end, columns, row base."""
    blk, bh = tl.program_id(0), tl.program_id(1)
    first = blk * SPAN
    return blk, bh, bh // H, bh % H, first, tl.minimum(first + SPAN, N), tl.arange(0, BK)


@triton.jit
def _keys(K, base, rows, valid, cols, DK, skn):
    """k of BN rows in float32: -inf on rows past the end (nothing), 0 in columns past DK."""
    k = tl.load(K + base + tl.cast(rows, tl.int64)[:, None] * skn + cols[None, :],
                mask=valid[:, None] & (cols < DK)[None, :], other=float("-inf")).to(tl.float32)
    return tl.where((cols < DK)[None, :], k, 0.0)


@triton.jit
def _joined(m, z, k):
    """(m, z) of some rows joined with the rows of k: the maximum and the sum of e^{k - max}."""
    top = tl.maximum(m, tl.max(k, 0))
    return top, z * tl.exp(m - top) + tl.sum(tl.exp(k - top[None, :]), 0)


@triton.jit
def _block_summary_kernel(K, QP, Z, M, OUT_A, OUT_B, skb, skn, skh, N, H, DK, NB, SPAN,
                          BN: tl.constexpr, BK: tl.constexpr, REVERSE: tl.constexpr):
    """What each block of SPAN rows passes on, per channel, walked BN rows at a time. Forward (from k): its
    maximum and sum e^{k - max}. Reverse (from q', z and dq' in K): m at its first row and sum_p e^{m_first - m_p}
    dz_p (dz = -dq' q' / z), the part of r = sum_{p>=s} e^{m_s - m_p} dz_p that it adds to the rows before it."""
    blk, bh, b, h, first, end, cols = _prefix_ids(N, H, SPAN, BK)
    out = (bh.to(tl.int64) * NB + blk) * DK + cols
    base = (b * N * H + h).to(tl.int64) * DK
    if REVERSE:
        m_first = _row(M, base, first, cols, DK, H * DK)
        total = tl.zeros((BK,), tl.float32)
        for r0 in range(first, end, BN):
            rows = r0 + tl.arange(0, BN)
            valid = rows < end
            mask = valid[:, None] & (cols < DK)[None, :]
            at = base + tl.cast(rows, tl.int64)[:, None] * H * DK + cols[None, :]
            dz = -tl.load(K + at, mask=mask, other=0.0) * tl.load(QP + at, mask=mask, other=0.0)
            dz /= tl.load(Z + at, mask=mask, other=1.0)
            total += tl.sum(_decay(valid, tl.load(M + at, mask=mask, other=0.0), m_first[None, :]) * dz, 0)
        tl.store(OUT_A + out, m_first, mask=cols < DK)
        tl.store(OUT_B + out, total, mask=cols < DK)
    else:
        top = tl.full((BK,), float("-inf"), tl.float32)
        total = tl.zeros((BK,), tl.float32)
        for r0 in range(first, end, BN):
            rows = r0 + tl.arange(0, BN)
            top, total = _joined(top, total, _keys(K, b.to(tl.int64) * skb + h * skh, rows, rows < end, cols, DK, skn))
        tl.store(OUT_A + out, top, mask=cols < DK)
        tl.store(OUT_B + out, total, mask=cols < DK)


@triton.jit
def _prefix_kernel(Q, K, SUM_M, SUM_Z, QP, KP, M, Z, sqb, sqn, sqh, skb, skn, skh, N, H, DK, NB, SPAN, scale,
                   BN: tl.constexpr, BK: tl.constexpr, CT: tl.constexpr):
    """m = cummax k, z = sum_{s<=p} e^{k_s - m_p}, k' = e^{k - m}, q' = scale q / z over one block of SPAN rows:
    the (m, z) of the rows before it joined from the earlier blocks' summaries (CT at a time), then BN rows at a
    time their (m, z) pairs scanned and joined to it."""
    blk, bh, b, h, first, end, cols = _prefix_ids(N, H, SPAN, BK)
    carry_m = tl.full((BK,), float("-inf"), tl.float32)
    carry_z = tl.zeros((BK,), tl.float32)
    for j0 in range(0, blk, CT):
        j = j0 + tl.arange(0, CT)
        ok = (j < blk)[:, None] & (cols < DK)[None, :]
        at = (bh.to(tl.int64) * NB + j)[:, None] * DK + cols[None, :]
        top = tl.where((cols < DK)[None, :], tl.load(SUM_M + at, mask=ok, other=float("-inf")), 0.0)
        new = tl.maximum(carry_m, tl.max(top, 0))
        carry_z = carry_z * tl.exp(carry_m - new) + tl.sum(tl.load(SUM_Z + at, mask=ok, other=0.0) *
                                                           tl.exp(top - new[None, :]), 0)
        carry_m = new
    base_k = b.to(tl.int64) * skb + h * skh
    for r0 in range(first, end, BN):
        rows = r0 + tl.arange(0, BN)
        valid = rows < end
        mask = valid[:, None] & (cols < DK)[None, :]
        rows64 = tl.cast(rows, tl.int64)[:, None]
        k = _keys(K, base_k, rows, valid, cols, DK, skn)
        m_rows, z_rows = tl.associative_scan((k, tl.full((BN, BK), 1.0, tl.float32)), 0, _max_sum)
        m = tl.maximum(m_rows, carry_m[None, :])
        z = z_rows * tl.exp(m_rows - m) + carry_z[None, :] * tl.exp(carry_m[None, :] - m)
        q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + rows64 * sqn + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        out = (b * N * H + h).to(tl.int64) * DK + rows64 * H * DK + cols[None, :]
        tl.store(M + out, m, mask=mask)
        tl.store(Z + out, z, mask=mask)
        tl.store(KP + out, tl.exp(k - m), mask=mask)
        tl.store(QP + out, scale * q / z, mask=mask)
        carry_m, carry_z = _joined(carry_m, carry_z, k)


@triton.jit
def _prefix_backward_kernel(QP, KP, M, Z, DQP, DKP, SUM_M, SUM_R, DQ, DK, N, H, DK_COLS, NB, SPAN, scale,
                            BN: tl.constexpr, BK: tl.constexpr, CT: tl.constexpr):
    """dq = scale dq' / z; dk_s = k'_s (dk'_s + r_s), r_s = sum_{p>=s} e^{m_s - m_p} dz_p with dz = -dq' q' / z,
    over one block of SPAN rows read backwards: r at the next block's first row from the later blocks'
    summaries (CT at a time; each in the frame of its first row m_j, all rescaled by e^{m_next - m_j} <= 1), then
    BN rows at a time the recurrence r_s = dz_s + e^{m_s - m_{s+1}} r_{s+1} scanned as affine maps."""
    blk, bh, b, h, first, end, cols = _prefix_ids(N, H, SPAN, BK)
    base = (b * N * H + h).to(tl.int64) * DK_COLS
    m_next = _row(M, base, tl.minimum(end, N - 1), cols, DK_COLS, H * DK_COLS)
    carry = tl.zeros((BK,), tl.float32)
    for j0 in range(blk + 1, NB, CT):
        j = j0 + tl.arange(0, CT)
        ok = (j < NB)[:, None] & (cols < DK_COLS)[None, :]
        at = (bh.to(tl.int64) * NB + j)[:, None] * DK_COLS + cols[None, :]
        rescale = tl.exp(tl.where(ok, m_next[None, :] - tl.load(SUM_M + at, mask=ok, other=0.0), 0.0))
        carry += tl.sum(tl.load(SUM_R + at, mask=ok, other=0.0) * rescale, 0)
    last = tl.arange(0, BN) == BN - 1  # in reverse order, the first row of BN
    pieces = tl.cdiv(end - first, BN)
    for piece in range(pieces):
        rows = first + (pieces - 1 - piece) * BN + BN - 1 - tl.arange(0, BN)  # backwards
        valid = rows < end
        mask = valid[:, None] & (cols < DK_COLS)[None, :]
        at = base + tl.cast(rows, tl.int64)[:, None] * H * DK_COLS + cols[None, :]
        qp = tl.load(QP + at, mask=mask, other=0.0)
        z = tl.load(Z + at, mask=mask, other=1.0)
        dqp = tl.load(DQP + at, mask=mask, other=0.0)
        m = tl.load(M + at, mask=mask, other=0.0)
        has_next = mask & (rows + 1 < N)[:, None]
        m_after = tl.load(M + at + H * DK_COLS, mask=has_next, other=0.0)
        decay = tl.where(has_next, tl.exp(tl.where(has_next, m - m_after, 0.0)), 1.0)
        tl.store(DQ + at, (scale * dqp / z).to(DQ.dtype.element_ty), mask=mask)
        a, r = tl.associative_scan((decay, -dqp * qp / z), 0, _affine)
        r += a * carry[None, :]
        dkp = tl.load(DKP + at, mask=mask, other=0.0)
        tl.store(DK + at, (tl.load(KP + at, mask=mask, other=0.0) * (dkp + r)).to(DK.dtype.element_ty), mask=mask)
        carry = tl.sum(tl.where(last[:, None], r, 0.0), 0)


# ------------------------------------------------------------------------------------------ host side

def _block(n: int) -> int:
    return max(16, next_power_of_2(n))


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _warps(channels: int, values: int, small: int, large: int) -> int:
    """Warps of the output and gradient kernels: `small` for float32 states of at most 64 x 64, `large` above
    (few warps would hold 128 x 128 floats in 256 registers a thread). Measured with 32-row blocks, 64x64 B=8 on
    the H200: output 62 us on 2 warps, 64 on 4, 89 on 8; gradient 177 on 4, 252 on 2 or 8; with rotary angles
    (128 x 64 states) output 116 on 4, 144 on 2, gradient 414 on 4 or 8."""
    return small if _block(channels) * _block(values) <= 64 * 64 else large


def _large_states(channels: int, values: int) -> bool:
    """States above 128 x 64 (channels x values): they take 16-row blocks (_block_rows) and, with half inputs, 128
    KiB of the gradient kernel's shared memory (fits_shared_memory)."""
    return _block(channels) * _block(values) > 128 * 64


def _block_rows(channels: int, values: int, chunk: int) -> int:
    """Rows per block of the output and gradient kernels: SUB for states of up to 128 x 64, 16 above (not
    measured there; with 32 rows the gradient kernel's 128 x 128 float32 states took 112 KiB of shared memory
    compiled for sm_86, whose limit is 99), never more than a chunk: a block must not cross a chunk's border."""
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk: expected a power of two of at least 16, got {chunk}")
    return min(16 if _large_states(channels, values) else SUB, chunk)


def fits_shared_memory(channels: int, values: int, element_size: int, device: torch.device) -> bool:
    """Whether the gradient kernel fits `device`'s shared memory: with half inputs and states above 128 x 64
    (channels x values) it takes 128 KiB (compiled for sm_86), more than the 99 KiB of consumer GPUs; A100 and
    Hopper have 163 and 227."""
    return element_size == 4 or not _large_states(channels, values) or shared_memory(device) >= 128 * 1024


def _state_pass(a, m, x, chunk: int, reverse: bool, precision: str) -> torch.Tensor:
    """The state entering (forward) or the adjoint leaving (reverse) every chunk: (B H, NC, Dk, Dv) float32."""
    batch, length, heads, dk = a.shape
    dv = x.shape[-1]
    chunks = cdiv(length, chunk)
    added, states = (empty(batch * heads, chunks, dk, dv, device=a.device) for _ in range(2))
    bk, bv = min(64, _block(dk)), min(64, _block(dv))
    _chunk_state_kernel[(chunks, batch * heads, cdiv(dk, bk) * cdiv(dv, bv))](
        a, m, x, added, *_strides(x), length, heads, dk, dv, chunks,
        BC=chunk, BK=bk, BV=bv, REVERSE=reverse, PRECISION=precision)
    bk, bv = min(16, _block(dk)), min(16, _block(dv))  # more, shorter programs: the pass is one step per chunk
    _state_carry_kernel[(batch * heads, cdiv(dk, bk), cdiv(dv, bv))](
        m, added, states, length, heads, dk, dv, chunks, BC=chunk, BK=bk, BV=bv, REVERSE=reverse)
    return states


PREFIX_ROWS = 64  # rows the prefix kernels take at a time (blocks are multiples of it)
SCAN_ROWS = 16  # rows _prefix_kernel scans at a time: its pair scan costs less in short pieces (87 against 125 us
# at 64 rows, 64x64 B=8 on the H200)
MAX_PREFIX_BLOCKS = 256  # programs per (batch, head) of the prefix kernels: each joins the summaries before it
CARRY_TILE = 64  # summaries a prefix program joins at a time


def _prefix_blocks(length: int) -> tuple[int, int]:
    """Blocks of the prefix kernels and their rows (a multiple of PREFIX_ROWS): at most MAX_PREFIX_BLOCKS, so
    that joining the summaries before each block stays a bounded cost as sequences grow."""
    steps = cdiv(cdiv(length, PREFIX_ROWS), MAX_PREFIX_BLOCKS)
    return cdiv(length, steps * PREFIX_ROWS), steps * PREFIX_ROWS


def _summaries(k, qp, z, m, blocks: int, span: int, reverse: bool) -> list[torch.Tensor]:
    """Per block and channel, (max, sum) forward (k) or (m at its first row, its share of r) in reverse
    (k = dq', qp, z, m)."""
    batch, length, heads, dk = m.shape if reverse else k.shape
    sums = [empty(batch * heads, blocks, dk, device=k.device) for _ in range(2)]
    _block_summary_kernel[(blocks, batch * heads)](
        k, qp, z, m, *sums, *_strides(k), length, heads, dk, blocks, span,
        BN=PREFIX_ROWS, BK=_block(dk), REVERSE=reverse)
    return sums


def _prefix(q, k, scale: float):
    """q' = scale q / z, k' = e^{k - m}, m = cummax k and z = sum_{s<=p} e^{k_s - m_p}: (B, L, H, Dk) float32 each."""
    batch, length, heads, dk = q.shape
    blocks, span = _prefix_blocks(length)
    outs = [empty(batch, length, heads, dk, device=q.device) for _ in range(4)]
    sums = _summaries(k, k, k, k, blocks, span, reverse=False)
    _prefix_kernel[(blocks, batch * heads)](
        q, k, *sums, *outs, *_strides(q), *_strides(k), length, heads, dk, blocks, span, scale,
        BN=SCAN_ROWS, BK=_block(dk), CT=CARRY_TILE)
    return outs


def _prefix_backward(qp, kp, m, z, dqp, dkp, scale: float, dtype: torch.dtype):
    """dq and dk (in `dtype`) from the gradients of q' and k' (contiguous)."""
    batch, length, heads, dk = qp.shape
    blocks, span = _prefix_blocks(length)
    grads = [empty(batch, length, heads, dk, device=qp.device, dtype=dtype) for _ in range(2)]
    sums = _summaries(dqp, qp, z, m, blocks, span, reverse=True)
    _prefix_backward_kernel[(blocks, batch * heads)](
        qp, kp, m, z, dqp, dkp, *sums, *grads, length, heads, dk, blocks, span, scale,
        BN=PREFIX_ROWS, BK=_block(dk), CT=CARRY_TILE)
    return grads


def _rotate(qp, kp, m, angles):
    """With rotary angles the kernels see 2 Dk channels: [q' cos, q' sin], [k' cos, k' sin], [m, m]."""
    if angles is None:
        return qp, kp, m
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.cat([qp * cos, qp * sin], -1), torch.cat([kp * cos, kp * sin], -1), torch.cat([m, m], -1)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: Optional[torch.Tensor], scale: float,
             chunk: int, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor, torch.Tensor]:
    """y (B, L, H, Dv) in the inputs' dtype, and what the backward keeps: q', k', m, z (B, L, H, Dk) and the
    state entering each chunk (B H, NC, Dk or 2 Dk, Dv), float32.

    q, k, v: (B, L, H, D), one dtype, unit last stride; angles: None or (B, L, H, Dk) float32 contiguous."""
    batch, length, heads, _ = q.shape
    dv = v.shape[-1]
    y = empty(batch, length, heads, dv, device=v.device, dtype=v.dtype)
    with on_device(v.device):
        qp, kp, m, z = _prefix(q, k, scale)
        q_in, k_in, m_in = _rotate(qp, kp, m, angles)
        states = _state_pass(k_in, m_in, v, chunk, False, precision)
        rows = _block_rows(q_in.shape[-1], dv, chunk)
        _output_kernel[(cdiv(length, rows), batch * heads)](
            q_in, k_in, m_in, v, states, y, *_strides(v), length, heads, q_in.shape[-1], dv, states.shape[1],
            BC=chunk, SUB=rows, BK=_block(q_in.shape[-1]), BV=_block(dv), PRECISION=precision,
            num_warps=_warps(q_in.shape[-1], dv, small=2, large=4), num_stages=ROW_STAGES)
    return y, qp, kp, m, z, states


lightnet_causal = torch.library.custom_op("mdlrnn::lightnet_causal", _forward, mutates_args=())


@lightnet_causal.register_fake
def _(q, k, v, angles, scale, chunk, precision):
    batch, length, heads, dk = q.shape
    chunks = (length + chunk - 1) // chunk
    channels = dk * (1 if angles is None else 2)
    f32 = dict(dtype=torch.float32)
    return (v.new_empty(batch, length, heads, v.shape[-1]), *(q.new_empty(q.shape, **f32) for _ in range(4)),
            v.new_empty(batch * heads, chunks, channels, v.shape[-1], **f32))


def _backward(qp: torch.Tensor, kp: torch.Tensor, m: torch.Tensor, z: torch.Tensor, v: torch.Tensor,
              angles: Optional[torch.Tensor], states: torch.Tensor, dy: torch.Tensor, scale: float, chunk: int,
              precision: str) -> list[torch.Tensor]:
    """[dq, dk, dv, d_angles]: dq, dk and dv in v's dtype (the inputs'), d_angles float32 (empty without
    angles)."""
    batch, length, heads, dk = qp.shape
    dv = v.shape[-1]
    dy = unit_last_stride(dy)
    q_in, k_in, m_in = _rotate(qp, kp, m, angles)
    channels = q_in.shape[-1]
    grads = [empty(batch, length, heads, channels, device=v.device) for _ in range(2)]
    grads.append(empty(batch, length, heads, dv, device=v.device, dtype=v.dtype))
    with on_device(v.device):
        adjoints = _state_pass(q_in, m_in, dy, chunk, True, precision)
        rows = _block_rows(channels, dv, chunk)
        _gradient_kernel[(cdiv(length, rows), batch * heads)](
            q_in, k_in, m_in, v, dy, states, adjoints, *grads, *_strides(v), *_strides(dy), length, heads, channels,
            dv, states.shape[1], BC=chunk, SUB=rows, BK=_block(channels), BV=_block(dv), PRECISION=precision,
            num_warps=_warps(channels, dv, small=4, large=8), num_stages=ROW_STAGES)
        dqp, dkp, d_v = grads
        d_angles = v.new_empty(0, dtype=torch.float32)
        if angles is not None:  # d/da of x' [cos a, sin a] . [g_cos, g_sin] = x' (g_sin cos a - g_cos sin a)
            cos, sin = torch.cos(angles), torch.sin(angles)
            (dq_cos, dq_sin), (dk_cos, dk_sin) = dqp.split(dk, -1), dkp.split(dk, -1)
            d_angles = qp * (dq_sin * cos - dq_cos * sin) + kp * (dk_sin * cos - dk_cos * sin)
            dqp, dkp = dq_cos * cos + dq_sin * sin, dk_cos * cos + dk_sin * sin
        dq, dk = _prefix_backward(qp, kp, m, z, dqp, dkp, scale, v.dtype)
    return [dq, dk, d_v, d_angles]


lightnet_causal_backward = torch.library.custom_op("mdlrnn::lightnet_causal_backward", _backward, mutates_args=())


@lightnet_causal_backward.register_fake
def _(qp, kp, m, z, v, angles, states, dy, scale, chunk, precision):
    return [qp.new_empty(qp.shape, dtype=v.dtype), qp.new_empty(qp.shape, dtype=v.dtype), torch.empty_like(v),
            qp.new_empty(0) if angles is None else torch.empty_like(qp)]


def _setup_context(ctx, inputs, output):
    q, k, v, angles, scale, chunk, precision = inputs
    _, qp, kp, m, z, states = output
    ctx.save_for_backward(qp, kp, m, z, v, angles, states)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # no zero gradients made for what the backward keeps
    ctx.scale, ctx.chunk, ctx.precision = scale, chunk, precision


def _gradients(ctx, dy, backward):
    qp, kp, m, z, v, angles, states = ctx.saved_tensors
    dq, dk, dv, d_angles = backward(qp, kp, m, z, v, angles, states, dy, ctx.scale, ctx.chunk, ctx.precision)
    return dq, dk, dv, d_angles if angles is not None else None, None, None, None


lightnet_causal.register_autograd(lambda ctx, dy, *_: _gradients(ctx, dy, lightnet_causal_backward),
                                  setup_context=_setup_context)


class LightNetCausal(torch.autograd.Function):
    """mdlrnn::lightnet_causal for eager calls (kernels.run): the same forward, context and backward."""

    forward = eager_forward(_forward, _setup_context)

    @staticmethod
    def backward(ctx, dy, *_):
        first_order_only("lightnet_scan")
        return _gradients(ctx, dy, _backward)


def _flattened(q, k, v, angles):
    """(B, *S, H, D) inputs as (B, N, H, D) in row-major order with unit last strides; angles float32, contiguous."""
    batch, heads = q.shape[0], q.shape[-2]
    flat = lambda x: x.reshape(batch, -1, heads, x.shape[-1])
    q, k, v = (unit_last_stride(flat(x)) for x in (q, k, v))
    return q, k, v, None if angles is None else flat(angles).float().contiguous()


def lightnet_causal_triton(q, k, v, scale: float, angles=None, *, precision: str = "ieee"):
    """LightNet's causal mode over the row-major flattening of (B, *S, H, D) inputs (one dtype): y in it."""
    shape = v.shape
    q, k, v, angles = _flattened(q, k, v, angles)
    return run(lightnet_causal, LightNetCausal, q, k, v, angles, scale, CHUNK, precision)[0].reshape(shape)
