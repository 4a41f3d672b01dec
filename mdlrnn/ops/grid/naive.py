"""The step-by-step grid recurrence: the specification every fast path is tested against."""

from __future__ import annotations

import itertools

import torch


def grid_scan_reference(q, k, v, source, transition, mark, direct, scale: float) -> torch.Tensor:
    """Visit positions in row-major order, which puts every p - e_b before p.

    C_a[p] = sum_b T[p,a,b] C_b[p - e_b] + S[p,a] k_p v_p^T
    y_p    = scale * (q_p^T sum_b M[p,b] C_b[p - e_b] + D_p (q_p . k_p) v_p)
    """
    batch, *sizes, heads, dk = q.shape
    dv = v.shape[-1]
    ndim = len(sizes)
    outside = q.new_zeros(batch, heads, dk, dv)
    leaving = {}  # position -> [state on the edge leaving it along axis a for a in range(ndim)]
    outputs = []
    for p in itertools.product(*(range(s) for s in sizes)):
        at = (slice(None), *p)
        entering = []
        for b in range(ndim):
            before = p[:b] + (p[b] - 1,) + p[b + 1 :]
            entering.append(leaving[before][b] if p[b] > 0 else outside)
        q_p, k_p, v_p = q[at], k[at], v[at]  # (B, H, D)
        kv = k_p[..., :, None] * v_p[..., None, :]
        t, s, m = transition[at], source[at], mark[at]
        leaving[p] = [
            sum(t[:, :, a, b, None, None] * entering[b] for b in range(ndim)) + s[:, :, a, None, None] * kv
            for a in range(ndim)
        ]
        marked = sum(m[:, :, b, None, None] * entering[b] for b in range(ndim))
        y = (q_p[..., None, :] @ marked).squeeze(-2)
        if direct is not None:
            y = y + direct[at][..., None] * (q_p * k_p).sum(-1, keepdim=True) * v_p
        outputs.append(scale * y)
    return torch.stack(outputs, dim=1).reshape(batch, *sizes, heads, dv)
