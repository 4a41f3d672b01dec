r"""LightNet's 2D box mode as tiled linear attention: batched matrix products, linear in the positions.

With one reference per key channel, its logit at the first position k_0 (which lies in every box, so each output
depends on its box alone, exactly), k'_s = e^{k_s - k_0} and Z_p = sum_{s<=p} k'_s >= 1 (two cumulative sums),
box mode is linear attention with a box mask:

    y_p = scale sum_{s<=p} (q'_p . k'_s) v_s,   q'_p = q_p / Z_p.

The grid is cut into strips of at most STRIP rows and each strip into tiles of at most TILE columns. The box
of p (strip I, tile J, row r and column c inside it) is three disjoint parts:
- above the strip: the rows of earlier strips, columns <= c: the state U[I, c] = sum k'_s v_s^T over that
  region, one per strip and column (cumulative sums of per-strip column states);
- left of the tile in the strip: the strip's rows up to r, the columns of earlier tiles: R[I, r, J], one per
  row and tile;
- the tile itself: a masked product of its (strip x tile)^2 scores, s <= p on both axes.
Rotary angles double the channels, [q' cos, q' sin] and [k' cos, k' sin].

The one reference per channel serves while no logit rises SPREAD or more above it (k' <= e^SPREAD keeps Z, the
states and the products well inside float32); terms far below it vanish beside Z >= 1. `tiles_fit` says
whether that holds, and callers take the running-maxima paths otherwise. Each path is exactly causal in the
box, but the choice is made once per call, over the whole batch: a logit far outside a position's box (or in
another batch element) can switch the path and so move that position's output by float32 rounding. The
products follow torch's float32 matmul precision (TF32 where the caller enables it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STRIP = 16
TILE = 16
SPREAD = 60.0  # e^60 ~ 1e26: Z, q' and the states stay well inside float32's range


def tiles_fit(k: torch.Tensor) -> bool:
    """Whether one reference per (batch, head, channel) serves: max k - k at the first position < SPREAD. The
    answer is read on the host, which a CUDA graph capture cannot wait for: there, a clear error instead of an
    invalidated capture."""
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("lightnet_scan(mode='box') on a 2D grid reads the logits' spread on the host to choose "
                           "its exact path, which a CUDA graph capture cannot do: run box mode outside the capture "
                           "(causal and global modes capture)")
    spread = k.detach().flatten(1, 2).amax(1) - k.detach()[:, 0, 0]
    return bool((spread < SPREAD).all())


def _split(size: int, most: int) -> tuple[int, int]:
    """The fewest pieces of at most `most` and their even length: a 24-row grid is two strips of 12 (no padding),
    not two of 16."""
    pieces = -(-size // most)
    return pieces, -(-size // pieces)


def _tiled(x: torch.Tensor, strips: int, strip: int, tiles: int, tile: int) -> torch.Tensor:
    """(B, X, Y, H, C) -> (B, H, S, strip, NJ, tile, C), zero-padded to whole strips and tiles."""
    x = F.pad(x, (0, 0, 0, 0, 0, tiles * tile - x.shape[2], 0, strips * strip - x.shape[1]))
    batch, _, _, heads, channels = x.shape
    return x.view(batch, strips, strip, tiles, tile, heads, channels).permute(0, 5, 1, 2, 3, 4, 6)


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums of the entries before each one (not cumsum - x: its terms span many orders of magnitude and would
    cancel)."""
    before = x.narrow(dim, 0, x.shape[dim] - 1).cumsum(dim)
    return torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), before], dim)


def box_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, flip: bool = False
                  ) -> torch.Tensor:
    """sum_{s<=p} (query_p . keys_s) values_s for (B, X, Y, H, C) queries and keys and (B, X, Y, H, F) values;
    with flip, the sum over s >= p (the grid read from its far corner)."""
    if flip:
        return _flipped(box_attention(_flipped(query), _flipped(keys), _flipped(values)))
    batch, x, y, heads, _ = query.shape
    (strips, strip), (tiles, tile) = _split(x, STRIP), _split(y, TILE)
    qt, kt, vt = (_tiled(t, strips, strip, tiles, tile) for t in (query, keys, values))  # (B, H, S, strip, NJ, tile, C)
    # the tile itself: its scores masked to s <= p on both axes
    flat = lambda t: t.transpose(3, 4).flatten(4, 5)  # (B, H, S, NJ, strip tile, C)
    position = torch.arange(strip * tile, device=query.device)
    r, c = position // tile, position % tile
    mask = (r[None, :] <= r[:, None]) & (c[None, :] <= c[:, None])
    scores = (flat(qt) @ flat(kt).transpose(-1, -2)).masked_fill(~mask, 0.0)
    out = (scores @ flat(vt)).unflatten(4, (strip, tile)).transpose(3, 4)
    if strips > 1:  # above the strip: column states of each strip, summed along the row, then over strips before
        column = torch.einsum("bhsrjtc,bhsrjtd->bhsjtcd", kt, vt).flatten(3, 4)  # (B, H, S, columns, C, F)
        above = _exclusive_cumsum(column.cumsum(3), 2)
        out = out + torch.einsum("bhsrjtc,bhsjtcd->bhsrjtd", qt, above.unflatten(3, (tiles, tile)))
    if tiles > 1:  # left of the tile: row states of each tile, summed down the strip, then over tiles before
        row = torch.einsum("bhsrjtc,bhsrjtd->bhsrjcd", kt, vt)  # (B, H, S, strip, NJ, C, F)
        left = _exclusive_cumsum(row.cumsum(3), 4)
        out = out + torch.einsum("bhsrjtc,bhsrjcd->bhsrjtd", qt, left)
    out = out.permute(0, 2, 3, 4, 5, 1, 6).reshape(batch, strips * strip, tiles * tile, heads, values.shape[-1])
    return out[:, :x, :y]


def rotated(x: torch.Tensor, angles) -> torch.Tensor:
    """[x cos, x sin] with angles (2 C channels), else x."""
    if angles is None:
        return x
    return torch.cat([x * torch.cos(angles), x * torch.sin(angles)], -1)


def _weights(k: torch.Tensor) -> torch.Tensor:
    """e^{k - k_0}: the output does not depend on the reference, which carries no gradient."""
    return torch.exp(k - k.detach()[:, :1, :1])


class _Normalized(torch.autograd.Function):
    """q' = scale q / Z with the gradient of Z as -(dq' . q') / Z: autograd's -dq' q / Z^2 squares Z, up to
    e^120, out of float32's range."""

    @staticmethod
    def forward(ctx, q, z, scale: float):
        q_prime = scale * q / z
        ctx.save_for_backward(q_prime, z)
        ctx.scale = scale
        return q_prime

    @staticmethod
    def backward(ctx, d_q_prime):
        q_prime, z = ctx.saved_tensors
        return ctx.scale * d_q_prime / z, -(d_q_prime * q_prime) / z, None


def lightnet_box_tiles(q, k, v, scale: float, angles=None) -> torch.Tensor:
    """y (B, X, Y, H, Dv) for (B, X, Y, H, D) inputs (one float dtype); differentiable. Assumes tiles_fit(k)."""
    weights = _weights(k)
    query = _Normalized.apply(q, weights.cumsum(1).cumsum(2), scale)
    return box_attention(rotated(query, angles), rotated(weights, angles), v)


def _flipped(x: torch.Tensor) -> torch.Tensor:
    """The grid read from its far corner: the box s <= p becomes s >= p."""
    return x.flip(1, 2)


def unrotated(grad: torch.Tensor, x: torch.Tensor, angles):
    """The gradient of x and of the angles from the gradient of [x cos, x sin] (None for the angles without)."""
    if angles is None:
        return grad, None
    cos, sin = torch.cos(angles), torch.sin(angles)
    grad_cos, grad_sin = grad.chunk(2, -1)
    return grad_cos * cos + grad_sin * sin, x * (grad_sin * cos - grad_cos * sin)


def box_terms(q: torch.Tensor, k: torch.Tensor, scale: float):
    """The weights e^{k - k_0}, their box sums Z and q' = scale q / Z, in float32 and contiguous (whatever k's
    strides), of lightnet_box_tiles (no autograd: for a backward written out, lightnet_box_tiles_backward)."""
    weights = _weights(k.float()).contiguous()
    z = weights.cumsum(1).cumsum(2)
    return weights, z, q / z * scale


def lightnet_box_tiles_backward(q, weights, z, v, angles, dy, scale: float, attention=box_attention):
    """dq, dk, dv and d_angles (None without angles) of lightnet_box_tiles, in float32, written out from q and
    the weights and Z of box_terms: the gradients of box attention are box attentions again, two of them over
    the reversed box (a flipped grid):

        d query_p = sum_{s<=p} (dy_p . v_s) keys_s,   d keys_s = sum_{p>=s} (v_s . dy_p) query_p,
        dv_s = sum_{p>=s} (keys_s . query_p) dy_p,

    then through q' = scale q / Z, Z the box sums of the weights e^{k - k_0}, and the rotation."""
    q_prime = q / z * scale
    query, keys = rotated(q_prime, angles), rotated(weights, angles)
    d_query = attention(dy, v, keys)
    d_keys = attention(v, dy, query, flip=True)
    dv = attention(keys, query, dy, flip=True)
    d_q_prime, d_angles = unrotated(d_query, q_prime, angles)
    d_weights, d_angles_keys = unrotated(d_keys, weights, angles)
    d_z = -d_q_prime * q_prime / z
    d_weights = d_weights + _flipped(_flipped(d_z).cumsum(1).cumsum(2))  # Z's transpose: sums over p >= s
    if angles is not None:
        d_angles = d_angles + d_angles_keys
    return scale * d_q_prime / z, d_weights * weights, dv, d_angles
