"""Forward+backward time of the PLSTM2D layer (four orientations, dim 192, 3 heads, with its projections)
per grid_scan backend, against the paper's fused pLSTM 2D layer (figures measured on an H100, bf16:
133 ms at 14x14 B=64 and 575 ms at 64x64 B=8; it cannot run above 64x64), and SDPA on the same tokens
as a same-process baseline; on CUDA also both captured in a CUDA graph and replayed ("graph": the GPU's time
without the host's, see scan.py). Prints a table and writes JSON.

    python benchmarks/layers.py [--backends torch,triton] [--out benchmarks/results/layers.json]
    python benchmarks/layers.py --device cpu --cases 14x14:2        # a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mdlrnn.layers import PLSTM2D
from scan import graph_time

PAPER_MS = {((14, 14), 64): 133.0, ((64, 64), 8): 575.0}  # the paper's layer, H100, bf16, forward+backward
CASES = "14x14:64,32x32:32,64x64:8,128x128:2"


def elapsed_ms(step, device: torch.device, repeats: int) -> float:
    """Median milliseconds of `step` after warm-up."""
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="torch,triton")
    parser.add_argument("--cases", default=CASES, help="comma-separated XxY:B")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "layers.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    amp = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if amp else "cpu"
    print(f"{name}, torch {torch.__version__}, PLSTM2D dim 192, 3 heads, mode P, {'bf16 autocast' if amp else 'float32'}")
    print(f"{'layer':<22}{'grid':>9}{'B':>4}{'f+b ms':>10}{'x SDPA':>9}{'paper / this':>14}{'graph ms':>10}"
          f"{'x SDPA':>9}{'paper / graph':>15}")
    rows = []
    for case in args.cases.split(","):
        grid, batch = case.split(":")
        sizes, batch = tuple(int(s) for s in grid.split("x")), int(batch)
        x = torch.randn(batch, *sizes, 192, device=device, requires_grad=True)
        tokens = torch.randn(batch, 3, sizes[0] * sizes[1], 64, device=device, requires_grad=True)

        # autocast's cast cache off: a CUDA graph cannot capture it
        autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=amp, cache_enabled=False)

        def sdpa_step():
            with autocast():
                F.scaled_dot_product_attention(tokens, tokens, tokens).float().square().mean().backward()

        graphed = lambda step: graph_time(step) if amp else float("nan")
        sdpa, sdpa_graph = elapsed_ms(sdpa_step, device, args.repeats), graphed(sdpa_step)
        for backend in args.backends.split(","):
            layer = PLSTM2D(192, 3, backend=backend).to(device)

            def step():
                with autocast():
                    layer(x).float().square().mean().backward()

            ms, graph_ms = elapsed_ms(step, device, args.repeats), graphed(step)
            paper = PAPER_MS.get((sizes, batch)) if amp else None
            speedup = lambda t: f"{paper / t:.1f}x" if paper else "-"
            print(f"{'PLSTM2D[' + backend + ']':<22}{grid:>9}{batch:>4}{ms:10.2f}{ms / sdpa:8.1f}x{speedup(ms):>14}"
                  f"{graph_ms:10.2f}{graph_ms / sdpa_graph:8.1f}x{speedup(graph_ms):>15}")
            rows.append(dict(backend=backend, sizes=sizes, batch=batch, forward_backward_ms=ms, sdpa_ms=sdpa,
                             paper_ms=paper, speedup_vs_paper=paper / ms if paper else None,
                             graph_forward_backward_ms=graph_ms, sdpa_graph_ms=sdpa_graph,
                             graph_speedup_vs_paper=paper / graph_ms if paper else None))
    meta = dict(device=name, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), dim=192, heads=3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
