r"""LightNet's global mode as one custom op pair, mdlrnn::lightnet_global and its backward: a fused reduction.

Per key channel c, y_p = scale sum_c q_p[c] sum_s e^{k_s[c]} v_s / sum_s e^{k_s[c]} over all positions. With
M the maximum of each channel's logits, w = e^{k - M}, Z = sum_s w_s and the state KV = sum_s w_s v_s^T
(Dk x Dv per head), y_p = (scale q_p / Z) KV. Rotary angles split each channel into [w cos a, w sin a] for the
state and [u cos a, u sin a] for the query (cos(a_p - a_s) = cos a_p cos a_s + sin a_p sin a_s).

- `_summary_kernel`: per block of BN positions, its maxima, sums and state in its own frame (one tensor-core
  product), read once from k and v; the blocks are joined in the frame of M (each factor e^{m_b - M} <= 1).
- `_output_kernel`: per block of BN positions, scale q / Z (rotated) times the state.
Backward: a few matrix products over the flattened positions (torch), with Z's gradient formed as
-sum_p (du_p . u_p) / Z so that no factor leaves float32's range.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops.lightnet.tiles import rotated, unrotated
from . import cdiv, eager_forward, empty, first_order_only, on_device, run
from .lightnet import _block, _flattened, _rows, _strides

BN = 64  # positions per program


@triton.jit
def _summary_kernel(K, V, ANGLES, M, Z, KV, skb, skn, skh, svb, svn, svh, sab, san, sah, N, H, DK, DV, NB,
                    BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_ANGLES: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Block nb of (batch, head) bh: its maxima m (DK), sums z = sum e^{k - m} (DK) and state
    sum e^{k - m} v^T (DK x DV; with angles 2 DK x DV, the cos rows then the sin rows)."""
    bh, nb = tl.program_id(0), tl.program_id(1)
    b, h = tl.cast(bh // H, tl.int64), bh % H
    rows = nb * BN + tl.arange(0, BN)
    c, d = tl.arange(0, BK), tl.arange(0, BV)
    k = _rows(K, b * skb + h * skh, rows, rows < N, c, DK, skn)
    k = tl.where((rows < N)[:, None], k, float("-inf"))  # a block always holds a position: m stays finite
    m = tl.max(k, 0)
    w = tl.exp(k - m[None, :])
    v = _rows(V, b * svb + h * svh, rows, rows < N, d, DV, svn)
    part = tl.cast(bh, tl.int64) * NB + nb
    tl.store(M + part * DK + c, m, mask=c < DK)
    tl.store(Z + part * DK + c, tl.sum(w, 0), mask=c < DK)
    rows_out = (2 if HAS_ANGLES else 1) * DK
    state = KV + part * rows_out * DV + c[:, None] * DV + d[None, :]
    keep = (c < DK)[:, None] & (d < DV)[None, :]
    if HAS_ANGLES:
        angle = _rows(ANGLES, b * sab + h * sah, rows, rows < N, c, DK, san)
        cos_part = tl.dot(tl.trans(w * tl.cos(angle)), v, input_precision=PRECISION)
        sin_part = tl.dot(tl.trans(w * tl.sin(angle)), v, input_precision=PRECISION)
        tl.store(state, cos_part, mask=keep)
        tl.store(state + DK * DV, sin_part, mask=keep)
    else:
        tl.store(state, tl.dot(tl.trans(w), v, input_precision=PRECISION), mask=keep)


@triton.jit
def _output_kernel(Q, ANGLES, Z, KV, Y, sqb, sqn, sqh, sab, san, sah, syb, syn, syh, N, H, DK, DV, scale,
                   BN: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_ANGLES: tl.constexpr,
                   PRECISION: tl.constexpr):
    """y for BN positions: (scale q / Z) KV, rotated with angles."""
    nb, bh = tl.program_id(0), tl.program_id(1)
    b, h = tl.cast(bh // H, tl.int64), bh % H
    rows = nb * BN + tl.arange(0, BN)
    c, d = tl.arange(0, BK), tl.arange(0, BV)
    z = tl.load(Z + tl.cast(bh, tl.int64) * DK + c, mask=c < DK, other=1.0)
    u = scale * _rows(Q, b * sqb + h * sqh, rows, rows < N, c, DK, sqn) / z[None, :]
    rows_out = (2 if HAS_ANGLES else 1) * DK
    state = KV + tl.cast(bh, tl.int64) * rows_out * DV + c[:, None] * DV + d[None, :]
    keep = (c < DK)[:, None] & (d < DV)[None, :]
    if HAS_ANGLES:
        angle = _rows(ANGLES, b * sab + h * sah, rows, rows < N, c, DK, san)
        y = tl.dot(u * tl.cos(angle), tl.load(state, mask=keep, other=0.0), input_precision=PRECISION)
        y += tl.dot(u * tl.sin(angle), tl.load(state + DK * DV, mask=keep, other=0.0), input_precision=PRECISION)
    else:
        y = tl.dot(u, tl.load(state, mask=keep, other=0.0), input_precision=PRECISION)
    ptr = Y + b * syb + h * syh + tl.cast(rows, tl.int64)[:, None] * syn + d[None, :]
    tl.store(ptr, y, mask=(rows < N)[:, None] & (d < DV)[None, :])


def _strides_or_none(x: Optional[torch.Tensor]) -> tuple[int, int, int]:
    return (0, 0, 0) if x is None else _strides(x)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: Optional[torch.Tensor], scale: float,
             precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (B, N, H, Dv) in v's dtype and, for the backward, M, Z (B H, Dk) and the state KV (B H, Dk or 2 Dk, Dv),
    float32. q, k, v (B, N, H, D) with unit last stride; angles None or (B, N, H, Dk) float32."""
    batch, length, heads, dk = q.shape
    dv = v.shape[-1]
    blocks = cdiv(length, BN)
    rows = (1 if angles is None else 2) * dk
    m_part, z_part = (empty(batch * heads, blocks, dk, device=v.device) for _ in range(2))
    kv_part = empty(batch * heads, blocks, rows, dv, device=v.device)
    y = empty(batch, length, heads, dv, device=v.device, dtype=v.dtype)
    widths = dict(BN=BN, BK=_block(dk), BV=_block(dv), HAS_ANGLES=angles is not None, PRECISION=precision)
    with on_device(v.device):
        _summary_kernel[(batch * heads, blocks)](
            k, v, angles, m_part, z_part, kv_part, *_strides(k), *_strides(v), *_strides_or_none(angles), length,
            heads, dk, dv, blocks, **widths, num_warps=4)
        m = m_part.amax(1)
        frame = torch.exp(m_part - m[:, None])  # (B H, blocks, Dk): each <= 1
        z = (frame * z_part).sum(1)
        kv = (frame.repeat(1, 1, rows // dk)[..., None] * kv_part).sum(1)
        _output_kernel[(blocks, batch * heads)](
            q, angles, z, kv, y, *_strides(q), *_strides_or_none(angles), *_strides(y), length, heads, dk, dv, scale,
            **widths, num_warps=4)
    return y, m, z, kv


lightnet_global = torch.library.custom_op("mdlrnn::lightnet_global", _forward, mutates_args=())


@lightnet_global.register_fake
def _(q, k, v, angles, scale, precision):
    batch, _, heads, dk = q.shape
    rows = (1 if angles is None else 2) * dk
    f32 = dict(dtype=torch.float32)
    return (v.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(batch * heads, dk, **f32),
            q.new_empty(batch * heads, dk, **f32), q.new_empty(batch * heads, rows, v.shape[-1], **f32))


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, angles: Optional[torch.Tensor], m: torch.Tensor,
              z: torch.Tensor, kv: torch.Tensor, dy: torch.Tensor, scale: float) -> list[torch.Tensor]:
    """[dq, dk, dv, d_angles] (dq, dk, dv in v's dtype; d_angles float32, empty without angles). With
    u = scale q / Z and w = e^{k - M} (rotated): du = dy KV^T, dKV = sum_p u_p dy_p^T, dv = w dKV, dw = v dKV^T,
    dZ = -sum_p (du_p . u_p) / Z, dk = (dw + dZ) w."""
    batch, length, heads, dk = q.shape
    per_head = lambda x: x.float().permute(0, 2, 1, 3)  # (B, H, N, F)
    qh, kh, vh, gh = per_head(q), per_head(k), per_head(v), per_head(dy)
    ah = None if angles is None else per_head(angles)
    m, z, kv = m.view(batch, heads, 1, dk), z.view(batch, heads, 1, dk), kv.view(batch, heads, -1, v.shape[-1])
    u, w = scale * qh / z, torch.exp(kh - m)
    query, keys = rotated(u, ah), rotated(w, ah)
    d_query, d_state = gh @ kv.transpose(-1, -2), query.transpose(-1, -2) @ gh
    d_v, d_keys = keys @ d_state, vh @ d_state.transpose(-1, -2)
    du, d_angles_q = unrotated(d_query, u, ah)
    dw, d_angles_k = unrotated(d_keys, w, ah)
    d_z = -(du * u).sum(2, keepdim=True) / z
    dq, d_k = scale * du / z, (dw + d_z) * w
    back = lambda x: x.permute(0, 2, 1, 3).to(v.dtype).contiguous()
    d_angles = v.new_empty(0, dtype=torch.float32)
    if angles is not None:
        d_angles = (d_angles_q + d_angles_k).permute(0, 2, 1, 3).contiguous()
    return [back(dq), back(d_k), back(d_v), d_angles]


lightnet_global_backward = torch.library.custom_op("mdlrnn::lightnet_global_backward", _backward,
                                                   mutates_args=())


@lightnet_global_backward.register_fake
def _(q, k, v, angles, m, z, kv, dy, scale):
    return [q.new_empty(q.shape, dtype=v.dtype), k.new_empty(k.shape, dtype=v.dtype), v.new_empty(v.shape),
            q.new_empty(0 if angles is None else q.shape, dtype=torch.float32)]


def _setup_context(ctx, inputs, output):
    q, k, v, angles, scale, _ = inputs
    _, m, z, kv = output
    ctx.save_for_backward(q, k, v, angles, m, z, kv)
    ctx.mark_non_differentiable(m, z, kv)
    ctx.set_materialize_grads(False)
    ctx.scale = scale


def _gradients(ctx, dy, backward):
    q, k, v, angles, m, z, kv = ctx.saved_tensors
    dq, dk, dv, d_angles = backward(q, k, v, angles, m, z, kv, dy, ctx.scale)
    return dq, dk, dv, d_angles if angles is not None else None, None, None


lightnet_global.register_autograd(lambda ctx, dy, *_: _gradients(ctx, dy, lightnet_global_backward),
                                  setup_context=_setup_context)


class LightNetGlobal(torch.autograd.Function):
    """mdlrnn::lightnet_global for eager calls (kernels.run): the same forward, context and backward."""

    forward = eager_forward(_forward, _setup_context)

    @staticmethod
    def backward(ctx, dy, *_):
        first_order_only("lightnet_scan")
        return _gradients(ctx, dy, _backward)


def lightnet_global_triton(q, k, v, scale: float, angles=None, *, precision: str = "ieee"):
    """LightNet's global mode over (B, *S, H, D) inputs of one dtype: y in it."""
    shape = v.shape
    q, k, v, angles = _flattened(q, k, v, angles)
    return run(lightnet_global, LightNetGlobal, q, k, v, angles, scale, precision)[0].reshape(shape)
