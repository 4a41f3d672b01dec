r"""Triton kernels for grid_scan on 1D grids: a chunkwise linear RNN with signed scalar gates.

With one axis the grid recurrence is C[p] = T_p C[p-1] + S_p k_p v_p^T and
y_p = scale (M_p q_p^T C[p-1] + D_p (q_p . k_p) v_p). Cut the sequence into chunks of BC positions. With
E[p, j] = prod_{j < i < p} T_i (its sign from a count of negative gates, its size from the sum of exactly
the logs |T_i| it spans, so it never overflows), a chunk with entering state C_in gives

    y      = scale ((Q K^T * W) V + diag(M e_in) Q C_in),   W[p, j] = M_p S_j E[p, j] (j < p), W[p, p] = D_p
    C_exit = a C_in + K^T diag(S e_out) V,                  e_in[p] = prod_{i < p} T_i, e_out[j] = prod_{i > j} T_i

(a the product of all the chunk's gates). Three kernels, four launches: the entering state of every chunk
(a sequential pass over chunks, split by blocks of the state), the outputs (chunks in parallel,
tensor-core products), the adjoint states dC (the same pass in reverse) and every gradient of a chunk
(in parallel). The gradient of a gate T_i collects, in log space, each pair, entering and leaving term
whose product spans i; |T| is clamped at 1e-12 inside the logs (a zero gate enters its products as 1e-12), so a zero gate's gradient is the
exact product of the others.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import (cdiv, dot_precision, eager_forward, empty, first_order_only, next_power_of_2, on_device, run,
               unit_last_stride)


@triton.jit
def _sign(count):
    """(-1) ** count for non-negative integer counts."""
    return 1.0 - 2.0 * (count & 1).to(tl.float32)


@triton.jit
def _chunk_gates(T, base, offs, valid, H):
    """The gates of a chunk, log|T| (clamped) and the inclusive running count of negative gates.
    Positions past the end read T = 1: they change no product."""
    t = tl.load(T + base + offs * H, mask=valid, other=1.0)
    magnitude = tl.abs(t)
    log_t = tl.log(tl.where(magnitude < 1e-12, 1e-12, magnitude))  # not tl.maximum: it would turn a NaN gate into 1e-12
    neg = (t < 0).to(tl.int32)
    return t, log_t, neg, tl.cumsum(neg, 0)


@triton.jit
def _pair_products(log_t, neg, neg_cum, BC: tl.constexpr):
    """E[p, j] = prod_{j < i < p} T_i for j < p, else 0; e_in[p] = prod_{i < p} T_i; e_out[j] = prod_{i > j} T_i
    and the chunk's whole product a.

    Every exponent is a sum of just the logs it spans (masked sums, one small exact product for the pairs),
    never a difference of running sums: after a zero gate (log 1e-12 = -27.6) such differences would lose
    digits in every later product."""
    i = tl.arange(0, BC)
    later = i[:, None] > i[None, :]  # [p, i]: i < p; and as [i, j]: i > j
    logs_before = tl.where(later, log_t[None, :], 0.0)  # [p, i] = log|T_i| for i < p
    exponent = tl.dot(logs_before, later.to(tl.float32), input_precision="ieee")  # [p, j]: sum over j < i < p
    before_neg = neg_cum - neg
    strict = later
    pair = tl.where(strict, tl.exp(tl.where(strict, exponent, 0.0)) * _sign(before_neg[:, None] - neg_cum[None, :]), 0.0)
    total_neg = tl.sum(neg, 0)
    e_in = tl.exp(tl.sum(logs_before, 1)) * _sign(before_neg)
    e_out = tl.exp(tl.sum(tl.where(tl.trans(later), log_t[None, :], 0.0), 1)) * _sign(total_neg - neg_cum)
    return pair, e_in, e_out, tl.exp(tl.sum(log_t, 0)) * _sign(total_neg)


@triton.jit
def _load_rows(X, b, h, offs, valid, col, cols, sb, sl, sh):
    """Rows offs of X[b, :, h, :] (row stride sl, unit column stride), zero outside."""
    rows = offs.to(tl.int64)[:, None] * sl
    return tl.load(X + b * sb + h * sh + rows + col[None, :], mask=valid[:, None] & (col < cols)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _state_block(DK, DV, BK: tl.constexpr, BV: tl.constexpr):
    """This program's (BK, BV) block of a (DK, DV) state: its columns, offsets in the row-major state, mask."""
    col_k = tl.program_id(1) * BK + tl.arange(0, BK)
    col_v = tl.program_id(2) * BV + tl.arange(0, BV)
    return col_k, col_v, col_k[:, None] * DV + col_v[None, :], (col_k < DK)[:, None] & (col_v < DV)[None, :]


@triton.jit
def _pass_kernel(A, B, T, GATE, OUT, sab, sal, sah, sbb, sbl, sbh, L, H, DK, DV, NC, scale,
                 BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr):
    """The sequential pass over chunks, one (BK, BV) block of the (Dk, Dv) state per program.

    Forward (A, B, GATE = K, V, S): OUT[b, h, c] = the state entering chunk c,
        C_in(c + 1) = a(c) C_in(c) + K^T diag(S e_out) V.
    Reverse (A, B, GATE = Q, dY, M): OUT[b, h, c] = dLoss/dC_exit of chunk c,
        dC_exit(c - 1) = a(c) dC_exit(c) + scale Q^T diag(M e_in) dY.
    """
    bh = tl.program_id(0).to(tl.int64)  # int64 offsets: states and long sequences pass 2^31 elements
    b, h = bh // H, bh % H
    gate_base = b * L * H + h
    col_k, col_v, state_offset, inside = _state_block(DK, DV, BK, BV)
    carried = tl.zeros((BK, BV), dtype=tl.float32)
    for step in range(NC):
        c = NC - 1 - step if REVERSE else step
        tl.store(OUT + (bh * NC + c) * DK * DV + state_offset, carried, mask=inside)
        offs = c * BC + tl.arange(0, BC)
        valid = offs < L
        _, log_t, neg, neg_cum = _chunk_gates(T, gate_base, offs, valid, H)
        _, e_in, e_out, whole = _pair_products(log_t, neg, neg_cum, BC)
        gate = tl.load(GATE + gate_base + offs * H, mask=valid, other=0.0)
        weight = scale * gate * e_in if REVERSE else gate * e_out
        a = _load_rows(A, b, h, offs, valid, col_k, DK, sab, sal, sah) * weight[:, None]
        rows_b = _load_rows(B, b, h, offs, valid, col_v, DV, sbb, sbl, sbh)
        carried = whole * carried + tl.dot(tl.trans(a), rows_b, input_precision=PRECISION)


@triton.jit
def _chunk_weights(T, S, M, D, gate_base, offs, valid, H, BC: tl.constexpr, HAS_DIRECT: tl.constexpr):
    """A chunk's gates and the weights of its quadratic form: W[p, j] = M_p S_j E[p, j] for j < p (strict)
    and, with the direct term, W[p, p] = D_p (weights)."""
    t, log_t, neg, neg_cum = _chunk_gates(T, gate_base, offs, valid, H)
    pair, e_in, e_out, whole = _pair_products(log_t, neg, neg_cum, BC)
    s = tl.load(S + gate_base + offs * H, mask=valid, other=0.0)
    m = tl.load(M + gate_base + offs * H, mask=valid, other=0.0)
    strict = m[:, None] * pair * s[None, :]
    weights = strict
    if HAS_DIRECT:
        i = tl.arange(0, BC)
        d = tl.load(D + gate_base + offs * H, mask=valid, other=0.0)
        weights += tl.where(i[:, None] == i[None, :], d[:, None], 0.0)
    return t, pair, e_in, e_out, whole, s, m, strict, weights


@triton.jit
def _output_kernel(Q, K, V, T, S, M, D, STATES, Y, sqb, sql, sqh, skb, skl, skh, svb, svl, svh, L, H, DK, DV, NC, scale,
                   BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DIRECT: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Y[b, chunk, h, block of Dv], all chunks in parallel."""
    bh, c, iv = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2)
    b, h = bh // H, bh % H
    i = tl.arange(0, BC)
    offs = c * BC + i
    valid = offs < L
    col_k, col_v = tl.arange(0, BK), iv * BV + tl.arange(0, BV)
    _, _, e_in, _, _, _, m, _, weights = _chunk_weights(T, S, M, D, b * L * H + h, offs, valid, H, BC, HAS_DIRECT)
    q = _load_rows(Q, b, h, offs, valid, col_k, DK, sqb, sql, sqh)
    k = _load_rows(K, b, h, offs, valid, col_k, DK, skb, skl, skh)
    v = _load_rows(V, b, h, offs, valid, col_v, DV, svb, svl, svh)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * weights
    entering = tl.load(STATES + (bh * NC + c) * DK * DV + col_k[:, None] * DV + col_v[None, :],
                       mask=(col_k < DK)[:, None] & (col_v < DV)[None, :], other=0.0)
    y = tl.dot(scores, v, input_precision=PRECISION)
    y += (m * e_in)[:, None] * tl.dot(q, entering, input_precision=PRECISION)
    y_ptr = Y + ((b * L + offs[:, None]) * H + h) * DV + col_v[None, :]
    tl.store(y_ptr, scale * y, mask=valid[:, None] & (col_v < DV)[None, :])


@triton.jit
def _gradient_kernel(Q, K, V, T, S, M, D, STATES, D_STATES, DY, DQ, DK_OUT, DV_OUT, DT, DS, DM, DD,
                     sqb, sql, sqh, skb, skl, skh, svb, svl, svh, L, H, DK, DV, NC, scale,
                     BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DIRECT: tl.constexpr,
                     PRECISION: tl.constexpr):
    """Every gradient of one chunk, from its entering state C_in and the adjoint dC of its exit state."""
    bh, c = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    i = tl.arange(0, BC)
    offs = c * BC + i
    valid = offs < L
    col_k, col_v = tl.arange(0, BK), tl.arange(0, BV)
    gate_base = b * L * H + h
    t, pair, e_in, e_out, whole, s, m, strict_weights, weights = _chunk_weights(
        T, S, M, D, gate_base, offs, valid, H, BC, HAS_DIRECT)

    q = _load_rows(Q, b, h, offs, valid, col_k, DK, sqb, sql, sqh)
    k = _load_rows(K, b, h, offs, valid, col_k, DK, skb, skl, skh)
    v = _load_rows(V, b, h, offs, valid, col_v, DV, svb, svl, svh)
    rows = valid[:, None] & (col_v < DV)[None, :]
    dy = tl.load(DY + ((b * L + offs[:, None]) * H + h) * DV + col_v[None, :], mask=rows, other=0.0) * scale
    state_ptrs = (bh * NC + c) * DK * DV + col_k[:, None] * DV + col_v[None, :]
    state_mask = (col_k < DK)[:, None] & (col_v < DV)[None, :]
    entering = tl.load(STATES + state_ptrs, mask=state_mask, other=0.0)
    adjoint = tl.load(D_STATES + state_ptrs, mask=state_mask, other=0.0)

    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # q_p . k_j
    dyv = tl.dot(dy, tl.trans(v), input_precision=PRECISION)  # scale dy_p . v_j
    d_scores = dyv * weights
    read = tl.dot(q, entering, input_precision=PRECISION)  # q_p^T C_in: (BC, BV)
    exit_k = tl.dot(k, adjoint, input_precision=PRECISION)  # k_j^T dC: (BC, BV)
    inner = m * e_in  # weight of C_in in y_p
    outer = s * e_out  # weight of k_j v_j^T in C_exit
    dq = tl.dot(d_scores, k, input_precision=PRECISION) + inner[:, None] * tl.dot(dy, tl.trans(entering), input_precision=PRECISION)
    dk = tl.dot(tl.trans(d_scores), q, input_precision=PRECISION) + outer[:, None] * tl.dot(v, tl.trans(adjoint), input_precision=PRECISION)
    dv = tl.dot(tl.trans(qk * weights), dy, input_precision=PRECISION) + outer[:, None] * exit_k

    d_weights = qk * dyv  # dLoss/dW[p, j]
    read_dy = tl.sum(read * dy, 1)  # scale q_p^T C_in dy_p
    exit_kv = tl.sum(exit_k * v, 1)  # k_j^T dC v_j
    dm = tl.sum(d_weights * pair * s[None, :], 1) + e_in * read_dy
    ds = tl.sum(d_weights * pair * m[:, None], 0) + e_out * exit_kv
    # d log|T_i|: pairs j < i < p, entering terms p > i, leaving terms j < i, the whole product a. Masked sums,
    # never a difference of running sums: terms that span a (near-)zero gate are tiny next to the others
    # and must keep their relative precision, since they are divided by that gate below.
    later = i[:, None] > i[None, :]  # [p, i]: p > i, and read as [j, i]^T: j < i
    spans = d_weights * strict_weights
    before_i = tl.dot(spans, tl.trans(later.to(tl.float32)), input_precision=PRECISION)  # [p, i] = sum_{j < i} spans[p, j]
    d_log = tl.sum(tl.where(later, before_i, 0.0), 0)
    d_log += tl.sum(tl.where(later, (inner * read_dy)[:, None], 0.0), 0)
    d_log += tl.sum(tl.where(tl.trans(later), (outer * exit_kv)[:, None], 0.0), 0)
    d_log += whole * tl.sum(tl.sum(adjoint * entering, 1), 0)
    t_clamped = tl.where(tl.abs(t) < 1e-12, tl.where(t < 0, -1e-12, 1e-12), t)

    row_k = ((b * L + offs[:, None]) * H + h) * DK + col_k[None, :]
    row_v = ((b * L + offs[:, None]) * H + h) * DV + col_v[None, :]
    mask_k = valid[:, None] & (col_k < DK)[None, :]
    tl.store(DQ + row_k, dq, mask=mask_k)
    tl.store(DK_OUT + row_k, dk, mask=mask_k)
    tl.store(DV_OUT + row_v, dv, mask=rows)
    gate = gate_base + offs * H
    tl.store(DT + gate, d_log / t_clamped, mask=valid)
    tl.store(DS + gate, ds, mask=valid)
    tl.store(DM + gate, dm, mask=valid)
    if HAS_DIRECT:
        tl.store(DD + gate, tl.sum(tl.where(i[:, None] == i[None, :], d_weights, 0.0), 1), mask=valid)


# ------------------------------------------------------------------------------------------ host side

def _block(n: int) -> int:
    return max(16, next_power_of_2(n))


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, source: torch.Tensor, transition: torch.Tensor,
                 mark: torch.Tensor, direct: Optional[torch.Tensor], scale: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y (B, L, H, Dv) float32 and the state entering each chunk (B, H, NC, Dk, Dv) float32.

    q, k, v: (B, L, H, D) with unit last stride, any dtype; gates: (B, L, H) float32 contiguous.
    """
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    chunks = cdiv(length, chunk)
    states = empty(batch, heads, chunks, dk, dv, device=q.device)
    y = empty(batch, length, heads, dv, device=q.device)
    bk, bv = min(64, _block(dk)), min(64, _block(dv))
    precision = dot_precision(q.dtype)
    with on_device(q.device):
        _pass_kernel[(batch * heads, cdiv(dk, bk), cdiv(dv, bv))](
            k, v, transition, source, states, *_strides(k), *_strides(v), length, heads, dk, dv, chunks, scale,
            BC=chunk, BK=bk, BV=bv, REVERSE=False, PRECISION=precision)
        _output_kernel[(batch * heads, chunks, cdiv(dv, bv))](
            q, k, v, transition, source, mark, direct if direct is not None else source, states, y,
            *_strides(q), *_strides(k), *_strides(v), length, heads, dk, dv, chunks, scale,
            BC=chunk, BK=_block(dk), BV=bv, HAS_DIRECT=direct is not None, PRECISION=precision)
    return y, states


grid_scan_1d = torch.library.custom_op("mdlrnn::grid_scan_1d", _scan, mutates_args=())


@grid_scan_1d.register_fake
def _(q, k, v, source, transition, mark, direct, scale, chunk):
    batch, length, heads, dk = q.shape
    chunks = (length + chunk - 1) // chunk
    return (q.new_empty(batch, length, heads, v.shape[-1], dtype=torch.float32),
            q.new_empty(batch, heads, chunks, dk, v.shape[-1], dtype=torch.float32))


def _scan_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, source: torch.Tensor,
                          transition: torch.Tensor, mark: torch.Tensor, direct: Optional[torch.Tensor],
                          states: torch.Tensor, dy: torch.Tensor, scale: float, chunk: int) -> list[torch.Tensor]:
    """[dq, dk, dv, d_source, d_transition, d_mark, d_direct] in float32 (d_direct empty without direct)."""
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    chunks = states.shape[2]
    dy = dy.float().contiguous()
    d_states = empty(*states.shape, device=q.device)
    bk, bv = min(64, _block(dk)), min(64, _block(dv))
    precision = dot_precision(q.dtype)
    grads = [empty(batch, length, heads, n, device=q.device) for n in (dk, dk, dv)]
    gates = [empty(*source.shape, device=q.device) for _ in range(3)]
    d_direct = empty(*source.shape, device=q.device) if direct is not None else source.new_empty(0)
    with on_device(q.device):
        _pass_kernel[(batch * heads, cdiv(dk, bk), cdiv(dv, bv))](
            q, dy, transition, mark, d_states, *_strides(q), *_strides(dy), length, heads, dk, dv, chunks, scale,
            BC=chunk, BK=bk, BV=bv, REVERSE=True, PRECISION=precision)
        _gradient_kernel[(batch * heads, chunks)](
            q, k, v, transition, source, mark, direct if direct is not None else source, states, d_states, dy,
            *grads, *gates, d_direct, *_strides(q), *_strides(k), *_strides(v), length, heads, dk, dv, chunks,
            scale, BC=chunk, BK=_block(dk), BV=_block(dv), HAS_DIRECT=direct is not None, PRECISION=precision,
            num_warps=8)
    d_transition, d_source, d_mark = gates
    return [*grads, d_source, d_transition, d_mark, d_direct]


grid_scan_1d_backward = torch.library.custom_op("mdlrnn::grid_scan_1d_backward", _scan_backward, mutates_args=())


@grid_scan_1d_backward.register_fake
def _(q, k, v, source, transition, mark, direct, states, dy, scale, chunk):
    f32 = dict(dtype=torch.float32)
    grads = [q.new_empty(*q.shape[:-1], n, **f32) for n in (q.shape[-1], q.shape[-1], v.shape[-1])]
    gates = [torch.empty_like(source) for _ in range(3)]
    return [*grads, *gates, torch.empty_like(source) if direct is not None else source.new_empty(0)]


def _setup_context(ctx, inputs, output):
    q, k, v, source, transition, mark, direct, scale, chunk = inputs
    ctx.save_for_backward(q, k, v, source, transition, mark, direct, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero gradient made for the states
    ctx.scale, ctx.chunk = scale, chunk


def _gradients(ctx, dy, backward):
    q, k, v, source, transition, mark, direct, states = ctx.saved_tensors
    dq, dk, dv, ds, dt, dm, dd = backward(q, k, v, source, transition, mark, direct, states, dy, ctx.scale, ctx.chunk)
    return dq, dk, dv, ds, dt, dm, dd if direct is not None else None, None, None


grid_scan_1d.register_autograd(lambda ctx, dy, _: _gradients(ctx, dy, grid_scan_1d_backward),
                               setup_context=_setup_context)


class GridScan1D(torch.autograd.Function):
    """mdlrnn::grid_scan_1d for eager calls (kernels.run): the same forward, context and backward."""

    forward = eager_forward(_scan, _setup_context)

    @staticmethod
    def backward(ctx, dy, _):
        first_order_only("grid_scan")
        return _gradients(ctx, dy, _scan_backward)


def grid_scan_triton(q, k, v, source, transition, mark, direct, scale: float, chunk: int = 64) -> torch.Tensor:
    """grid_scan on a 1D grid through the kernels: y (B, L, H, Dv) in float32.

    q, k, v keep their dtype (float32, float16 or bfloat16) and strides (a copy only where the last stride
    isn't 1); the gates go to float32 (B, L, H).
    """
    q, k, v = (unit_last_stride(x) for x in (q, k, v))
    gates = [g.reshape(*g.shape[:3]).float().contiguous() for g in (source, transition, mark)]
    direct = None if direct is None else direct.float().contiguous()
    return run(grid_scan_1d, GridScan1D, q, k, v, *gates, direct, scale, chunk)[0]
