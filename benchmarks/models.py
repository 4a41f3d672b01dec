"""Throughput and memory of the Tiny vision models against timm's vit_tiny_patch16_224 on the GPU.

For 224, 384, 512 and 1024 px, bf16 autocast: inference img/s, training img/s (forward, backward and an
AdamW step) and peak training memory, every model in the same process. A model whose training step does
not fit at the size's batch is measured at the largest halved batch that fits (the batch column says
which). With `--compile MODE` every model runs as `torch.compile(model, mode=MODE)` ("default",
"reduce-overhead": CUDA graphs, ...); the compilation falls in the warm-up, not in the timing. Prints a table and
writes JSON.

    python benchmarks/models.py [--models plstm_vit_tiny_patch16_224,...] [--sizes 224,384,512,1024] [--compile MODE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import timm
import torch
from torch._inductor.cudagraph_trees import reset_cudagraph_trees

import mdlrnn  # noqa: F401  (registers the models)

BATCH = {224: 128, 384: 64, 512: 32, 1024: 8}
MODELS = "vit_tiny_patch16_224,plstm_vit_tiny_patch16_224,lightnet_vit_tiny_patch16_224"


def timed(step, batch: int, seconds: float = 3.0, warmup: int = 3) -> float:
    """Images per second of `step` over about `seconds` after warm-up."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    torch.cuda.synchronize()
    return count * batch / (time.perf_counter() - start)


def measure(name: str, size: int, batch: int, compile_mode: Optional[str] = None) -> dict:
    model = timm.create_model(name, img_size=size).cuda()
    if compile_mode is not None:
        torch._dynamo.reset()  # a fresh cache per model, so that no recompile limit is reached across models
    forward = model if compile_mode is None else torch.compile(model, mode=compile_mode)
    x = torch.randn(batch, 3, size, size, device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    @torch.no_grad()
    def infer():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            forward(x)

    def train():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(forward(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = {}
    for mode, step in (("inference", infer), ("training", train)):
        model.train(mode == "training")
        if compile_mode is not None:  # the inference graphs' memory pool is not the training step's memory
            reset_cudagraph_trees()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            result[f"{mode}_img_s"] = timed(step, batch)
            result[f"{mode}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except torch.OutOfMemoryError:
            result[f"{mode}_img_s"], result[f"{mode}_peak_gib"] = float("nan"), float("nan")
    return result


def measure_fitting(name: str, size: int, batch: int, compile_mode: Optional[str] = None) -> dict:
    """measure() at the largest batch, halving from `batch`, at which training fits in memory."""
    while True:
        result = measure(name, size, batch, compile_mode)
        torch.cuda.empty_cache()
        if result["training_img_s"] == result["training_img_s"] or batch == 1:  # not NaN: it fitted
            return dict(result, batch=batch)
        batch //= 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--sizes", default="224,384,512,1024")
    parser.add_argument("--compile", metavar="MODE", help="torch.compile every model with this mode")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "models.json")
    args = parser.parse_args()
    names, sizes = args.models.split(","), [int(s) for s in args.sizes.split(",")]
    compiled = f", torch.compile(mode={args.compile!r})" if args.compile else ""
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}, bf16 autocast{compiled}")
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, timm=timm.__version__,
                date=time.strftime("%Y-%m-%d"), baseline=names[0], autocast="bfloat16", compile=args.compile)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = f"{'model':<32}{'px':>6}{'batch':>6}{'infer img/s':>13}{'x ViT':>7}{'train img/s':>13}{'x ViT':>7}{'peak GiB':>10}"
    print(header)
    rows = []
    for size in sizes:
        batch = BATCH.get(size, 8)
        baseline = None
        for name in names:
            r = measure_fitting(name, size, batch, args.compile)
            if baseline is None:
                baseline = r
            ratio = {m: r[f"{m}_img_s"] / baseline[f"{m}_img_s"] for m in ("inference", "training")}
            rows.append(dict(model=name, size=size, **r, vs_baseline=ratio))
            print(f"{name:<32}{size:>6}{r['batch']:>6}{r['inference_img_s']:13.0f}{ratio['inference']:7.2f}"
                  f"{r['training_img_s']:13.0f}{ratio['training']:7.2f}{r['training_peak_gib']:10.2f}", flush=True)
            args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))  # each row: a cut-off run keeps its rows
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
