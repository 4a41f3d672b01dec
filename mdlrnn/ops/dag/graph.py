"""DAG: a directed acyclic graph with its line graph and the level structure the parallel scan needs."""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch import Tensor


def _levels(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> np.ndarray:
    """Longest-path depth of every node by Kahn's algorithm, one vectorised step per level (work in
    proportion to the edges, whatever the depth); raises ValueError naming a node on a cycle."""
    remaining = np.bincount(dst, minlength=num_nodes)
    by_source, out_start, out_degree = _adjacency(src, num_nodes)
    depth = np.full(num_nodes, -1, dtype=np.int64)
    frontier = np.flatnonzero(remaining == 0)
    level = 0
    while frontier.size:
        depth[frontier] = level
        targets = dst[by_source[_ranges(out_start[frontier], out_degree[frontier])]]
        if targets.size * 8 >= num_nodes:  # a wide level: dense counts beat sorting
            arrivals = np.bincount(targets, minlength=num_nodes)
            remaining -= arrivals
            frontier = np.flatnonzero((arrivals > 0) & (remaining == 0))
        else:
            targets, arrivals = np.unique(targets, return_counts=True)
            remaining[targets] -= arrivals
            frontier = targets[remaining[targets] == 0]
        level += 1
    if (depth < 0).any():
        raise ValueError(f"DAG.from_edge_index: `edge_index` has a cycle through node {_node_on_cycle(src, dst, depth < 0)}")
    return depth


def _adjacency(src: np.ndarray, num_nodes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges grouped by source: their ids, where each node's group starts, and its size."""
    out_degree = np.bincount(src, minlength=num_nodes)
    return np.argsort(src, kind="stable"), np.cumsum(out_degree) - out_degree, out_degree


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + length) for each pair, without a Python loop."""
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + offsets


def _node_on_cycle(src: np.ndarray, dst: np.ndarray, unvisited: np.ndarray) -> int:
    """Every node Kahn's algorithm left has a predecessor it also left: walking back must repeat a node."""
    inside = unvisited[src] & unvisited[dst]
    predecessor = np.full(unvisited.shape, -1, dtype=np.int64)
    predecessor[dst[inside]] = src[inside]
    node, seen = int(np.flatnonzero(unvisited)[0]), set()
    while node not in seen:
        seen.add(node)
        node = int(predecessor[node])
    return node


def _group(keys: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices sorted by key (stable), and (num_keys + 1,) offsets of each key's run."""
    offsets = np.zeros(num_keys + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=num_keys), out=offsets[1:])
    return np.argsort(keys, kind="stable"), offsets


def _line_edges(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> np.ndarray:
    """All pairs (e_in, e_out) with dst(e_in) == src(e_out), grouped by e_in."""
    by_source, out_start, out_degree = _adjacency(src, num_nodes)
    followers = out_degree[dst]
    e_in = np.repeat(np.arange(src.size), followers)
    e_out = by_source[_ranges(out_start[dst], followers)]
    return np.stack([e_in, e_out])


class DAG:
    """A DAG on `num_nodes` nodes, ready for `dag_scan`.

    Attributes:
        edge_index: (2, E) source and target of each edge.
        line_edges: (2, P) every pair (e_in, e_out) of consecutive edges, dst(e_in) == src(e_out).
        node_level: (Nn,) longest-path depth of each node.
        edge_level: (E,) depth of each edge's source; every predecessor of an edge is on a lower level.

    The schedule of the parallel scans, in the frame of level-sorted edges ("positions"):
        edge_order, edge_bounds: edges sorted by level; level l is edge_order[edge_bounds[l]:edge_bounds[l+1]].
        level_ptr: edge_bounds as a tensor (for kernels).
        sorted_src, sorted_dst: (E,) endpoints of the level-sorted edges.
        line_by_out, line_out_ptr: line edges sorted by the position of e_out, and (E + 1,) offsets: the line
            edges entering position p are line_by_out[line_out_ptr[p]:line_out_ptr[p + 1]] (forward scan).
        fwd_in, fwd_out: (P,) positions of e_in and e_out of the line edges in that order.
        line_by_in, line_in_ptr, bwd_in, bwd_out: the same grouped by e_in (the backward scan).
        line_out_bounds, line_in_bounds: where each level starts in those orders (Python ints).

    Everything is computed on the host (numpy: small integer work, cheaper there than as GPU launches or
    multi-threaded CPU ops) at construction and moved to a device in one copy. A batch of
    graphs (PyG-style, disjoint components) is one DAG.
    """

    def __init__(self, edge_index: np.ndarray, num_nodes: int, line_edges: np.ndarray, node_level: np.ndarray):
        """From int64 arrays on the host (build with from_edge_index)."""
        src, dst = edge_index
        num_edges = src.size
        edge_level = node_level[src]
        num_levels = int(edge_level.max()) + 1 if num_edges else 0
        edge_order, level_ptr = _group(edge_level, num_levels)
        position = np.empty_like(edge_order)
        position[edge_order] = np.arange(num_edges)
        pos_in, pos_out = position[line_edges]
        line_by_out, line_out_ptr = _group(pos_out, num_edges)
        line_by_in, line_in_ptr = _group(pos_in, num_edges)
        arrays = dict(
            edge_index=edge_index, line_edges=line_edges, node_level=node_level, edge_level=edge_level,
            edge_order=edge_order, level_ptr=level_ptr, sorted_src=src[edge_order], sorted_dst=dst[edge_order],
            line_by_out=line_by_out, line_out_ptr=line_out_ptr, fwd_in=pos_in[line_by_out], fwd_out=pos_out[line_by_out],
            line_by_in=line_by_in, line_in_ptr=line_in_ptr, bwd_in=pos_in[line_by_in], bwd_out=pos_out[line_by_in],
        )
        for name, array in arrays.items():
            setattr(self, name, torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)))
        self.num_nodes = num_nodes
        self.edge_bounds = tuple(level_ptr.tolist())
        self.line_out_bounds = tuple(line_out_ptr[level_ptr].tolist())
        self.line_in_bounds = tuple(line_in_ptr[level_ptr].tolist())
        self._derived = {}

    def derived(self, key, build):
        """A structure computed from this DAG once and kept with it (backends cache their schedules here)."""
        if key not in self._derived:
            self._derived[key] = build(self)
        return self._derived[key]

    @classmethod
    def from_edge_index(cls, edge_index: Tensor, num_nodes: int) -> "DAG":
        """Build from a (2, E) integer tensor of directed edges; raises ValueError on cycles, self-loops
        and out-of-range indices. The DAG lives on edge_index's device."""
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
        edges = edge_index.detach().to("cpu", torch.long).numpy()
        if edges.size:
            low, high = int(edges.min()), int(edges.max())
            if low < 0 or high >= num_nodes:
                bad = low if low < 0 else high
                raise ValueError(f"{where}: `edge_index` holds node {bad}, outside [0, num_nodes={num_nodes})")
            loops = np.flatnonzero(edges[0] == edges[1])
            if loops.size:
                raise ValueError(f"{where}: `edge_index` has a self-loop at node {int(edges[0, loops[0]])}")
        src, dst = edges
        graph = cls(edges, num_nodes, _line_edges(src, dst, num_nodes), _levels(src, dst, num_nodes))
        return graph.to(edge_index.device)

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
        """A copy on `device` (self when already there); all index tensors travel in one transfer."""
        device = torch.device(device)
        if device == self.device:
            return self
        names = [name for name, value in vars(self).items() if isinstance(value, Tensor)]
        tensors = [getattr(self, name).reshape(-1) for name in names]
        # each tensor starts on a 16-byte boundary of the packed copy (what kernels assume of pointers)
        padded = [torch.cat([x, x.new_zeros(-x.numel() % 2)]) for x in tensors]
        packed = torch.cat(padded).to(device)
        moved = object.__new__(DAG)
        moved.__dict__.update(vars(self))
        for name, x, part in zip(names, tensors, packed.split([x.numel() for x in padded])):
            setattr(moved, name, part[: x.numel()].view(getattr(self, name).shape))
        moved._derived = {}
        return moved

    def reverse(self) -> "DAG":
        """The DAG with every edge reversed (edge e of the result is edge e of self, flipped); its line graph
        is this one's with every pair reversed."""
        edges, lines = self.edge_index.cpu().numpy()[::-1], self.line_edges.cpu().numpy()[::-1]
        return DAG(edges, self.num_nodes, lines, _levels(*edges, self.num_nodes)).to(self.device)

    def __repr__(self) -> str:
        return (
            f"DAG(num_nodes={self.num_nodes}, num_edges={self.num_edges}, "
            f"num_line_edges={self.num_line_edges}, num_levels={self.num_levels})"
        )


