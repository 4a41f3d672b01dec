"""mdlrnn: multi-dimensional linear RNNs (pLSTM, LightNet) on one scan core for grids and DAGs."""

from importlib.util import find_spec

from . import layers, ops
from .ops import DAG, dag_scan, grid_scan, lightnet_scan

if find_spec("timm") is not None:  # the vision extra: importing registers the models with timm
    from . import vision  # noqa: F401

__version__ = "0.1.0"
__all__ = ["DAG", "dag_scan", "grid_scan", "layers", "lightnet_scan", "ops"]
