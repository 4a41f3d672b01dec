"""Graph data helpers: float features for PyG data, and the folds of the pLSTM paper's protocol."""

from __future__ import annotations

import copy

import torch

__all__ = ["folds", "prepare_graph", "split_validation"]


def prepare_graph(graph):
    """A copy with float node features (ones where there are none) and float (E, F) edge features."""
    graph = copy.copy(graph)
    graph.x = graph.x.float() if graph.x is not None else torch.ones(graph.num_nodes, 1)
    if graph.edge_attr is not None:
        features = graph.edge_attr.shape[-1] if graph.edge_attr.dim() > 1 else 1
        graph.edge_attr = graph.edge_attr.float().reshape(graph.edge_index.shape[1], features)
    return graph


def folds(labels: torch.Tensor, count: int, seed: int, stratified: bool) -> list[torch.Tensor]:
    """Test indices of each fold; stratified folds deal every class round-robin after a seeded shuffle."""
    generator = torch.Generator().manual_seed(seed)
    if not stratified:
        order = torch.randperm(len(labels), generator=generator)
        return [order[i::count] for i in range(count)]
    parts = [[] for _ in range(count)]
    offset = 0
    for label in torch.unique(labels):
        members = (labels == label).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        for j, index in enumerate(members.tolist()):
            parts[(offset + j) % count].append(index)
        offset += len(members)
    return [torch.tensor(sorted(p), dtype=torch.long) for p in parts]


def split_validation(train: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int, stratified: bool):
    """Hold out `fraction` of a training fold (per class when stratified)."""
    generator = torch.Generator().manual_seed(seed)
    held = []
    groups = [train[labels[train] == c] for c in torch.unique(labels[train])] if stratified else [train]
    for group in groups:
        group = group[torch.randperm(len(group), generator=generator)]
        held.append(group[: max(1, round(fraction * len(group)))])
    held = torch.cat(held)
    keep = ~torch.isin(train, held)
    return train[keep], held
