r"""LightNet's box mode on 2D grids as one custom op pair, mdlrnn::lightnet_box and its backward.

Wherever one reference per key channel is exact (mdlrnn.ops.lightnet.tiles.tiles_fit), the op is box attention
with the normaliser and rotation of mdlrnn.ops.lightnet.tiles around it, on the Triton kernels of
mdlrnn.kernels.box_attention (forward one box attention, backward three); otherwise the Triton kernels here: a
sweep down the rows with the columns side by side. Box attention's products take kernels.dot_precision (three
TF32 products for float32 inputs, TF32 for half ones, as in the causal kernels). Its forward saves the weights
and their box sums in the op's m and z, so the backward recomputes nothing; eagerly the path is chosen once for
forward and backward (tiles_fit synchronises with the GPU), under torch.compile by each half of the op alike.

The sweeps. Per key channel c, y_p = scale sum_c q_p[c] N_p[c] / Z_p[c] with N_p = sum_{s<=p} e^{k_s} v_s and
Z_p = sum_{s<=p} e^{k_s} over the box s <= p on both axes. Each program owns one (batch, head), a block of
channels and a block of values, and walks the rows i in order with a whole row of columns j in registers:

- the column sums A[j] = sum_{r<=i} e^{k_{r,j} - mc[j]} v_{r,j} in the frame of the column maximum
  mc[j] = max_{r<=i} k_{r,j}, updated by one row at a time;
- the box sums N[j] in the frame of the box maximum m[j] = max_{j'<=j} mc[j'] (= m_p), a linear scan along
  the row: N[j] = e^{m[j-1] - m[j]} N[j-1] + e^{mc[j] - m[j]} A[j] (tl.associative_scan). m[j-1] is the
  cumulative maximum of the column maxima of the row shifted by one column, kept alongside.

Every factor is e^{a - b} with b the maximum of a region holding a, so every factor is <= 1 and logits of any
size stay finite; z_p = Z_p e^{-m_p} >= 1. Work and memory are linear in the positions: A holds a row of
states, (channels, values, columns) per program, and nothing per position is kept but m and z.

Backward, with u_p = scale q_p / z_p and delta_p = dq_p / scale = g_p . N_p / Z_p:

    dk_s = e^{k_s - m_s} (v_s . G_s - H_s),  dv_s = sum_c e^{k_s - m_s} G_s,
    G_s = sum_{p>=s} e^{m_s - m_p} u_p g_p,  H_s = sum_{p>=s} e^{m_s - m_p} u_p delta_p,

the same sweep run from the far corner (rows up, a reverse scan along the row) with the saved m and z; again
every factor is <= 1. dq comes from a second forward sweep. Rotary angles keep two sums per channel, of
cos(a_s) e^{k_s} v_s and sin(a_s) e^{k_s} v_s, read with cos(a_p) and sin(a_p).

A sweep writes a result summed over channels (y, dv) completely when a program holds all channels, and one
per channel (dq, dk, angles) when it holds all values; otherwise it writes a partial sum per block, which the
wrapper adds up.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops.lightnet.tiles import box_terms, lightnet_box_tiles_backward, rotated, tiles_fit
from . import cdiv, dot_precision, empty, first_order_only, next_power_of_2, on_device, run, unit_last_stride
from .box_attention import box_attention_triton

STATE = 4096  # floats of row state a program holds (channels x values x columns, x2 with angles)
WARPS = 8
NEG = tl.constexpr(-1e30)  # the maximum of nothing: finite, so that e^{NEG - NEG} = 1 on padding, never NaN
BIG = tl.constexpr(1e30)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _affine(a1, x1, a2, x2):
    """Composition of x -> a x + b maps: the scan of N[j] = a[j] N[j-1] + x[j] (reversed: N[j] = a[j] N[j+1] + x[j])."""
    return a1 * a2, x1 * a2 + x2


@triton.jit
def _scan(decay, x, REVERSE: tl.constexpr):
    """The linear scan along the row of (channels, values, columns) sums with per-(channel, column) decays. The
    columns are the fastest axis, so that the scan runs within threads and warps."""
    _, out = tl.associative_scan((tl.broadcast_to(decay[:, None, :], x.shape), x), 2, _affine, reverse=REVERSE)
    return out


@triton.jit
def _scan2(decay, x, REVERSE: tl.constexpr):
    _, out = tl.associative_scan((decay, x), 1, _affine, reverse=REVERSE)
    return out


@triton.jit
def _load(X, base, sj, j, jmask, f, fmask, other):
    """X[base + j * sj + f] as float32: a row as (features, columns)."""
    ptr = X + base + tl.cast(j, tl.int64)[None, :] * sj + f[:, None]
    return tl.load(ptr, mask=fmask[:, None] & jmask[None, :], other=other).to(tl.float32)


@triton.jit
def _logits(K, base, sj, j, jmask, c, cmask):
    """A row of key logits, NEG where there is none (loaded as 0: NEG overflows float16)."""
    valid = cmask[:, None] & jmask[None, :]
    return tl.where(valid, _load(K, base, sj, j, jmask, c, cmask, 0.0), NEG)


@triton.jit
def _store(X, base, sj, j, jmask, f, fmask, value):
    tl.store(X + base + tl.cast(j, tl.int64)[None, :] * sj + f[:, None], value, mask=fmask[:, None] & jmask[None, :])


@triton.jit
def _rotation(ANGLES, base, sj, j, jmask, c, cmask, like, HAS_ANGLES: tl.constexpr):
    """cos and sin of a row's angles (without angles, `like`, unused: one return type either way)."""
    cos, sin = like, like
    if HAS_ANGLES:
        angle = _load(ANGLES, base, sj, j, jmask, c, cmask, 0.0)
        cos, sin = tl.cos(angle), tl.sin(angle)
    return cos, sin


@triton.jit
def _added(sums_cos, sums_sin, decay, weight, vector, cos, sin, HAS_ANGLES: tl.constexpr):
    """(channels, values, columns) sums decayed by one row and a row's weight x vector added (with angles, split
    into weight cos and weight sin)."""
    if HAS_ANGLES:
        sums_cos = sums_cos * decay[:, None, :] + (weight * cos)[:, None, :] * vector[None, :, :]
        sums_sin = sums_sin * decay[:, None, :] + (weight * sin)[:, None, :] * vector[None, :, :]
    else:
        sums_cos = sums_cos * decay[:, None, :] + weight[:, None, :] * vector[None, :, :]
    return sums_cos, sums_sin


@triton.jit
def _row_base(b, i, h, X, Y, H, F):
    """Where row i of (batch b, head h) starts in a contiguous (B, X, Y, H, F) tensor (b may count parts too)."""
    return ((b * X + i) * Y) * H * F + h * F


@triton.jit
def _program(H, Y, DK, DV, W: tl.constexpr, CB: tl.constexpr, DB: tl.constexpr):
    """A sweep program's batch and head, channel and value blocks, and its columns, channels and values with
    their masks."""
    bh, cb, db = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    j = tl.arange(0, W)
    c = cb * CB + tl.arange(0, CB)
    d = db * DB + tl.arange(0, DB)
    return tl.cast(bh // H, tl.int64), tl.cast(bh % H, tl.int64), cb, db, j, c, d, j < Y, c < DK, d < DV


@triton.jit
def _forward_sweep_kernel(Q, K, V, ANGLES, DY, OUT, OUT_ANGLES, M, Z,
                          sqb, sqx, sqy, sqh, skb, skx, sky, skh, svb, svx, svy, svh, sab, sax, say, sah,
                          sdb, sdx, sdy, sdh, B, X, Y, H, DK, DV, scale,
                          W: tl.constexpr, CB: tl.constexpr, DB: tl.constexpr, HAS_ANGLES: tl.constexpr,
                          GRAD: tl.constexpr):
    """Rows in order. GRAD False: y (one part per channel block) and, from the first value block, m and z.
    GRAD True: dq and the query's part of d_angles (one part per value block), from dy."""
    b, h, cb, db, j, c, d, jm, cm, dm = _program(H, Y, DK, DV, W, CB, DB)
    left = (j > 0) & (j - 1 < Y)  # column j - 1 exists
    mc = tl.full([CB, W], NEG, tl.float32)  # column maxima
    ml = tl.full([CB, W], NEG, tl.float32)  # the column maxima one column to the left
    a_cos = tl.zeros([CB, DB, W], tl.float32)  # column sums (of e^k cos(a) v with angles)
    a_sin = tl.zeros([CB, DB, W], tl.float32)
    a_z = tl.zeros([CB, W], tl.float32)
    for row in range(X):
        i = tl.cast(row, tl.int64)  # offsets in int64: a batch element may hold more than 2^31 elements
        k_base = b * skb + i * skx + h * skh
        k_row = _logits(K, k_base, sky, j, jm, c, cm)
        ml = tl.maximum(ml, _logits(K, k_base - sky, sky, j, left, c, cm))
        m_new = tl.maximum(mc, k_row)
        rescale = tl.exp(mc - m_new)
        w = tl.exp(k_row - m_new)
        mc = m_new
        v_row = _load(V, b * svb + i * svx + h * svh, svy, j, jm, d, dm, 0.0)
        a_z = a_z * rescale + w
        cos, sin = _rotation(ANGLES, b * sab + i * sax + h * sah, say, j, jm, c, cm, w, HAS_ANGLES)
        a_cos, a_sin = _added(a_cos, a_sin, rescale, w, v_row, cos, sin, HAS_ANGLES)
        m = tl.associative_scan(mc, 1, _max)
        decay = tl.exp(tl.associative_scan(ml, 1, _max) - m)  # e^{m[j-1] - m[j]}; 0 at j = 0
        into_box = tl.exp(mc - m)
        z = _scan2(decay, a_z * into_box, False)
        n_cos = _scan(decay, a_cos * into_box[:, None, :], False)
        if HAS_ANGLES:
            n_sin = _scan(decay, a_sin * into_box[:, None, :], False)
        q_row = _load(Q, b * sqb + i * sqx + h * sqh, sqy, j, jm, c, cm, 0.0)
        if GRAD:
            g = _load(DY, b * sdb + i * sdx + h * sdh, sdy, j, jm, d, dm, 0.0)
            gn_cos = tl.sum(n_cos * g[None, :, :], 1)
            out = _row_base(db * B + b, i, h, X, Y, H, DK)
            if HAS_ANGLES:
                gn_sin = tl.sum(n_sin * g[None, :, :], 1)
                _store(OUT, out, H * DK, j, jm, c, cm, scale * (cos * gn_cos + sin * gn_sin) / z)
                _store(OUT_ANGLES, out, H * DK, j, jm, c, cm, scale * q_row * (cos * gn_sin - sin * gn_cos) / z)
            else:
                _store(OUT, out, H * DK, j, jm, c, cm, scale * gn_cos / z)
        else:
            u = scale * q_row / z
            if HAS_ANGLES:
                y = tl.sum((u * cos)[:, None, :] * n_cos + (u * sin)[:, None, :] * n_sin, 0)
            else:
                y = tl.sum(u[:, None, :] * n_cos, 0)
            _store(OUT, _row_base(cb * B + b, i, h, X, Y, H, DV), H * DV, j, jm, d, dm, y)
            if db == 0:
                saved = _row_base(b, i, h, X, Y, H, DK)
                _store(M, saved, H * DK, j, jm, c, cm, m)
                _store(Z, saved, H * DK, j, jm, c, cm, z)


@triton.jit
def _reverse_sweep_kernel(Q, K, V, ANGLES, DY, M, Z, DQ, OUT, OUT_ANGLES,
                          sqb, sqx, sqy, sqh, skb, skx, sky, skh, svb, svx, svy, svh, sab, sax, say, sah,
                          sdb, sdx, sdy, sdh, B, X, Y, H, DK, DV, scale,
                          W: tl.constexpr, CB: tl.constexpr, DB: tl.constexpr, HAS_ANGLES: tl.constexpr,
                          KEYS: tl.constexpr):
    """Rows from the last, sums over p >= s. KEYS False: dv (one part per channel block). KEYS True: dk and the
    key's part of d_angles (one part per value block)."""
    b, h, cb, db, j, c, d, jm, cm, dm = _program(H, Y, DK, DV, W, CB, DB)
    right = (j + 1) < Y
    m_below = tl.full([CB, W], BIG, tl.float32)  # m of the row below: e^{m - BIG} = 0 carries nothing at the start
    b_cos = tl.zeros([CB, DB, W], tl.float32)  # column sums over the rows r >= i, in the frame of m[i, j]
    b_sin = tl.zeros([CB, DB, W], tl.float32)
    b_h = tl.zeros([CB, W], tl.float32)
    for step in range(X):
        i = tl.cast(X - 1 - step, tl.int64)
        saved = _row_base(b, i, h, X, Y, H, DK)
        m = _load(M, saved, H * DK, j, jm, c, cm, 0.0)
        m_right = tl.where(right[None, :], _load(M, saved + H * DK, H * DK, j, right, c, cm, 0.0), m)
        u = scale * _load(Q, b * sqb + i * sqx + h * sqh, sqy, j, jm, c, cm, 0.0) / \
            _load(Z, saved, H * DK, j, jm, c, cm, 1.0)
        g = _load(DY, b * sdb + i * sdx + h * sdh, sdy, j, jm, d, dm, 0.0)
        down = tl.exp(m - m_below)
        m_below = m
        b_h = b_h * down + u * _load(DQ, saved, H * DK, j, jm, c, cm, 0.0) / scale
        cos, sin = _rotation(ANGLES, b * sab + i * sax + h * sah, say, j, jm, c, cm, u, HAS_ANGLES)
        b_cos, b_sin = _added(b_cos, b_sin, down, u, g, cos, sin, HAS_ANGLES)
        decay = tl.exp(m - m_right)  # e^{m[j] - m[j+1]}
        g_cos = _scan(decay, b_cos, True)
        if HAS_ANGLES:
            g_sin = _scan(decay, b_sin, True)
        w = tl.exp(_load(K, b * skb + i * skx + h * skh, sky, j, jm, c, cm, 0.0) - m)
        w = tl.where(cm[:, None] & jm[None, :], w, 0.0)
        if KEYS:
            h_sum = tl.where(db == 0, _scan2(decay, b_h, True), 0.0)  # summed once, in the first value block's part
            v_row = _load(V, b * svb + i * svx + h * svh, svy, j, jm, d, dm, 0.0)
            vg_cos = tl.sum(g_cos * v_row[None, :, :], 1)
            out = _row_base(db * B + b, i, h, X, Y, H, DK)
            if HAS_ANGLES:
                vg_sin = tl.sum(g_sin * v_row[None, :, :], 1)
                _store(OUT, out, H * DK, j, jm, c, cm, w * (cos * vg_cos + sin * vg_sin - h_sum))
                _store(OUT_ANGLES, out, H * DK, j, jm, c, cm, w * (cos * vg_sin - sin * vg_cos))
            else:
                _store(OUT, out, H * DK, j, jm, c, cm, w * (vg_cos - h_sum))
        else:
            if HAS_ANGLES:
                dv = tl.sum((w * cos)[:, None, :] * g_cos + (w * sin)[:, None, :] * g_sin, 0)
            else:
                dv = tl.sum(w[:, None, :] * g_cos, 0)
            _store(OUT, _row_base(cb * B + b, i, h, X, Y, H, DV), H * DV, j, jm, d, dm, dv)


def _blocks(width: int, dk: int, dv: int, angles: bool, whole: str) -> tuple[int, int]:
    """Channel and value blocks of a program: all channels ("c", for y and dv) or all values ("d", for dq and dk)
    where the row state fits in STATE floats, and as many of the other as fit."""
    budget = max(STATE // (width * (2 if angles else 1)), 1)
    ck, cv = next_power_of_2(dk), next_power_of_2(dv)
    if whole == "c":
        cb = min(ck, budget)
        return cb, max(min(cv, budget // cb), 1)
    db = min(cv, budget)
    return max(min(ck, budget // db), 1), db


def _strides(x: Optional[torch.Tensor]) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if x is None else tuple(x.stride()[:4])


def _parts_summed(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (out[0] if out.shape[0] == 1 else out.sum(0)).to(dtype)


def _sweep(kernel, inputs, outputs, sizes, scale, angles, flag, whole):
    q, k, v, dy = inputs
    batch, x, y, heads, dk, dv = sizes
    width = next_power_of_2(y)
    cb, db = _blocks(width, dk, dv, angles is not None, whole)
    grid = (batch * heads, cdiv(dk, cb), cdiv(dv, db))
    kernel[grid](*outputs, *_strides(q), *_strides(k), *_strides(v), *_strides(angles), *_strides(dy),
                 batch, x, y, heads, dk, dv, scale, W=width, CB=cb, DB=db, HAS_ANGLES=angles is not None,
                 **{flag[0]: flag[1]}, num_warps=WARPS)


def _parts(grid_axis: int, sizes, features: int, device, dtype) -> torch.Tensor:
    """A (parts, B, X, Y, H, F) buffer: the kernels' partial sums, or the result itself in `dtype` (one part)."""
    return empty(grid_axis, *sizes[:4], features, device=device, dtype=dtype if grid_axis == 1 else torch.float32)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: Optional[torch.Tensor], scale: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (B, X, Y, H, Dv) in v's dtype; m and z (B, X, Y, H, Dk) float32 for the backward.

    q, k, v (B, X, Y, H, D): one dtype, unit last stride; angles None or float32 with unit last stride."""
    return _forward_on(q, k, v, angles, scale, tiles_fit(k))


def _forward_on(q, k, v, angles, scale: float, tiled: bool):
    """Box attention where `tiled` (m, z: the weights e^{k - k_0} and their box sums), else the sweeps down X
    with Y across the program (m, z: the box maxima and the sums in their frame)."""
    if tiled:
        weights, z, q_prime = box_terms(q, k, scale)
        y = _attention(q.dtype)(rotated(q_prime, angles), rotated(weights, angles), v)
        return y.to(v.dtype), weights, z
    batch, x, y, heads, dk = q.shape
    dv = v.shape[-1]
    sizes = (batch, x, y, heads, dk, dv)
    cb, _ = _blocks(next_power_of_2(y), dk, dv, angles is not None, "c")
    out = _parts(cdiv(dk, cb), sizes, dv, v.device, v.dtype)
    m, z = (empty(batch, x, y, heads, dk, device=v.device) for _ in range(2))
    with on_device(v.device):
        _sweep(_forward_sweep_kernel, (q, k, v, None), (q, k, v, angles, None, out, None, m, z), sizes, scale,
               angles, ("GRAD", False), "c")
    return _parts_summed(out, v.dtype), m, z


# The op reads the logits' spread on the host (tiles_fit): inductor keeps it out of its CUDA graphs (torch >= 2.9)
HOST_READ = {"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe") else {}
lightnet_box = torch.library.custom_op("mdlrnn::lightnet_box", _forward, mutates_args=(), **HOST_READ)


@lightnet_box.register_fake
def _(q, k, v, angles, scale):
    return v.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape, dtype=torch.float32), \
        q.new_empty(q.shape, dtype=torch.float32)


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: Optional[torch.Tensor], m: torch.Tensor,
              z: torch.Tensor, dy: torch.Tensor, scale: float) -> list[torch.Tensor]:
    """[dq, dk, dv, d_angles]: dq, dk, dv in v's dtype, d_angles float32 (empty without angles)."""
    return _backward_on(q, k, v, angles, m, z, dy, scale, tiles_fit(k))


def _backward_on(q, k, v, angles, m, z, dy, scale: float, tiled: bool) -> list[torch.Tensor]:
    if tiled:
        dq, dk, dv, d_angles = lightnet_box_tiles_backward(q, m, z, v, angles, dy, scale,
                                                           attention=_attention(q.dtype))
        d_angles = v.new_empty(0, dtype=torch.float32) if d_angles is None else d_angles.contiguous()
        return [x.to(v.dtype) for x in (dq, dk, dv)] + [d_angles]
    batch, x, y, heads, dk = q.shape
    dv = v.shape[-1]
    sizes = (batch, x, y, heads, dk, dv)
    dy = unit_last_stride(dy)
    width = next_power_of_2(y)
    (_, db), (cb, _) = _blocks(width, dk, dv, angles is not None, "d"), _blocks(width, dk, dv, angles is not None, "c")
    by_values, by_channels = cdiv(dv, db), cdiv(dk, cb)
    dq, dk_out = (_parts(by_values, sizes, dk, v.device, torch.float32) for _ in range(2))
    angles_q, angles_k = ((_parts(by_values, sizes, dk, v.device, torch.float32) for _ in range(2))
                          if angles is not None else (None, None))
    d_v = _parts(by_channels, sizes, dv, v.device, v.dtype)
    inputs = (q, k, v, dy)
    with on_device(v.device):
        _sweep(_forward_sweep_kernel, inputs, (q, k, v, angles, dy, dq, angles_q, None, None), sizes, scale, angles,
               ("GRAD", True), "d")
        dq = _parts_summed(dq, torch.float32)
        for out, out_angles, keys in ((dk_out, angles_k, True), (d_v, None, False)):
            _sweep(_reverse_sweep_kernel, inputs, (q, k, v, angles, dy, m, z, dq, out, out_angles), sizes, scale,
                   angles, ("KEYS", keys), "d" if keys else "c")
    d_angles = v.new_empty(0, dtype=torch.float32)
    if angles is not None:
        d_angles = _parts_summed(angles_q, torch.float32) + _parts_summed(angles_k, torch.float32)
    return [dq.to(v.dtype), _parts_summed(dk_out, v.dtype), _parts_summed(d_v, v.dtype), d_angles]


def _attention(dtype: torch.dtype):
    """Box attention on the Triton kernels, its products at `dot_precision`."""
    return functools.partial(box_attention_triton, precision=dot_precision(dtype))


lightnet_box_backward = torch.library.custom_op("mdlrnn::lightnet_box_backward", _backward, mutates_args=(),
                                                **HOST_READ)


@lightnet_box_backward.register_fake
def _(q, k, v, angles, m, z, dy, scale):
    return [q.new_empty(q.shape, dtype=v.dtype), k.new_empty(k.shape, dtype=v.dtype), v.new_empty(v.shape),
            q.new_empty(0 if angles is None else q.shape, dtype=torch.float32)]


def _setup_context(ctx, inputs, output):
    q, k, v, angles, scale = inputs
    _, m, z = output
    ctx.save_for_backward(q, k, v, angles, m, z)
    ctx.mark_non_differentiable(m, z)
    ctx.set_materialize_grads(False)
    ctx.scale = scale


def _gradients(ctx, dy, backward):
    q, k, v, angles, m, z = ctx.saved_tensors
    dq, dk, dv, d_angles = backward(q, k, v, angles, m, z, dy, ctx.scale)
    return dq, dk, dv, d_angles if angles is not None else None, None


lightnet_box.register_autograd(lambda ctx, dy, *_: _gradients(ctx, dy, lightnet_box_backward),
                               setup_context=_setup_context)


class LightNetBox(torch.autograd.Function):
    """mdlrnn::lightnet_box for eager calls (kernels.run): the same forward, context and backward, with the path
    chosen once for both (tiles_fit synchronises with the GPU)."""

    @staticmethod
    def forward(ctx, q, k, v, angles, scale):
        tiled = tiles_fit(k)
        output = _forward_on(q, k, v, angles, scale, tiled)
        _setup_context(ctx, (q, k, v, angles, scale), output)
        ctx.tiled = tiled
        return output

    @staticmethod
    def backward(ctx, dy, *_):
        first_order_only("lightnet_scan")
        return _gradients(ctx, dy, functools.partial(_backward_on, tiled=ctx.tiled))


def lightnet_box_triton(q, k, v, scale: float, angles=None):
    """LightNet's box mode on (B, X, Y, H, D) inputs of one dtype: y in it. The op chooses between box attention
    and the sweeps itself. The sweeps run along the longer axis with the shorter one across each program (the
    box is the same either way round): a transposed view, no copy."""
    swap = q.shape[2] > q.shape[1]
    turn = (lambda x: x.transpose(1, 2)) if swap else (lambda x: x)
    q, k, v = (turn(unit_last_stride(x)) for x in (q, k, v))
    angles = None if angles is None else turn(angles.float().contiguous())
    return turn(run(lightnet_box, LightNetBox, q, k, v, angles, scale)[0])
