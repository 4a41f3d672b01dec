"""PLSTMGraphNet: a graph classifier/regressor of PLSTMConv layers."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .conv import PLSTMConv, build_dags

__all__ = ["BaselineGNN", "PLSTMGraphNet", "degree_encoding"]


def degree_encoding(edge_index: Tensor, num_nodes: int, channels: int) -> Tensor:
    """Sinusoidal encoding (N, channels) of each node's degree, as the transformer's position encoding."""
    degree = torch.bincount(edge_index[1], minlength=num_nodes).float()
    frequency = torch.exp(-math.log(10000.0) * torch.arange(0, channels, 2, device=edge_index.device) / channels)
    angles = degree[:, None] * frequency
    return torch.cat([torch.sin(angles), torch.cos(angles)], -1)[:, :channels]


class PLSTMGraphNet(nn.Module):
    """Node and edge encoders (with a sinusoidal degree encoding), `num_layers` PLSTMConv blocks
    (x + conv(norm x), then x + MLP(norm x)) alternating P/D modes and forward/reverse DAGs (or scanning
    both directions in every layer: directions="both"), an RMSNorm of every node's features when final_norm,
    mean or sum pooling over each graph, and an MLP head.

    forward(x, edge_index, edge_attr=None, batch=None) -> (num_graphs, out_channels).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 96, num_layers: int = 2,
                 heads: int = 4, edge_dim: int | None = None, pooling: str = "mean", dropout: float = 0.0,
                 order="index", directions: str = "alternate", head_norm: bool = True, final_norm: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if pooling not in ("mean", "sum"):
            raise ValueError(f"PLSTMGraphNet: `pooling` must be 'mean' or 'sum', got {pooling!r}")
        if directions not in ("alternate", "both"):
            raise ValueError(f"PLSTMGraphNet: `directions` must be 'alternate' or 'both', got {directions!r}")
        direction = (lambda i: ("forward", "reverse")[i % 2]) if directions == "alternate" else (lambda i: "both")
        self.hidden_channels, self.pooling, self.order = hidden_channels, pooling, order
        self.node_encoder = nn.Linear(in_channels, hidden_channels)
        self.edge_encoder = nn.Linear(edge_dim, hidden_channels) if edge_dim else None
        self.convs = nn.ModuleList(
            PLSTMConv(hidden_channels, hidden_channels, heads, mode="PD"[i % 2], direction=direction(i),
                      edge_dim=hidden_channels if edge_dim else None, head_norm=head_norm, backend=backend)
            for i in range(num_layers)
        )
        self.norms = nn.ModuleList(nn.RMSNorm(hidden_channels, eps=1e-6) for _ in range(2 * num_layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden_channels, 2 * hidden_channels), nn.GELU(), nn.Dropout(dropout),
                          nn.Linear(2 * hidden_channels, hidden_channels))
            for _ in range(num_layers)
        )
        self.final_norm = nn.RMSNorm(hidden_channels, eps=1e-6) if final_norm else nn.Identity()
        self.head = nn.Sequential(nn.Linear(hidden_channels, hidden_channels), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(hidden_channels, out_channels))

    def forward(self, x: Tensor, edge_index: Tensor, edge_attr: Tensor | None = None, batch: Tensor | None = None) -> Tensor:
        num_nodes = x.shape[0]
        if batch is None:
            batch = torch.zeros(num_nodes, dtype=torch.long, device=x.device)
        dags = build_dags(edge_index, num_nodes, self.order, batch)
        dtype = self.node_encoder.weight.dtype
        h = self.node_encoder(x.to(dtype)) + degree_encoding(edge_index, num_nodes, self.hidden_channels).to(dtype)
        e = self.edge_encoder(edge_attr.to(dtype)) if self.edge_encoder is not None and edge_attr is not None else None
        for i, (conv, mlp) in enumerate(zip(self.convs, self.mlps)):
            h = h + conv(self.norms[2 * i](h), edge_index, e, batch, dags=dags)
            h = h + mlp(self.norms[2 * i + 1](h))
        h = self.final_norm(h)
        num_graphs = int(batch.max()) + 1 if num_nodes else 0
        pooled = torch.zeros(num_graphs, h.shape[1], device=h.device, dtype=h.dtype).index_add_(0, batch, h)
        if self.pooling == "mean":
            pooled = pooled / torch.bincount(batch, minlength=num_graphs).clamp(min=1)[:, None]
        return self.head(pooled)


class BaselineGNN(nn.Module):
    """A PyG basic GNN ("gin", "gcn" or "gat"; 4 layers, hidden 128, as the pLSTM paper's baselines), sum
    pooling and an MLP head; forward(x, edge_index, edge_attr=None, batch=None) -> (num_graphs, out)."""

    def __init__(self, kind: str, in_channels: int, out_channels: int, hidden: int = 128, layers: int = 4):
        super().__init__()
        from torch_geometric.nn import GAT, GCN, GIN

        self.gnn = {"gin": GIN, "gcn": GCN, "gat": GAT}[kind](in_channels, hidden, layers)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_channels))

    def forward(self, x, edge_index, edge_attr=None, batch=None):
        from torch_geometric.nn import global_add_pool

        return self.head(global_add_pool(self.gnn(x, edge_index), batch))
