"""Parallel DAG scan: level-synchronous over the line graph, the whole batch in every step.

An edge's level is the longest-path depth of its source, so all its predecessors sit on lower levels.
The forward pass fills one (E, H, Dk, Dv) buffer of states at level-sorted positions; the backward pass
runs the adjoint recurrence over the same levels in reverse,

    dC_e = scale * M_e q_n dy_n^T + sum_{j: e -> e_out} T_j dC_{e_out}        (n = dst(e)),

so memory is one state per edge and no autograd graph grows with the number of levels. Those two
recurrences are the only sequential work; they come from a `Scanner` (the PyTorch loop over levels here,
or the Triton kernels of mdlrnn.kernels), and everything around them is batched tensor algebra shared by
both.
"""

from __future__ import annotations

import torch

from .._checks import first_order_only


class TorchScanner:
    """The two recurrences as one batched step per level (launch-bound on GPUs: a few ops per level)."""

    @staticmethod
    def states(k_src, v_src, transition, graph):
        """C at every sorted position: (E, H, Dk, Dv); k_src already carries the source gate."""
        states = k_src.new_empty(*k_src.shape, v_src.shape[-1])
        t_fwd = transition.index_select(0, graph.line_by_out)
        for start, stop, lo, hi in _levels(graph, graph.line_out_bounds):
            level = states[start:stop]
            torch.mul(k_src[start:stop, ..., None], v_src[start:stop, ..., None, :], out=level)
            if hi > lo:
                carried = states.index_select(0, graph.fwd_in[lo:hi]).mul_(t_fwd[lo:hi, :, None, None])
                level.index_add_(0, graph.fwd_out[lo:hi] - start, carried)
        return states

    @staticmethod
    def adjoint(adjoint, transition, states, graph):
        """Completes `adjoint` (the local terms M_e q_n g_n^T, updated in place) with the carried terms;
        returns it and dT in the order of graph.line_by_in."""
        t_bwd = transition.index_select(0, graph.line_by_in)
        d_t = torch.empty_like(t_bwd)
        for start, stop, lo, hi in reversed(list(_levels(graph, graph.line_in_bounds))):
            if hi > lo:
                ahead = adjoint.index_select(0, graph.bwd_out[lo:hi])
                d_t[lo:hi] = (ahead * states.index_select(0, graph.bwd_in[lo:hi])).sum((-1, -2))
                adjoint.index_add_(0, graph.bwd_in[lo:hi], ahead.mul_(t_bwd[lo:hi, :, None, None]))
        return adjoint, d_t


def _levels(graph, bounds):
    """(edge start, edge stop, line start, line stop) of every level, lines grouped by `bounds`."""
    edges = graph.edge_bounds
    for level in range(len(edges) - 1):
        yield edges[level], edges[level + 1], bounds[level], bounds[level + 1]


def _unsort(sorted_values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(sorted_values)
    out[order] = sorted_values
    return out


class DagScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, source, transition, mark, direct, graph, scale, scanner):
        s_sorted, m_sorted = source.index_select(0, graph.edge_order), mark.index_select(0, graph.edge_order)
        k_src, v_src = k.index_select(0, graph.sorted_src), v.index_select(0, graph.sorted_src)
        states = scanner.states(s_sorted[..., None] * k_src, v_src, transition, graph)
        # products with (Dk, Dv) states as broadcast multiply-sums: faster than batches of tiny matmuls
        read = (q.index_select(0, graph.sorted_dst)[..., :, None] * states).sum(-2)  # q_n^T C_e: (E, H, Dv)
        y = torch.zeros_like(v).index_add_(0, graph.sorted_dst, m_sorted[..., None] * read)
        if direct is not None:
            y = y + direct[..., None] * (q * k).sum(-1, keepdim=True) * v
        ctx.save_for_backward(q, k, v, source, transition, mark, direct, states, read)
        ctx.graph, ctx.scale, ctx.scanner = graph, scale, scanner
        return scale * y

    @staticmethod
    def backward(ctx, dy):
        first_order_only("dag_scan")
        q, k, v, source, transition, mark, direct, states, read = ctx.saved_tensors
        graph, g = ctx.graph, ctx.scale * dy
        s_sorted, m_sorted = source.index_select(0, graph.edge_order), mark.index_select(0, graph.edge_order)
        q_dst, g_dst = q.index_select(0, graph.sorted_dst), g.index_select(0, graph.sorted_dst)
        local = m_sorted[..., None, None] * q_dst[..., :, None] * g_dst[..., None, :]
        adjoint, d_t = ctx.scanner.adjoint(local, transition, states, graph)

        u = graph.sorted_src
        k_src, v_src = k.index_select(0, u), v.index_select(0, u)
        adj_v = (adjoint @ v_src[..., None]).squeeze(-1)  # dC_e v_u: (E, H, Dk)
        d_s = (adj_v * k_src).sum(-1)
        d_k = torch.zeros_like(k).index_add_(0, u, s_sorted[..., None] * adj_v)
        adj_k = (k_src[..., None, :] @ adjoint).squeeze(-2)  # k_u^T dC_e: (E, H, Dv)
        d_v = torch.zeros_like(v).index_add_(0, u, s_sorted[..., None] * adj_k)
        d_m = (read * g_dst).sum(-1)
        d_q = torch.zeros_like(q).index_add_(0, graph.sorted_dst, m_sorted[..., None] * (states @ g_dst[..., None]).squeeze(-1))

        d_direct = None
        if direct is not None:
            qk, vg = (q * k).sum(-1), (v * g).sum(-1)
            d_direct = qk * vg
            d_q = d_q + (direct * vg)[..., None] * k
            d_k = d_k + (direct * vg)[..., None] * q
            d_v = d_v + (direct * qk)[..., None] * g

        d_s, d_m, d_t = _unsort(d_s, graph.edge_order), _unsort(d_m, graph.edge_order), _unsort(d_t, graph.line_by_in)
        return d_q, d_k, d_v, d_s, d_t, d_m, d_direct, None, None, None


def dag_scan_torch(q, k, v, source, transition, mark, direct, graph, scale: float) -> torch.Tensor:
    return DagScan.apply(q, k, v, source, transition, mark, direct, graph, scale, TorchScanner)
