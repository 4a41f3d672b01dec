"""Parallel PyTorch DAG scan: level-synchronous over the line graph, one step per level for the whole batch.

An edge's level is the longest-path depth of its source, so all its predecessors sit on lower levels.
Forward fills one (E, H, Dk, Dv) buffer level by level (edges sorted by level, so a level is a slice).
Backward runs the adjoint recurrence over the same levels in reverse,

    dC_e = scale * M_e q_n dy_n^T + sum_{j: e -> e_out} T_j dC_{e_out}        (n = dst(e)),

so memory is one state per edge and no autograd graph grows with the number of levels.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


class _Schedule:
    """The DAG's level structure in the frame of level-sorted edges."""

    def __init__(self, graph):
        rank = torch.empty_like(graph.edge_order)
        rank[graph.edge_order] = torch.arange(graph.num_edges, device=rank.device)
        self.order = graph.edge_order
        self.src, self.dst = graph.edge_index[:, graph.edge_order]
        self.bounds = graph.edge_bounds
        e_in, e_out = rank[graph.line_edges]
        self.fwd_lines, self.fwd_bounds = graph.line_by_out, graph.line_out_bounds
        self.fwd_in, self.fwd_out = e_in[self.fwd_lines], e_out[self.fwd_lines]
        self.bwd_lines, self.bwd_bounds = graph.line_by_in, graph.line_in_bounds
        self.bwd_in, self.bwd_out = e_in[self.bwd_lines], e_out[self.bwd_lines]

    def levels(self, bounds):
        for level in range(len(self.bounds) - 1):
            yield self.bounds[level], self.bounds[level + 1], bounds[level], bounds[level + 1]


def _unsort(sorted_values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(sorted_values)
    out[order] = sorted_values
    return out


class DagScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, source, transition, mark, direct, graph, scale):
        plan = graph.derived(_Schedule, _Schedule)
        heads, dk, dv = q.shape[1], q.shape[2], v.shape[2]
        s_sorted = source.index_select(0, plan.order)
        t_fwd = transition.index_select(0, plan.fwd_lines)
        k_src = (s_sorted[..., None] * k.index_select(0, plan.src))[..., :, None]  # S_e k_u
        v_src = v.index_select(0, plan.src)[..., None, :]
        states = q.new_empty(graph.num_edges, heads, dk, dv)
        for start, stop, lo, hi in plan.levels(plan.fwd_bounds):
            level = states[start:stop]
            torch.mul(k_src[start:stop], v_src[start:stop], out=level)
            if hi > lo:
                carried = states.index_select(0, plan.fwd_in[lo:hi]).mul_(t_fwd[lo:hi, :, None, None])
                level.index_add_(0, plan.fwd_out[lo:hi] - start, carried)

        # products with (Dk, Dv) states as broadcast multiply-sums: faster than batches of tiny matmuls
        read = (q.index_select(0, plan.dst)[..., :, None] * states).sum(-2)  # q_n^T C_e: (E, H, Dv)
        y = torch.zeros_like(v).index_add_(0, plan.dst, mark.index_select(0, plan.order)[..., None] * read)
        if direct is not None:
            y = y + direct[..., None] * (q * k).sum(-1, keepdim=True) * v
        ctx.save_for_backward(q, k, v, source, transition, mark, direct, states)
        ctx.plan, ctx.scale, ctx.has_direct = plan, scale, direct is not None
        return scale * y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        q, k, v, source, transition, mark, direct, states = ctx.saved_tensors
        plan, g = ctx.plan, ctx.scale * dy
        s_sorted, m_sorted = source.index_select(0, plan.order), mark.index_select(0, plan.order)
        q_dst, g_dst = q.index_select(0, plan.dst), g.index_select(0, plan.dst)
        t_bwd = transition.index_select(0, plan.bwd_lines)

        adjoint = m_sorted[..., None, None] * q_dst[..., :, None] * g_dst[..., None, :]
        d_t = torch.empty_like(t_bwd)
        levels = list(plan.levels(plan.bwd_bounds))
        for start, stop, lo, hi in reversed(levels):
            if hi > lo:
                ahead = adjoint.index_select(0, plan.bwd_out[lo:hi])
                d_t[lo:hi] = (ahead * states.index_select(0, plan.bwd_in[lo:hi])).sum((-1, -2))
                adjoint.index_add_(0, plan.bwd_in[lo:hi], ahead.mul_(t_bwd[lo:hi, :, None, None]))

        u = plan.src
        k_src, v_src = k.index_select(0, u), v.index_select(0, u)
        adj_v = (adjoint @ v_src[..., None]).squeeze(-1)  # dC_e v_u: (E, H, Dk)
        d_s = (adj_v * k_src).sum(-1)
        d_k = torch.zeros_like(k).index_add_(0, u, s_sorted[..., None] * adj_v)
        adj_k = (k_src[..., None, :] @ adjoint).squeeze(-2)  # k_u^T dC_e: (E, H, Dv)
        d_v = torch.zeros_like(v).index_add_(0, u, s_sorted[..., None] * adj_k)
        read = (q_dst[..., None, :] @ states).squeeze(-2)
        d_m = (read * g_dst).sum(-1)
        d_q = torch.zeros_like(q).index_add_(0, plan.dst, m_sorted[..., None] * (states @ g_dst[..., None]).squeeze(-1))

        d_direct = None
        if ctx.has_direct:
            qk, vg = (q * k).sum(-1), (v * g).sum(-1)
            d_direct = qk * vg
            d_q = d_q + (direct * vg)[..., None] * k
            d_k = d_k + (direct * vg)[..., None] * q
            d_v = d_v + (direct * qk)[..., None] * g

        return (
            d_q,
            d_k,
            d_v,
            _unsort(d_s, plan.order),
            _unsort(d_t, plan.bwd_lines),
            _unsort(d_m, plan.order),
            d_direct,
            None,
            None,
        )


def dag_scan_torch(q, k, v, source, transition, mark, direct, graph, scale: float) -> torch.Tensor:
    return DagScan.apply(q, k, v, source, transition, mark, direct, graph, scale)
