"""mdlrnn: multi-dimensional linear RNNs (pLSTM, LightNet) on one scan core for grids and DAGs."""

from . import ops
from .ops import DAG, dag_scan, grid_scan, lightnet_scan

__version__ = "0.1.0"
__all__ = ["DAG", "dag_scan", "grid_scan", "lightnet_scan", "ops"]
