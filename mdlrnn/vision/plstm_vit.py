"""pLSTM-ViT: ViT whose token mixers are 2D pLSTM layers alternating P-mode and D-mode (DESIGN.md 4).

Registered with timm on `import mdlrnn`: plstm_vit_{tiny,small,base}_patch16_224.
"""

from __future__ import annotations

from timm.models import generate_default_cfgs, register_model

from ..layers import PLSTM2D
from .vit import MDVisionTransformer, build, default_cfg

__all__ = ["PLSTMVisionTransformer"]


class PLSTMVisionTransformer(MDVisionTransformer):
    """MDVisionTransformer with pLSTM mixers; layer i uses mode modes[i % len(modes)]."""

    def __init__(self, embed_dim: int = 192, num_heads: int = 3, modes: tuple[str, ...] = ("P", "D"),
                 backend: str = "auto", **kwargs):
        def mixer(index: int, **dd):
            return PLSTM2D(embed_dim, num_heads, mode=modes[index % len(modes)], backend=backend, **dd)

        super().__init__(mixer, embed_dim=embed_dim, num_heads=num_heads, **kwargs)


default_cfgs = generate_default_cfgs(
    {
        "plstm_vit_tiny_patch16_224": default_cfg(),
        "plstm_vit_small_patch16_224": default_cfg(),
        "plstm_vit_base_patch16_224": default_cfg(),
    }
)


@register_model
def plstm_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> PLSTMVisionTransformer:
    args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return build(PLSTMVisionTransformer, "plstm_vit_tiny_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def plstm_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> PLSTMVisionTransformer:
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return build(PLSTMVisionTransformer, "plstm_vit_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def plstm_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> PLSTMVisionTransformer:
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return build(PLSTMVisionTransformer, "plstm_vit_base_patch16_224", pretrained, **dict(args, **kwargs))
