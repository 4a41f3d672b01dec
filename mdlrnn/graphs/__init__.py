"""Graphs: DAGs from (PyG) graphs, the PLSTMConv layer and PLSTMGraphNet."""

from .conv import GraphDAGs, PLSTMConv, build_dags
from .dag import ORDERS, node_rank, to_dag
from .models import BaselineGNN, PLSTMGraphNet, degree_encoding

__all__ = ["ORDERS", "BaselineGNN", "GraphDAGs", "PLSTMConv", "PLSTMGraphNet", "build_dags", "degree_encoding", "node_rank", "to_dag"]
