"""PLSTMConv: pLSTM on the DAG of a graph, a PyTorch Geometric-style layer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import DAG, dag_scan
from .dag import orient_on_host

__all__ = ["GraphDAGs", "PLSTMConv", "build_dags"]

DIRECTIONS = ("forward", "reverse", "both")


class GraphDAGs:
    """A graph's forward DAG, its reverse, and the edge_index column of every DAG edge (built once per batch,
    shared by all layers)."""

    def __init__(self, forward: DAG, reverse: DAG, edge_ids: Tensor):
        self.forward, self.reverse, self.edge_ids = forward, reverse, edge_ids

    def get(self, direction: str) -> DAG:
        return self.forward if direction == "forward" else self.reverse


def build_dags(edge_index: Tensor, num_nodes: int, order="index", batch: Tensor | None = None) -> GraphDAGs:
    """Both DAGs of a graph (or batch), built on the host and moved to edge_index's device."""
    forward, edge_ids = orient_on_host(edge_index, num_nodes, order=order, batch=batch)
    device = edge_index.device
    return GraphDAGs(forward.to(device), forward.reverse().to(device), edge_ids.to(device))


def _multitree_mask(dag: DAG) -> Tensor:
    """D-mode's pruning: of the line edges entering each edge, only the one from its first incoming edge."""
    e_in, e_out = dag.line_edges
    first = torch.full((dag.num_edges,), dag.num_edges, dtype=torch.long, device=dag.device)
    first = first.scatter_reduce(0, e_out, e_in, reduce="amin")
    return (e_in == first.index_select(0, e_out)).to(torch.float32)


class PLSTMConv(nn.Module):
    r"""pLSTM on the DAG of a graph: undirected edges oriented along a node order, states on the edges,
    passed along the line graph (pairs of consecutive edges), one :func:`mdlrnn.ops.dag_scan` per direction
    over the whole batch.

    .. math::
        C_e = \sum_{j: e' \to e} T_j C_{e'} + S_e k_u v_u^\top, \qquad
        y_n = W_o \operatorname{RMSNorm}\Big(\sum_{\text{dir}} \sum_{e: \mathrm{dst}(e) = n} M_e q_n^\top C_e
              + D (q_n \cdot k_n) v_n\Big) / \sqrt{d}

    with S_e = sigmoid from the source node u = src(e), M_e = sigmoid from the target node, and the
    transition of line edge j = (e' = u -> w, e = w -> x) from the node w it passes (edge features of e
    are added to all three when edge_dim is given). Stable by construction:

    * ``"P"``: T_j = t_j / (0.5 + sum_{j' -> e} |t_{j'}|) over the line edges entering the same edge e, so
      their absolute sum stays below one;
    * ``"D"``: the line graph pruned to a forest (each edge keeps only the line edge from its first incoming
      edge, so every source reaches a target by one path at most), T_j = tanh(t_j).

    Args:
        in_channels, out_channels: node feature sizes.
        heads: number of heads; head_dim = out_channels // heads.
        mode: "P" or "D".
        edge_dim: size of edge features, or None.
        direction: "forward", "reverse" or "both" (one scan each, summed).
        order: node order that orients the edges ("index", "bfs", "degree" or a tensor of keys).
        head_norm: the per-head RMSNorm of the scan output (False keeps its magnitude, which counts
            how much reaches a node, as a sum aggregation does).
    """

    def __init__(self, in_channels: int, out_channels: int, heads: int = 4, mode: str = "P", edge_dim: int | None = None,
                 direction: str = "both", order="index", head_norm: bool = True, backend: str = "auto"):
        super().__init__()
        if mode not in ("P", "D"):
            raise ValueError(f"PLSTMConv: `mode` must be 'P' or 'D', got {mode!r}")
        if direction not in DIRECTIONS:
            raise ValueError(f"PLSTMConv: `direction` must be one of {DIRECTIONS}, got {direction!r}")
        if out_channels % heads:
            raise ValueError(f"PLSTMConv: `out_channels` ({out_channels}) must be divisible by `heads` ({heads})")
        self.in_channels, self.out_channels, self.heads, self.mode = in_channels, out_channels, heads, mode
        self.edge_dim, self.direction, self.order, self.backend = edge_dim, direction, order, backend
        self.head_dim = out_channels // heads
        self.directions = ("forward", "reverse") if direction == "both" else (direction,)
        gates = 3 * heads * len(self.directions)  # source, mark, transition per head and direction
        self.qkv = nn.Linear(in_channels, 3 * out_channels, bias=False)
        self.node_gate = nn.Linear(in_channels, gates)
        self.edge_gate = nn.Linear(edge_dim, gates, bias=False) if edge_dim else None
        self.direct = nn.Parameter(torch.empty(heads))
        self.norm = nn.RMSNorm(self.head_dim, eps=1e-6) if head_norm else nn.Identity()
        self.out = nn.Linear(out_channels, out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.qkv, self.node_gate, self.out, self.edge_gate):
            if linear is not None:
                nn.init.trunc_normal_(linear.weight, std=0.02)
        with torch.no_grad():  # sources and marks start small (sigmoid(-4)), transitions near one
            bias = torch.tensor([-4.0, -4.0, 1.0]).repeat(len(self.directions) * self.heads)
            self.node_gate.bias.copy_(bias)
        nn.init.zeros_(self.out.bias)
        nn.init.constant_(self.direct, -6.0)
        if isinstance(self.norm, nn.RMSNorm):
            self.norm.reset_parameters()

    def scan_gates(self, x: Tensor, dag: DAG, edge_ids: Tensor, edge_attr: Tensor | None, index: int):
        """Source (E, H), transition (P, H) and mark (E, H) for direction number `index` on `dag`."""
        z = self.node_gate(x).view(x.shape[0], len(self.directions), self.heads, 3)[:, index]
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        src, dst = dag.edge_index
        # index_select, not advanced indexing: its backward is an index_add, not a sort-based index_put
        at_src, at_dst = z.index_select(0, src), z.index_select(0, dst)
        if self.edge_gate is not None:  # the edge features' share of each gate
            e = self.edge_gate(edge_attr.index_select(0, edge_ids))
            e = e.view(-1, len(self.directions), self.heads, 3)[:, index].to(z.dtype)
            at_src, at_dst = at_src + e, at_dst + e
        source, mark = torch.sigmoid(at_src[..., 0]), torch.sigmoid(at_dst[..., 1])
        e_out = dag.line_edges[1]
        t = at_src[..., 2].index_select(0, e_out)  # at the node the line edge passes: src(e_out)
        if self.mode == "P":
            total = torch.zeros_like(source).index_add_(0, e_out, t.abs())
            transition = t / (0.5 + total.index_select(0, e_out))
        else:
            transition = torch.tanh(t) * dag.derived("multitree", _multitree_mask).unsqueeze(-1)
        return source, transition, mark

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None, batch: Tensor | None = None,
                dags: GraphDAGs | None = None) -> Tensor:
        """x: (N, in_channels); edge_index: (2, E); edge_attr: (E, edge_dim) or None; batch: (N,) or None;
        dags: the DAGs of this edge_index (build_dags), to share them between layers."""
        if x.dim() != 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"PLSTMConv: `x` must have shape (N, {self.in_channels}), got {tuple(x.shape)}")
        if (self.edge_dim is None) != (edge_attr is None):
            raise ValueError(f"PLSTMConv: built with edge_dim={self.edge_dim}, but edge_attr is "
                             f"{'missing' if edge_attr is None else tuple(edge_attr.shape)}")
        if dags is None:
            dags = build_dags(edge_index, x.shape[0], self.order, batch)
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.heads, self.head_dim).unbind(1)
        y = 0
        for index, direction in enumerate(self.directions):
            dag = dags.get(direction)
            gates = self.scan_gates(x, dag, dags.edge_ids, edge_attr, index)
            y = y + dag_scan(q, k, v, *gates, None, dag, backend=self.backend)
        y = y + torch.sigmoid(self.direct)[:, None] * (q * k).sum(-1, keepdim=True) * v * self.head_dim**-0.5
        return self.out(self.norm(y.to(self.out.weight.dtype)).flatten(1))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.in_channels}, {self.out_channels}, heads={self.heads}, mode={self.mode!r}, "
                f"direction={self.direction!r}, edge_dim={self.edge_dim}, head_norm={isinstance(self.norm, nn.RMSNorm)})")
