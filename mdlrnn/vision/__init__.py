"""timm models on the scan core (registered with timm when this package is imported)."""

from .lightnet_vit import LightNetVisionTransformer
from .plstm_vit import PLSTMVisionTransformer
from .vit import MDVisionTransformer

__all__ = ["LightNetVisionTransformer", "MDVisionTransformer", "PLSTMVisionTransformer"]
