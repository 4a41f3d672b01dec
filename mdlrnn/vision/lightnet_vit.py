"""LightNet-ViT: ViT whose token mixers are LightNet attention layers with MD-LRPE, and MD-TPE after the
patch embedding (DESIGN.md 4).

Registered with timm on `import mdlrnn`: lightnet_vit_{tiny,small,base}_patch16_224.
"""

from __future__ import annotations

from timm.models import generate_default_cfgs, register_model

from ..layers import LightNetAttention
from .vit import MDVisionTransformer, build, default_cfg

__all__ = ["LightNetVisionTransformer"]


class LightNetVisionTransformer(MDVisionTransformer):
    """MDVisionTransformer with LightNet attention mixers (mode "global", "causal" or "box")."""

    def __init__(self, embed_dim: int = 192, num_heads: int = 3, mode: str = "global", md_lrpe: bool = True,
                 tpe: bool = True, backend: str = "auto", **kwargs):
        def mixer(index: int, **dd):
            return LightNetAttention(embed_dim, num_heads, mode=mode, md_lrpe=md_lrpe, backend=backend, **dd)

        super().__init__(mixer, embed_dim=embed_dim, num_heads=num_heads, tpe=tpe, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "lightnet_vit_tiny_patch16_224": default_cfg(),
        "lightnet_vit_small_patch16_224": default_cfg(),
        "lightnet_vit_base_patch16_224": default_cfg(),
    }
)


@register_model
def lightnet_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> LightNetVisionTransformer:
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return build(LightNetVisionTransformer, "lightnet_vit_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def lightnet_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> LightNetVisionTransformer:
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return build(LightNetVisionTransformer, "lightnet_vit_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def lightnet_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> LightNetVisionTransformer:
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return build(LightNetVisionTransformer, "lightnet_vit_base_patch16_224", pretrained, **dict(args, **kwargs))
