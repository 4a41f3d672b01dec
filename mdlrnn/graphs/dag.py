"""DAGs from graphs: orient every edge along a node order, vectorised over a whole PyG batch."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..ops import DAG

__all__ = ["ORDERS", "node_rank", "to_dag"]

ORDERS = ("index", "bfs", "degree")


def _graph_starts(batch: Tensor | None, num_nodes: int) -> Tensor:
    """First node of every node's graph (0 for all when there is no batch vector)."""
    if batch is None or batch.numel() == 0:
        return torch.zeros(num_nodes, dtype=torch.long, device=batch.device if batch is not None else None)
    counts = torch.bincount(batch)
    starts = torch.cumsum(counts, 0) - counts
    return starts[batch]


def _bfs_distance(edge_index: Tensor, num_nodes: int, roots: Tensor) -> Tensor:
    """Hop distance from the nearest root over the undirected graph, one tensor step per BFS level;
    nodes no root reaches get num_nodes (after every reached node)."""
    src, dst = torch.cat([edge_index, edge_index.flip(0)], 1)
    distance = torch.full((num_nodes,), num_nodes, dtype=torch.long, device=edge_index.device)
    distance[roots] = 0
    frontier = torch.zeros(num_nodes, dtype=torch.bool, device=edge_index.device)
    frontier[roots] = True
    level = 0
    while frontier.any():
        level += 1
        reached = torch.zeros_like(frontier)
        reached[dst[frontier[src]]] = True
        frontier = reached & (distance == num_nodes)
        distance[frontier] = level
    return distance


def node_rank(edge_index: Tensor, num_nodes: int, order="index", batch: Tensor | None = None,
              root: Tensor | None = None) -> Tensor:
    """Position of every node in the order that orients the edges (edges go from lower to higher rank).

    order: "index" (node ids, as in the pLSTM paper), "bfs" (hop distance from each graph's root: `root`,
    one node per graph, or the graph's first node), "degree" (higher degree first), or a tensor of
    num_nodes keys (lower first). Ties are broken by node index.
    """
    index = torch.arange(num_nodes, device=edge_index.device)
    if isinstance(order, Tensor):
        if order.shape != (num_nodes,):
            raise ValueError(f"to_dag: an `order` tensor must have shape (num_nodes,) = ({num_nodes},), got {tuple(order.shape)}")
        key = order.to(edge_index.device)
    elif order == "index":
        return index
    elif order == "degree":
        degree = torch.bincount(edge_index.reshape(-1), minlength=num_nodes)
        key = -degree
    elif order == "bfs":
        if root is None:
            starts = _graph_starts(batch, num_nodes)
            root = torch.unique(starts) if num_nodes else starts
        key = _bfs_distance(edge_index, num_nodes, root.to(edge_index.device))
    else:
        raise ValueError(f"to_dag: `order` must be one of {ORDERS} or a tensor of keys, got {order!r}")
    # ranks are only ever compared within a graph, so one global sort serves a whole batch
    rank = torch.empty_like(index)
    rank[torch.argsort(key, stable=True)] = index  # stable: ties keep index order
    return rank


def to_dag(edge_index: Tensor, num_nodes: int, order="index", directed: bool = False, on_cycle: str = "raise",
           batch: Tensor | None = None, root: Tensor | None = None) -> tuple[DAG, Tensor]:
    """Orient a graph (or a PyG batch of graphs) into a DAG.

    Undirected graphs (PyG's convention: every edge given in both directions) keep each edge once, from
    the lower to the higher rank of `node_rank`; an edge given in one direction only is flipped where
    needed. Directed graphs keep their edges as given; a cycle raises a ValueError naming a node on it, or,
    with on_cycle="break", the edges against the node order are dropped. Self-loops are dropped.

    Returns the DAG and, for each of its edges, the column of edge_index it came from (to gather edge
    features), both on edge_index's device. The reverse DAG is `dag.reverse()` with the same edge numbering.
    """
    dag, ids = orient_on_host(edge_index, num_nodes, order, directed, on_cycle, batch, root)
    return dag.to(edge_index.device), ids.to(edge_index.device)


def orient_on_host(edge_index: Tensor, num_nodes: int, order="index", directed: bool = False, on_cycle: str = "raise",
                   batch: Tensor | None = None, root: Tensor | None = None) -> tuple[DAG, Tensor]:
    """to_dag computed on the host (as DAG.from_edge_index is), returned there: move with DAG.to."""
    if on_cycle not in ("raise", "break"):
        raise ValueError(f"to_dag: `on_cycle` must be 'raise' or 'break', got {on_cycle!r}")
    if not isinstance(edge_index, Tensor) or edge_index.dim() != 2 or edge_index.shape[0] != 2:
        shape = tuple(edge_index.shape) if isinstance(edge_index, Tensor) else type(edge_index).__name__
        raise ValueError(f"to_dag: `edge_index` must be a (2, E) tensor, got {shape}")
    edge_index = edge_index.detach().to("cpu", torch.long)
    batch, root = (x.cpu() if isinstance(x, Tensor) else x for x in (batch, root))
    order = order.cpu() if isinstance(order, Tensor) else order
    edges = edge_index.numpy()
    if edges.size and (edges.min() < 0 or edges.max() >= num_nodes):
        raise ValueError(f"to_dag: `edge_index` holds nodes outside [0, num_nodes={num_nodes})")
    src, dst = edges
    if directed:
        not_loop = np.flatnonzero(src != dst)
        try:
            return _dag(edges, not_loop, num_nodes)
        except ValueError as error:
            if on_cycle == "raise" or "cycle" not in str(error):
                raise
        rank = node_rank(edge_index, num_nodes, order, batch, root).numpy()
        return _dag(edges, np.flatnonzero(rank[src] < rank[dst]), num_nodes)

    rank = node_rank(edge_index, num_nodes, order, batch, root).numpy()
    forward = rank[src] < rank[dst]
    backward = rank[src] > rank[dst]
    # a backward copy is kept (flipped) only where its mirror is missing among the forward edges
    forward_keys = src[forward] * num_nodes + dst[forward]
    mirror_keys = dst[backward] * num_nodes + src[backward]
    lonely = np.zeros_like(backward)
    lonely[backward] = ~_contains(np.sort(forward_keys), mirror_keys)
    return _dag(np.where(forward, edges, edges[::-1]), np.flatnonzero(forward | lonely), num_nodes)


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """keys found in sorted_keys (a binary search: np.isin is many times slower at these sizes)."""
    if not sorted_keys.size:
        return np.zeros(keys.shape, dtype=bool)
    return sorted_keys[np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)] == keys


def _dag(edges: np.ndarray, kept: np.ndarray, num_nodes: int) -> tuple[DAG, Tensor]:
    """The DAG of the columns `kept` of edges, and those column numbers."""
    return DAG.from_edge_index(torch.from_numpy(edges[:, kept]), num_nodes), torch.from_numpy(kept)
