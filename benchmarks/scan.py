"""GPU timing of the scan backends on pLSTM-sized grids, against scaled_dot_product_attention.

For grids 14x14 (B=64) to 128x128 (B=2), H=3, D=64, bf16 inputs: forward and forward+backward time and
peak memory of grid_scan's and lightnet_scan's (box) backends, and, in the same process, SDPA on the same
token count. `--dims 1` times 1D grids of the same token counts (196 to 16384), with LightNet's causal
mode, against causal SDPA.
Prints a table and writes JSON.

    python benchmarks/scan.py [--backends torch,triton] [--dims 1,2] [--out benchmarks/results/scan.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mdlrnn import grid_scan, lightnet_scan

CASES = {
    2: [((14, 14), 64), ((24, 24), 64), ((32, 32), 32), ((64, 64), 8), ((128, 128), 2)],
    1: [((196,), 64), ((576,), 64), ((1024,), 32), ((4096,), 8), ((16384,), 2)],
}


def cuda_time(fn, repeats: int = 20) -> float:
    """Median milliseconds over `repeats` calls after warm-up, timed with CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def measure(run, leaves) -> dict:
    def forward_backward():
        run().float().square().mean().backward()
        for x in leaves:
            x.grad = None

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = dict(forward_ms=cuda_time(lambda: run()), forward_backward_ms=cuda_time(forward_backward))
    result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="torch", help="comma-separated grid_scan backends")
    parser.add_argument("--dims", default="2", help="comma-separated grid dimensionalities (1 and/or 2)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scan.json")
    args = parser.parse_args()
    device, dtype, heads, dim = torch.device("cuda"), torch.bfloat16, 3, 64
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, H={heads}, D={dim}")
    print(f"{'op':<24}{'grid':>10}{'B':>4}{'fwd ms':>10}{'f+b ms':>10}{'peak MiB':>10}{'f+b / SDPA':>12}")
    cases = [case for n in map(int, args.dims.split(",")) for case in CASES[n]]
    for sizes, batch in cases:
        lead, n = (batch, *sizes, heads), len(sizes)
        make = lambda *shape, scale=1.0: (scale * torch.rand(*lead, *shape, device=device)).to(dtype).requires_grad_()
        q, k, v = make(dim), make(dim), make(dim)
        gates = dict(source=make(n), transition=make(n, n, scale=1 / n), mark=make(n), direct=make())
        tokens = math.prod(sizes)
        sq, sk, sv = (torch.randn(batch, heads, tokens, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        causal = n == 1  # a 1D scan sees the past only: compare with causal attention
        runs = {"sdpa": (lambda: F.scaled_dot_product_attention(sq, sk, sv, is_causal=causal), [sq, sk, sv])}
        lightnet_mode = "causal" if n == 1 else "box"
        for backend in args.backends.split(","):
            runs[f"grid_scan[{backend}]"] = (lambda b=backend: grid_scan(q, k, v, **gates, backend=b), [q, k, v, *gates.values()])
            if backend != "triton" or n == 1:  # 2D box mode has no Triton path yet
                runs[f"lightnet {lightnet_mode}[{backend}]"] = (
                    lambda b=backend: lightnet_scan(q, k, v, mode=lightnet_mode, backend=b), [q, k, v])
        results = {}
        for name, (run, leaves) in runs.items():
            try:
                results[name] = measure(run, leaves)
            except torch.OutOfMemoryError:
                results[name] = dict(forward_ms=float("nan"), forward_backward_ms=float("nan"), peak_mib=float("nan"))
            torch.cuda.empty_cache()
        sdpa = results["sdpa"]["forward_backward_ms"]
        for name, r in results.items():
            ratio = r["forward_backward_ms"] / sdpa
            print(f"{name:<24}{'x'.join(map(str, sizes)):>10}{batch:>4}{r['forward_ms']:10.2f}{r['forward_backward_ms']:10.2f}"
                  f"{r['peak_mib']:10.0f}{ratio:11.1f}x")
            rows.append(dict(op=name, sizes=sizes, batch=batch, **r, forward_backward_vs_sdpa=ratio))
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                dtype="bfloat16", heads=heads, dim=dim)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
