"""The ViT skeleton of pLSTM-ViT and LightNet-ViT: patch tokens on a 2D grid (channels last), blocks of
token mixer + MLP, corner pooling. The mixer scans the grid, so any input size divisible by the patch
size works (the position embedding is resampled)."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed_nhwc, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

from ..layers import MDTPE

__all__ = ["MDVisionTransformer", "checkpoint_filter_fn"]

POOLS = ("corners", "avg", "")


def _init_linear(linear: nn.Linear) -> None:
    trunc_normal_(linear.weight, std=0.02)
    nn.init.zeros_(linear.bias)


class Block(nn.Module):
    """x + mixer(RMSNorm x), then x + MLP(RMSNorm x)."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float, drop_path: float, proj_drop: float, dd: dict):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6, **dd)
        self.mixer = mixer
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.RMSNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        _init_linear(self.mlp.fc1)
        _init_linear(self.mlp.fc2)

    def reset_parameters(self) -> None:
        for module in (self.norm1, self.mixer, self.norm2):
            module.reset_parameters()
        _init_linear(self.mlp.fc1)
        _init_linear(self.mlp.fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.mixer(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MDVisionTransformer(nn.Module):
    """Vision model whose token mixer is a multi-dimensional linear RNN.

    Args:
        img_size: the size the position embedding is made for; other sizes divisible by the patch size
            work (the embedding is resampled).
        mixer: a callable (layer_index, device, dtype) -> nn.Module mapping (B, H, W, C) to itself.
        global_pool: "corners" (the four corner tokens, concatenated: every corner has scanned the whole
            image in one of the orientations), "avg" or "" (no pooling).
        tpe: add a multi-dimensional Toeplitz positional encoding (MDTPE) after the patch embedding.
    """

    def __init__(
        self,
        mixer: Callable[..., nn.Module],
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "corners",
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        tpe: bool = False,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
        dd = dict(device=device, dtype=dtype)
        self.num_classes, self.global_pool, self.patch_size = num_classes, global_pool, patch_size
        self.num_features = self.embed_dim = embed_dim
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(
            img_size, patch_size, in_chans, embed_dim, output_fmt="NHWC", strict_img_size=False, **dd
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, *self.patch_embed.grid_size, embed_dim, **dd))
        self.tpe = MDTPE(embed_dim, num_heads, ndim=2, **dd) if tpe else None
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth, linear
        self.blocks = nn.Sequential(
            *(Block(embed_dim, mixer(i, **dd), mlp_ratio, rates[i], proj_drop_rate, dd) for i in range(depth))
        )
        self.norm = nn.RMSNorm(embed_dim, eps=1e-6, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(num_classes, dd)
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
        trunc_normal_(self.pos_embed, std=0.02)

    @property
    def head_hidden_size(self) -> int:
        return 4 * self.embed_dim if self.global_pool == "corners" else self.embed_dim

    def _make_head(self, num_classes: int, dd: dict) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.head_hidden_size, num_classes, **dd)
        _init_linear(head)
        return head

    def init_weights(self) -> None:
        """Initialise every parameter afresh (e.g. after building on the meta device and `to_empty`).

        A module with its own reset_parameters (blocks, mixers, norms, the patch projection) initialises its
        whole subtree; its children are not reset after it, which would undo its choices (gate biases)."""

        def reset(module: nn.Module) -> None:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                for child in module.children():
                    reset(child)

        trunc_normal_(self.pos_embed, std=0.02)
        for child in self.children():
            reset(child)
        if isinstance(self.head, nn.Linear):
            _init_linear(self.head)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^pos_embed|patch_embed|tpe", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in POOLS:
                raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        weight = self.pos_embed
        self.head = self._make_head(num_classes, dict(device=weight.device, dtype=weight.dtype))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__}: input must be (B, C, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(
                f"{type(self).__name__}: image size {tuple(x.shape[-2:])} must be divisible by the patch size "
                f"{self.patch_size}"
            )
        x = self.patch_embed(x)  # (B, H, W, C)
        pos_embed = self.pos_embed
        if pos_embed.shape[1:3] != x.shape[1:3]:
            pos_embed = resample_abs_pos_embed_nhwc(pos_embed, list(x.shape[1:3]))
        x = self.pos_drop(x + pos_embed)
        if self.tpe is not None:
            x = x + self.tpe(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image -> (B, H / patch, W / patch, embed_dim) normalised tokens, unpooled."""
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "corners":
            return torch.cat([x[:, 0, 0], x[:, 0, -1], x[:, -1, 0], x[:, -1, -1]], -1)
        if self.global_pool == "avg":
            return x.mean((1, 2))
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Features after the blocks in `indices` (the last n if an int, all if None), as NCHW maps (or
        NHWC); with the final features unless intermediates_only."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing else block(x)
            if i in take_indices:
                feature = self.norm(x) if norm else x
                intermediates.append(feature.permute(0, 3, 1, 2) if output_fmt == "NCHW" else feature)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True):
        """Drop the blocks after the last index needed (and the norm / head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


def checkpoint_filter_fn(state_dict: dict, model: MDVisionTransformer) -> dict:
    """Resample a checkpoint's position embedding to the model's grid."""
    state_dict = dict(state_dict)
    pos_embed = state_dict.get("pos_embed")
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        state_dict["pos_embed"] = resample_abs_pos_embed_nhwc(pos_embed, list(model.pos_embed.shape[1:3]))
    return state_dict


def default_cfg(**kwargs) -> dict:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "mit",
        **kwargs,
    }


def build(model_cls: type, variant: str, pretrained: bool, **kwargs) -> MDVisionTransformer:
    """timm's builder: pretrained weights (pretrained_cfg_overlay=dict(file=...)), features_only, cfgs."""
    from timm.models import build_model_with_cfg

    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )
