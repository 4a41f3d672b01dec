"""GPU timing of the scan backends on pLSTM-sized grids, against scaled_dot_product_attention.

For grids 14x14 (B=64) to 128x128 (B=2), H=3, D=64, bf16 inputs: forward and forward+backward time and
peak memory of grid_scan's and lightnet_scan's (box) backends, and, in the same process, SDPA on the same
token count. Prints a table and writes JSON.

    python benchmarks/scan.py [--backends torch] [--out benchmarks/results/scan.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mdlrnn import grid_scan, lightnet_scan

CASES = [((14, 14), 64), ((24, 24), 64), ((32, 32), 32), ((64, 64), 8), ((128, 128), 2)]


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
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scan.json")
    args = parser.parse_args()
    device, dtype, heads, dim = torch.device("cuda"), torch.bfloat16, 3, 64
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, H={heads}, D={dim}")
    print(f"{'op':<24}{'grid':>10}{'B':>4}{'fwd ms':>10}{'f+b ms':>10}{'peak MiB':>10}{'f+b / SDPA':>12}")
    for sizes, batch in CASES:
        lead = (batch, *sizes, heads)
        make = lambda *shape, scale=1.0: (scale * torch.rand(*lead, *shape, device=device)).to(dtype).requires_grad_()
        q, k, v = make(dim), make(dim), make(dim)
        gates = dict(source=make(2), transition=make(2, 2, scale=0.5), mark=make(2), direct=make())
        tokens = sizes[0] * sizes[1]
        sq, sk, sv = (torch.randn(batch, heads, tokens, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        runs = {"sdpa": (lambda: F.scaled_dot_product_attention(sq, sk, sv), [sq, sk, sv])}
        for backend in args.backends.split(","):
            runs[f"grid_scan[{backend}]"] = (lambda b=backend: grid_scan(q, k, v, **gates, backend=b), [q, k, v, *gates.values()])
            runs[f"lightnet box[{backend}]"] = (lambda b=backend: lightnet_scan(q, k, v, mode="box", backend=b), [q, k, v])
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
