"""Parameters and forward GFLOPs (and multiply-accumulates) of the registered vision models at 224 px (batch 1, the torch backend),
next to timm's ViTs of the same sizes; matrix products counted by torch.utils.flop_counter.

    python benchmarks/model_table.py
"""

from __future__ import annotations

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import mdlrnn  # noqa: F401  (registers the models)

NAMES = [f"{family}_{size}_patch16_224" for size in ("tiny", "small", "base") for family in ("vit", "plstm_vit", "lightnet_vit")]


def main():
    print("| model | params (M) | GFLOPs at 224 | GMACs at 224 |\n| --- | --- | --- | --- |")
    for name in NAMES:
        model = timm.create_model(name).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.randn(1, 3, 224, 224))
        flops = counter.get_total_flops()
        print(f"| {name} | {params:.1f} | {flops / 1e9:.2f} | {flops / 2e9:.2f} |", flush=True)


if __name__ == "__main__":
    main()
