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


def lightnet_global(q, k, v, scale: float) -> torch.Tensor:
    batch, *sizes, heads, dk = q.shape
    flat = lambda x: x.reshape(batch, -1, heads, x.shape[-1])
    k_flat = flat(k)
    weights = torch.exp(k_flat - k_flat.detach().amax(1, keepdim=True))
    summary = torch.einsum("bshc,bshv->bhcv", weights, flat(v)) / weights.sum(1)[..., None]
    return scale * torch.einsum("bshc,bhcv->bshv", flat(q), summary).reshape(*v.shape)


def _entering(m: torch.Tensor, axis: int) -> torch.Tensor:
    """m at p - e_axis (at the low face, where nothing enters, m itself: any value <= the target's works)."""
    size = m.shape[axis]
    return torch.cat([m.narrow(axis, 0, 1), m.narrow(axis, 0, size - 1)], axis)


def lightnet_box(q, k, v, scale: float, grid_scan=grid_scan_torch) -> torch.Tensor:
    batch, *sizes, heads, dk = q.shape
    ndim, dv = len(sizes), v.shape[-1]
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
    values = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)
    values = values[..., None, :].expand(*v.shape[:-1], dk, dv + 1).reshape(*channels, dv + 1)
    summed = grid_scan(
        ones,
        ones,
        values,
        source.reshape(*channels, ndim),
        transition.reshape(*channels, ndim, ndim),
        mark.reshape(*channels, ndim),
        direct.reshape(channels),
        1.0,
    ).view(batch, *sizes, heads, dk, dv + 1)
    return scale * (q[..., None] * summed[..., :dv] / summed[..., dv:]).sum(-2)


def lightnet_scan_torch(q, k, v, mode: str, scale: float) -> torch.Tensor:
    if mode == "global":
        return lightnet_global(q, k, v, scale)
    if mode == "causal":
        batch, heads = q.shape[0], q.shape[-2]
        flat = lambda x: x.reshape(batch, -1, heads, x.shape[-1])
        return lightnet_box(flat(q), flat(k), flat(v), scale).reshape(v.shape)
    return lightnet_box(q, k, v, scale)
