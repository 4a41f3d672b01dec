"""DAG: a directed acyclic graph with its line graph and the level structure the parallel scan needs."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def _levels(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Longest-path depth of every node: depth[w] = max over edges u -> w of depth[u] + 1, relaxed once per
    level (a scatter-max over all edges) until nothing changes. Raises ValueError naming a node on a cycle
    when the graph has one (then the relaxation would never settle)."""
    src, dst = edge_index
    depth = torch.zeros(num_nodes, dtype=torch.long)
    for _ in range(num_nodes + 1):
        deeper = depth.scatter_reduce(0, dst, depth[src] + 1, reduce="amax")
        if torch.equal(deeper, depth):
            return depth
        depth = deeper
    return _kahn_levels(edge_index, num_nodes)  # raises, naming a node on the cycle


def _kahn_levels(edge_index: Tensor, num_nodes: int) -> Tensor:
    """Longest-path depth by Kahn's algorithm, one tensor step per level; names a node on a cycle."""
    src, dst = edge_index
    remaining = torch.bincount(dst, minlength=num_nodes)
    order = torch.argsort(src, stable=True)
    out_degree = torch.bincount(src, minlength=num_nodes)
    out_start = torch.cumsum(out_degree, 0) - out_degree
    depth = torch.full((num_nodes,), -1, dtype=torch.long)
    frontier = (remaining == 0).nonzero().squeeze(1)
    level = 0
    while frontier.numel():
        depth[frontier] = level
        edges = order[_ranges(out_start[frontier], out_degree[frontier])]
        targets = dst[edges]
        remaining.index_add_(0, targets, torch.full_like(targets, -1))
        frontier = torch.unique(targets[remaining[targets] == 0])
        level += 1
    if (depth < 0).any():
        raise ValueError(f"DAG.from_edge_index: `edge_index` has a cycle through node {_node_on_cycle(edge_index, depth < 0)}")
    return depth


def _ranges(starts: Tensor, lengths: Tensor) -> Tensor:
    """Concatenation of arange(start, start + length) for each pair, without a Python loop."""
    total = int(lengths.sum())
    offsets = torch.arange(total) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    return torch.repeat_interleave(starts, lengths) + offsets


def _node_on_cycle(edge_index: Tensor, unvisited: Tensor) -> int:
    """Every node Kahn's algorithm left has a predecessor it also left: walking back must repeat a node."""
    src, dst = edge_index
    inside = unvisited[src] & unvisited[dst]
    predecessor = torch.full_like(unvisited, -1, dtype=torch.long)
    predecessor[dst[inside]] = src[inside]
    predecessor = predecessor.tolist()
    node, seen = int(unvisited.nonzero()[0]), set()
    while node not in seen:
        seen.add(node)
        node = predecessor[node]
    return node


class DAG:
    """A DAG on `num_nodes` nodes, ready for `dag_scan`.

    Attributes:
        edge_index: (2, E) source and target of each edge.
        line_edges: (2, P) every pair (e_in, e_out) of consecutive edges, dst(e_in) == src(e_out).
        node_level: (Nn,) longest-path depth of each node.
        edge_level: (E,) depth of each edge's source; every predecessor of an edge is on a lower level.
        edge_order, edge_bounds: edges sorted by level; level l is edge_order[edge_bounds[l]:edge_bounds[l+1]].
        line_by_out, line_out_bounds: line edges grouped by the level of e_out (the forward schedule).
        line_by_in, line_in_bounds: line edges grouped by the level of e_in (the backward schedule).

    A batch of graphs (PyG-style, disjoint components) is one DAG.
    """

    def __init__(self, edge_index: Tensor, num_nodes: int, line_edges: Tensor, node_level: Tensor):
        self.edge_index = edge_index
        self.num_nodes = num_nodes
        self.line_edges = line_edges
        self.node_level = node_level
        self.edge_level = node_level[edge_index[0]]
        num_levels = int(self.edge_level.max()) + 1 if self.num_edges else 0
        self.edge_order, self.edge_bounds = _group(self.edge_level, num_levels)
        self.line_by_out, self.line_out_bounds = _group(self.edge_level[line_edges[1]], num_levels)
        self.line_by_in, self.line_in_bounds = _group(self.edge_level[line_edges[0]], num_levels)
        self._derived = {}

    def derived(self, key, build):
        """A structure computed from this DAG once and kept with it (backends cache their schedules here)."""
        if key not in self._derived:
            self._derived[key] = build(self)
        return self._derived[key]

    @classmethod
    def from_edge_index(cls, edge_index: Tensor, num_nodes: int) -> "DAG":
        """Build from a (2, E) integer tensor of directed edges; raises ValueError on cycles, self-loops
        and out-of-range indices."""
        where = "DAG.from_edge_index"
        if not isinstance(edge_index, Tensor):
            raise TypeError(f"{where}: `edge_index` must be a torch.Tensor, got {type(edge_index).__name__}")
        if edge_index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"{where}: `edge_index` must be an integer tensor, got dtype {edge_index.dtype}")
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"{where}: `edge_index` must have shape (2, E), got {tuple(edge_index.shape)}")
        if isinstance(num_nodes, Tensor) and num_nodes.numel() == 1 and not num_nodes.is_floating_point():
            num_nodes = int(num_nodes)
        if not isinstance(num_nodes, numbers.Integral) or isinstance(num_nodes, bool) or num_nodes < 0:
            raise ValueError(f"{where}: `num_nodes` must be a non-negative int, got {num_nodes!r}")
        num_nodes = int(num_nodes)
        device = edge_index.device
        edges = edge_index.detach().to("cpu", torch.long)
        if edges.numel():
            low, high = int(edges.min()), int(edges.max())
            if low < 0 or high >= num_nodes:
                bad = low if low < 0 else high
                raise ValueError(f"{where}: `edge_index` holds node {bad}, outside [0, num_nodes={num_nodes})")
            loops = (edges[0] == edges[1]).nonzero()
            if loops.numel():
                raise ValueError(f"{where}: `edge_index` has a self-loop at node {int(edges[0, loops[0, 0]])}")
        node_level = _levels(edges, num_nodes)
        line_edges = _line_edges(edges, num_nodes)
        graph = cls(edges, num_nodes, line_edges, node_level)
        return graph.to(device)

    @property
    def num_edges(self) -> int:
        return self.edge_index.shape[1]

    @property
    def num_line_edges(self) -> int:
        return self.line_edges.shape[1]

    @property
    def num_levels(self) -> int:
        return len(self.edge_bounds) - 1

    @property
    def device(self) -> torch.device:
        return self.edge_index.device

    def to(self, device) -> "DAG":
        """A copy on `device` (self when already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = object.__new__(DAG)
        for name, value in vars(self).items():
            setattr(moved, name, value.to(device) if isinstance(value, Tensor) else value)
        moved._derived = {}
        return moved

    def reverse(self) -> "DAG":
        """The DAG with every edge reversed (edge e of the result is edge e of self, flipped); its line graph
        is this one's with every pair reversed."""
        edges, lines = self.edge_index.cpu().flip(0), self.line_edges.cpu().flip(0)
        return DAG(edges, self.num_nodes, lines, _levels(edges, self.num_nodes)).to(self.device)

    def __repr__(self) -> str:
        return (
            f"DAG(num_nodes={self.num_nodes}, num_edges={self.num_edges}, "
            f"num_line_edges={self.num_line_edges}, num_levels={self.num_levels})"
        )


def _group(levels: Tensor, num_levels: int) -> tuple[Tensor, tuple[int, ...]]:
    """Indices sorted by level, and where each level starts."""
    counts = torch.bincount(levels, minlength=num_levels)
    return torch.argsort(levels, stable=True), (0, *torch.cumsum(counts, 0).tolist())


def _line_edges(edge_index: Tensor, num_nodes: int) -> Tensor:
    """All pairs (e_in, e_out) with dst(e_in) == src(e_out), grouped by e_in."""
    src, dst = edge_index
    order = torch.argsort(src, stable=True)
    out_degree = torch.bincount(src, minlength=num_nodes)
    out_start = torch.cumsum(out_degree, 0) - out_degree
    followers = out_degree[dst]
    e_in = torch.repeat_interleave(torch.arange(src.numel()), followers)
    e_out = order[_ranges(out_start[dst], followers)]
    return torch.stack([e_in, e_out])
