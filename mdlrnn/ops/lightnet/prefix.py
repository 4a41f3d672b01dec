"""LightNet on the scan core.

global: one reduction. box: a grid scan (causal is box mode on the flattened sequence). Each key channel c
of head h becomes a head of its own (Dk' = 1) so that its softmax can be normalised by running maxima:
the state on the edge leaving p along axis a sums exp(k_s - m_a[p]) [v_s, 1] over its region

    R_a(p) = {s : s_i = p_i for i < a, s_i <= p_i for i >= a},   m_a[p] = max of k over R_a(p),

and the unit multitree transitions T[a, b] = 1 for a <= b (DESIGN.md section 2) become exp(m_b[p - e_b] - m_a[p])
<= 1. Every exponent is <= 0, so nothing overflows, and the largest term of each sum is exactly 1, so the
denominator never underflows. The output does not depend on the maxima, which carry no gradient.
"""

from __future__ import annotations

import torch

from ..grid.chunk import grid_scan_torch
from .tiles import lightnet_box_tiles, tiles_fit


def _channel_values(v: torch.Tensor, angles) -> torch.Tensor:
    """What each key channel sums: v, or [cos(angle_s) v_s, sin(angle_s) v_s] with rotary angles (..., Dk, F)."""
    if angles is None:
        return v[..., None, :]
    return torch.cat([torch.cos(angles)[..., None] * v[..., None, :], torch.sin(angles)[..., None] * v[..., None, :]], -1)


def _read(q: torch.Tensor, summed: torch.Tensor, angles, scale: float) -> torch.Tensor:
    """scale * sum_c q_p[c] * numerator[c] / denominator[c] from the channel sums (..., Dk, F) (last column: den).

    With angles the numerator is cos(angle_p) N_cos + sin(angle_p) N_sin = sum_s w_s cos(angle_p - angle_s) v_s.
    """
    numerator, denominator = summed[..., :-1], summed[..., -1:]
    if angles is not None:
        half = numerator.shape[-1] // 2
        numerator = torch.cos(angles)[..., None] * numerator[..., :half] + torch.sin(angles)[..., None] * numerator[..., half:]
    return scale * (q[..., None] * numerator / denominator).sum(-2)


def lightnet_global(q, k, v, scale: float, angles=None) -> torch.Tensor:
    """One reduction over all positions; with angles, cos(a_p - a_s) = cos a_p cos a_s + sin a_p sin a_s splits
    into two reductions, so no per-channel copy of v is made."""
    batch, heads, shape = q.shape[0], q.shape[-2], v.shape
    flat = lambda x: x.reshape(batch, -1, heads, x.shape[-1])
    q, k, v = flat(q), flat(k), flat(v)
    weights = torch.exp(k - k.detach().amax(1, keepdim=True))  # (B, P, H, Dk)
    query = q / weights.sum(1, keepdim=True)
    if angles is None:
        return scale * torch.einsum("bphc,bhcv->bphv", query, torch.einsum("bshc,bshv->bhcv", weights, v)).reshape(shape)
    angles = flat(angles)
    cos, sin = torch.cos(angles), torch.sin(angles)
    y = torch.einsum("bphc,bhcv->bphv", query * cos, torch.einsum("bshc,bshv->bhcv", weights * cos, v))
    y = y + torch.einsum("bphc,bhcv->bphv", query * sin, torch.einsum("bshc,bshv->bhcv", weights * sin, v))
    return (scale * y).reshape(shape)


def _entering(m: torch.Tensor, axis: int) -> torch.Tensor:
    """m at p - e_axis (at the low face, where nothing enters, m itself: any value <= the target's works)."""
    size = m.shape[axis]
    return torch.cat([m.narrow(axis, 0, 1), m.narrow(axis, 0, size - 1)], axis)


def lightnet_box(q, k, v, scale: float, angles=None, grid_scan=grid_scan_torch) -> torch.Tensor:
    batch, *sizes, heads, dk = q.shape
    ndim = len(sizes)
    with torch.no_grad():
        maxima, running = [None] * ndim, k
        for a in reversed(range(ndim)):
            running = torch.cummax(running, dim=1 + a).values
            maxima[a] = running
        box = maxima[0]
        entering = torch.stack([_entering(maxima[b], 1 + b) for b in range(ndim)], -1)  # (..., Dk, N)
        leaving = torch.stack(maxima, -1)
        turns = torch.ones(ndim, ndim, dtype=torch.bool, device=q.device).triu()  # a <= b
        exponent = entering[..., None, :] - leaving[..., :, None]
        transition = torch.where(turns, exponent, -torch.inf).exp()
        mark = (entering - box[..., None]).exp()

    source = torch.exp(k[..., None] - leaving)
    direct = torch.exp(k - box)
    channels = (batch, *sizes, heads * dk)
    ones = q.new_ones(*channels, 1)
    values = _channel_values(v, angles)
    features = values.shape[-1] + 1
    values = torch.cat([values.expand(*k.shape, -1), torch.ones_like(k)[..., None]], -1).reshape(*channels, features)
    summed = grid_scan(
        ones,
        ones,
        values,
        source.reshape(*channels, ndim),
        transition.reshape(*channels, ndim, ndim),
        mark.reshape(*channels, ndim),
        direct.reshape(channels),
        1.0,
    ).view(batch, *sizes, heads, dk, features)
    return _read(q, summed, angles, scale)


def lightnet_scan_torch(q, k, v, mode: str, scale: float, angles=None, grid_scan=grid_scan_torch) -> torch.Tensor:
    """The three modes; causal and box run on `grid_scan` (the torch path, or the 1D Triton kernels), box mode on
    2D grids on tiled products where their one reference per channel is exact (tiles.py)."""
    if mode == "global":
        return lightnet_global(q, k, v, scale, angles)
    if mode == "causal":
        batch, heads = q.shape[0], q.shape[-2]
        flat = lambda x: None if x is None else x.reshape(batch, -1, heads, x.shape[-1])
        return lightnet_box(flat(q), flat(k), flat(v), scale, flat(angles), grid_scan).reshape(v.shape)
    if q.dim() == 5 and tiles_fit(k):  # 2D: tiled products where one reference per channel is exact
        return lightnet_box_tiles(q, k, v, scale, angles)
    return lightnet_box(q, k, v, scale, angles, grid_scan)
