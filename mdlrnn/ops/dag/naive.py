"""The step-by-step DAG recurrence: the specification every fast path is tested against."""

from __future__ import annotations

import torch


def dag_scan_reference(q, k, v, source, transition, mark, direct, graph, scale: float) -> torch.Tensor:
    """Visit edges by level (every predecessor of an edge is on a lower level), then read out each node.

    C_e = sum_{j: e_in -> e} T_j C_{e_in} + S_e k_u v_u^T          (u = src(e))
    y_n = scale * (sum_{e: dst(e) = n} M_e q_n^T C_e + D_n (q_n . k_n) v_n)
    """
    src, dst = graph.edge_index.tolist()
    entering = [[] for _ in range(graph.num_edges)]  # line edges j ending in each edge
    for j, e_out in enumerate(graph.line_edges[1].tolist()):
        entering[e_out].append(j)
    e_in = graph.line_edges[0].tolist()
    arriving = [[] for _ in range(graph.num_nodes)]  # edges ending in each node
    for e, n in enumerate(dst):
        arriving[n].append(e)

    states = [None] * graph.num_edges
    for e in graph.edge_order.tolist():
        u = src[e]
        state = source[e, :, None, None] * k[u][:, :, None] * v[u][:, None, :]
        for j in entering[e]:
            state = state + transition[j, :, None, None] * states[e_in[j]]
        states[e] = state

    outputs = []
    for n in range(graph.num_nodes):
        y = q.new_zeros(q.shape[1], v.shape[-1])
        for e in arriving[n]:
            y = y + mark[e, :, None] * (q[n][:, None, :] @ states[e]).squeeze(-2)
        if direct is not None:
            y = y + direct[n, :, None] * (q[n] * k[n]).sum(-1, keepdim=True) * v[n]
        outputs.append(scale * y)
    if not outputs:
        return v.new_zeros(0, q.shape[1], v.shape[-1])
    return torch.stack(outputs)
