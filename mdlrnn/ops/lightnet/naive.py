"""LightNet's attention written as its definition: a softmax per key channel over each position's region."""

from __future__ import annotations

import math

import torch

from ..grid.plan import coordinates


def region_mask(sizes: tuple[int, ...], mode: str, device=None) -> torch.Tensor:
    """(P, P) boolean: entry [p, s] says whether position s is in R(p) (row-major flattening)."""
    count = math.prod(sizes)
    if mode == "global":
        return torch.ones(count, count, dtype=torch.bool, device=device)
    if mode == "causal":
        return torch.ones(count, count, dtype=torch.bool, device=device).tril()
    coords = coordinates(sizes).to(device)
    return (coords[None, :, :] <= coords[:, None, :]).all(-1)


def lightnet_scan_reference(q, k, v, mode: str, scale: float, angles=None) -> torch.Tensor:
    """y_p = scale * sum_c q_p[c] * sum_{s in R(p)} softmax_{s in R(p)}(k_s[c]) * cos(angles_p[c] - angles_s[c]) * v_s,
    one p at a time (the cosine is 1 without angles)."""
    batch, *sizes, heads, dk = q.shape
    flat = lambda x: x.reshape(batch, -1, heads, x.shape[-1])
    q, k, v = flat(q), flat(k), flat(v)
    mask = region_mask(tuple(sizes), mode, q.device)
    outputs = []
    for p in range(q.shape[1]):
        region = mask[p]
        weights = torch.softmax(k[:, region], dim=1)  # (B, |R|, H, Dk): over the region, per channel
        if angles is not None:
            angle = flat(angles)
            weights = weights * torch.cos(angle[:, p, None] - angle[:, region])
        summary = torch.einsum("brhc,brhv->bhcv", weights, v[:, region])
        outputs.append(scale * torch.einsum("bhc,bhcv->bhv", q[:, p], summary))
    return torch.stack(outputs, 1).reshape(batch, *sizes, heads, v.shape[-1])
