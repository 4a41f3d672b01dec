"""The scan core: one multi-dimensional linear recurrence for grids, DAGs and LightNet."""

from .dag import DAG, dag_scan
from .grid import grid_scan
from .lightnet import lightnet_scan

__all__ = ["DAG", "dag_scan", "grid_scan", "lightnet_scan"]
