r"""Box attention on 2D grids in Triton: out_p = sum_{s<=p} (query_p . keys_s) values_s, s <= p on both axes.

The same three parts as the torch path (mdlrnn.ops.lightnet.tiles): the grid is cut into strips of at most
16 rows and each strip into tiles of at most 16 columns, and the box of p (strip I, tile J, row r and column c
inside it) is
- above the strip: the rows of earlier strips, columns <= c;
- left of the tile in the strip: the strip's rows <= r, the earlier tiles' columns;
- the tile itself: its scores masked to s <= p on both axes.

`_states_kernel` writes, per strip and column, G[I, c] = sum of keys_s values_s^T over the strip's rows and the
columns <= c (a walk along the strip), and per strip, row and tile, P[I, r, J] = the same over the tile's
columns and the strip's rows <= r (a walk down the tile). `_output_kernel` has two kinds of program, each
adding its part into a zeroed float32 output: one per row of a strip, walking its tiles with the running sum
of P over the tiles before (the part left of the tile) and the tile's key rows up to it as matrix products
with the columns masked (tensor cores at TF32, float32 FMA at "ieee"); one per column, walking the strips
with the running sum of G over the strips before (the part above). Each output element receives at most two
atomic additions, to zero, so the sum does not depend on their order. No program walks more than one axis,
and no state is stored twice.

`flip=True` reads and writes the grid from its far corner (the box s >= p): what the backward needs, with no
flipped copies. Work and memory are linear in the positions: two float32 states of channels x values per 16
positions (C F / 2 bytes a position: at C = F = 64 about 2 KB, five times bf16 q, k and v).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.lightnet import tiles as tiling
from . import cdiv, next_power_of_2, on_device, shared_memory, unit_last_stride

WARPS = 4
MAX_CHANNELS = 256  # the output kernel holds a program's queries and states over all channels (shared memory)


@triton.jit
def _offsets(b, h, rows, cols, X, Y, sb, sx, sy, sh, FLIP: tl.constexpr):
    """Memory offsets of the grid positions (rows, cols) of (batch b, head h); read from the far corner with FLIP."""
    if FLIP:
        rows = X - 1 - rows
        cols = Y - 1 - cols
    return b * sb + h * sh + tl.cast(rows, tl.int64) * sx + tl.cast(cols, tl.int64) * sy


@triton.jit
def _positions(A, offsets, valid, channels, n):
    """(positions, channels) of A in float32, zero outside the valid positions and the first n channels."""
    mask = valid[:, None] & (channels < n)[None, :]
    return tl.load(A + offsets[:, None] + channels[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _state(S, slot, c, f, C, F):
    """The C x F state in slot `slot` of a state buffer, the rows c and columns f of it."""
    return S + slot * C * F + c[:, None] * F + f[None, :], (c < C)[:, None] & (f < F)[None, :]


@triton.jit
def _column_slot(bh, strip, col, STRIPS, Y):
    """G's slot for strip `strip` < STRIPS - 1 and column `col` of (batch, head) bh."""
    return (tl.cast(bh, tl.int64) * (STRIPS - 1) + strip) * Y + col


@triton.jit
def _row_slot(bh, strip, r, tile, STRIPS, STRIP, TILES):
    """P's slot for row r of strip `strip` and tile `tile` < TILES - 1 of (batch, head) bh."""
    return ((tl.cast(bh, tl.int64) * STRIPS + strip) * STRIP + r) * (TILES - 1) + tile


@triton.jit
def _states_kernel(K, V, G, P, skb, skx, sky, skh, svb, svx, svy, svh, X, Y, H, C, F,
                   STRIPS, STRIP, TILES, TILE, COLUMN_PROGRAMS,
                   CB: tl.constexpr, FB: tl.constexpr, FLIP: tl.constexpr, PRECISION: tl.constexpr):
    """Programs [0, COLUMN_PROGRAMS): strip I < STRIPS - 1 of (batch, head) bh walks its columns c, writing
    G[bh, I, c] = sum of keys^T values over the strip's rows and the columns <= c. The others: tile J < TILES - 1
    of strip I walks its rows r, writing P[bh, I, r, J] = the same over the tile's columns and the strip's rows
    <= r. Each for one block of the state."""
    pid = tl.program_id(0)
    c_blocks, f_blocks = tl.cdiv(C, CB), tl.cdiv(F, FB)
    block = pid % (c_blocks * f_blocks)
    c = (block // f_blocks) * CB + tl.arange(0, CB)
    f = (block % f_blocks) * FB + tl.arange(0, FB)
    side = tl.arange(0, 16)
    acc = tl.zeros((CB, FB), dtype=tl.float32)
    if pid < COLUMN_PROGRAMS:
        rest = pid // (c_blocks * f_blocks)
        strip = rest % (STRIPS - 1)
        bh = rest // (STRIPS - 1)
        b, h = tl.cast(bh // H, tl.int64), tl.cast(bh % H, tl.int64)
        rows = strip * STRIP + side
        valid = (side < STRIP) & (rows < X)
        for col in range(0, Y):
            cols = tl.zeros((16,), dtype=tl.int32) + col
            k = _positions(K, _offsets(b, h, rows, cols, X, Y, skb, skx, sky, skh, FLIP), valid, c, C)
            v = _positions(V, _offsets(b, h, rows, cols, X, Y, svb, svx, svy, svh, FLIP), valid, f, F)
            acc += tl.dot(tl.trans(k), v, input_precision=PRECISION)
            ptr, keep = _state(G, _column_slot(bh, strip, col, STRIPS, Y), c, f, C, F)
            tl.store(ptr, acc, mask=keep)
    else:
        rest = (pid - COLUMN_PROGRAMS) // (c_blocks * f_blocks)
        tile = rest % (TILES - 1)
        rest = rest // (TILES - 1)
        strip = rest % STRIPS
        bh = rest // STRIPS
        b, h = tl.cast(bh // H, tl.int64), tl.cast(bh % H, tl.int64)
        cols = tile * TILE + side
        for r in range(0, STRIP):
            rows = tl.zeros((16,), dtype=tl.int32) + strip * STRIP + r
            valid = (side < TILE) & (cols < Y) & (rows < X)
            k = _positions(K, _offsets(b, h, rows, cols, X, Y, skb, skx, sky, skh, FLIP), valid, c, C)
            v = _positions(V, _offsets(b, h, rows, cols, X, Y, svb, svx, svy, svh, FLIP), valid, f, F)
            acc += tl.dot(tl.trans(k), v, input_precision=PRECISION)
            ptr, keep = _state(P, _row_slot(bh, strip, r, tile, STRIPS, STRIP, TILES), c, f, C, F)
            tl.store(ptr, acc, mask=keep)


@triton.jit
def _output_kernel(Q, K, V, G, P, OUT, sqb, sqx, sqy, sqh, skb, skx, sky, skh, svb, svx, svy, svh,
                   sob, sox, soy, soh, X, Y, H, C, F, STRIPS, STRIP, TILES, TILE, ROW_PROGRAMS,
                   CP: tl.constexpr, FB: tl.constexpr, FLIP: tl.constexpr, PRECISION: tl.constexpr):
    """Programs [0, ROW_PROGRAMS): row r of strip I walks its tiles J: their key rows up to r (four at a time),
    masked to columns <= each query's, and the running sum of P[bh, I, r, J'] over J' < J. The others: column
    c walks the strips I > 0: the running sum of G[bh, I', c] over I' < I. Each adds its part to OUT (float32,
    zero before).
    The products with the running state keep float32 accuracy at any PRECISION as TF32x3 (three TF32 products on
    tensor cores, a fifth faster than float32 FMA at 64x64): the running sums must not be rounded to TF32, and a
    plain TF32 product with a loop-carried operand fails to compile in Triton 3.6 (its prefetch pass)."""
    pid = tl.program_id(0)
    f_blocks = tl.cdiv(F, FB)
    f = (pid % f_blocks) * FB + tl.arange(0, FB)
    c = tl.arange(0, CP)
    side = tl.arange(0, 16)
    state = tl.zeros((CP, FB), dtype=tl.float32)
    if pid < ROW_PROGRAMS:
        rest = pid // f_blocks
        r = rest % STRIP
        rest = rest // STRIP
        strip = rest % STRIPS
        bh = rest // STRIPS
        b, h = tl.cast(bh // H, tl.int64), tl.cast(bh % H, tl.int64)
        row = strip * STRIP + r
        rows = tl.zeros((16,), dtype=tl.int32) + row
        key_side = tl.arange(0, 64) % 16  # key rows four at a time: 64 keys
        key_four = tl.arange(0, 64) // 16
        earlier = key_side[None, :] <= side[:, None]  # key column <= query column
        for tile in range(0, TILES):
            cols = tile * TILE + side
            valid = (side < TILE) & (cols < Y) & (row < X)
            q = _positions(Q, _offsets(b, h, rows, cols, X, Y, sqb, sqx, sqy, sqh, FLIP), valid, c, C)
            acc = tl.dot(q, state, input_precision="tf32x3")  # see the docstring
            key_cols = tile * TILE + key_side
            for first in range(0, r + 1, 4):
                key_rows = strip * STRIP + first + key_four
                keep = (first + key_four <= r) & (key_side < TILE) & (key_cols < Y) & (row < X)
                k = _positions(K, _offsets(b, h, key_rows, key_cols, X, Y, skb, skx, sky, skh, FLIP), keep, c, C)
                v = _positions(V, _offsets(b, h, key_rows, key_cols, X, Y, svb, svx, svy, svh, FLIP), keep, f, F)
                scores = tl.where(earlier, tl.dot(q, tl.trans(k), input_precision=PRECISION), 0.0)
                acc += tl.dot(scores, v, input_precision=PRECISION)
            out = OUT + _offsets(b, h, rows, cols, X, Y, sob, sox, soy, soh, FLIP)
            tl.atomic_add(out[:, None] + f[None, :], acc, mask=valid[:, None] & (f < F)[None, :], sem="relaxed")
            if tile < TILES - 1:
                ptr, keep = _state(P, _row_slot(bh, strip, r, tile, STRIPS, STRIP, TILES), c, f, C, F)
                state += tl.load(ptr, mask=keep & (row < X), other=0.0)
    else:
        rest = (pid - ROW_PROGRAMS) // f_blocks
        col = rest % Y
        bh = rest // Y
        b, h = tl.cast(bh // H, tl.int64), tl.cast(bh % H, tl.int64)
        cols = tl.zeros((16,), dtype=tl.int32) + col
        for strip in range(1, STRIPS):
            ptr, keep = _state(G, _column_slot(bh, strip - 1, col, STRIPS, Y), c, f, C, F)
            state += tl.load(ptr, mask=keep, other=0.0)
            rows = strip * STRIP + side
            valid = (side < STRIP) & (rows < X)
            q = _positions(Q, _offsets(b, h, rows, cols, X, Y, sqb, sqx, sqy, sqh, FLIP), valid, c, C)
            out = OUT + _offsets(b, h, rows, cols, X, Y, sob, sox, soy, soh, FLIP)
            acc = tl.dot(q, state, input_precision="tf32x3")
            tl.atomic_add(out[:, None] + f[None, :], acc, mask=valid[:, None] & (f < F)[None, :], sem="relaxed")


def _output_blocks(channels: int, features: int, device: torch.device) -> tuple[int, int]:
    """(values per program, pipeline stages) of the output kernel for `channels` and `features` (powers of two),
    which holds a program's queries and states over all channels in shared memory. Compiled offline (Triton 3.8,
    ptxas, the same bytes for sm_80, 86, 89 and 90): 128 channels with 64 values take 152 KiB, 256 with 32 take 176
    KiB; GPUs with less per block (sm_86 and sm_89: 99 KiB, the A100: 163) take 32 values at 128 channels (92 KiB)
    and 16 values on two stages at 256 (88 KiB), where the defaults would fail to launch."""
    block = min(features, 64 if channels <= 128 else 32)
    room = shared_memory(device)
    if channels == 128 and block == 64 and room < 152 * 1024:
        return 32, 3
    if channels == 256 and room < 176 * 1024:
        return min(block, 16), 2
    return block, 3


def box_attention_triton(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, flip: bool = False,
                         precision: str = "ieee") -> torch.Tensor:
    """sum_{s<=p} (query_p . keys_s) values_s (float32, contiguous) for (B, X, Y, H, C) queries and keys and
    (B, X, Y, H, F) values of any float dtype and strides; with flip, the sum over s >= p."""
    if keys.shape != query.shape or values.shape[:-1] != query.shape[:-1] or query.dim() != 5:
        raise ValueError(f"box_attention_triton: `query` and `keys` must have one shape (B, X, Y, H, C) and `values` "
                         f"(B, X, Y, H, F); got {tuple(query.shape)}, {tuple(keys.shape)} and {tuple(values.shape)}")
    if query.shape[-1] > MAX_CHANNELS:
        raise ValueError(f"box_attention_triton: at most {MAX_CHANNELS} channels, got {query.shape[-1]}")
    query, keys, values = (unit_last_stride(x) for x in (query, keys, values))
    batch, x, y, heads, channels = query.shape
    features = values.shape[-1]
    device = values.device
    out = torch.zeros(batch, x, y, heads, features, device=device, dtype=torch.float32)
    if out.numel() == 0 or channels == 0:
        return out
    (strips, strip), (tiles, tile) = tiling._split(x, tiling.STRIP), tiling._split(y, tiling.TILE)
    assert strip <= 16 and tile <= 16  # the kernels hold 16 rows of a strip and 16 columns of a tile
    width, features_width = max(next_power_of_2(channels), 16), max(next_power_of_2(features), 16)
    state = channels * features
    f32 = torch.float32
    # no state for the last strip's columns or the last tile's rows: nothing comes after them
    columns = torch.empty(batch * heads, strips - 1, y, state, device=device, dtype=f32) if strips > 1 else out
    rows = torch.empty(batch * heads, strips, strip, tiles - 1, state, device=device, dtype=f32) if tiles > 1 else out
    # the states kernel: one program per strip (G) or strip and tile (P) and 32 x 32 block of the state
    state_c, state_f = min(width, 32), min(features_width, 32)
    blocks = cdiv(channels, state_c) * cdiv(features, state_f)
    g_programs = batch * heads * (strips - 1) * blocks
    p_programs = batch * heads * strips * (tiles - 1) * blocks
    # the output kernel: one program per row of a strip and per column, and block of the values
    out_f, stages = _output_blocks(width, features_width, device)
    row_programs = batch * heads * strips * strip * cdiv(features, out_f)
    column_programs = batch * heads * y * cdiv(features, out_f) if strips > 1 else 0
    sizes = (x, y, heads, channels, features, strips, strip, tiles, tile)
    q_strides, k_strides, v_strides = (t.stride()[:4] for t in (query, keys, values))
    options = dict(FLIP=flip, PRECISION=precision, num_warps=WARPS)
    with on_device(device):
        if g_programs + p_programs:
            _states_kernel[(g_programs + p_programs,)](
                keys, values, columns, rows, *k_strides, *v_strides, *sizes, g_programs, CB=state_c, FB=state_f,
                **options)
        _output_kernel[(row_programs + column_programs,)](
            query, keys, values, columns, rows, out, *q_strides, *k_strides, *v_strides, *out.stride()[:4], *sizes,
            row_programs, CP=width, FB=out_f, num_stages=stages, **options)
    return out
