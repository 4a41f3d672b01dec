"""GPU timing of the scan backends on pLSTM-sized grids, against scaled_dot_product_attention.

For grids 14x14 (B=64) to 128x128 (B=2), H=3, D=64, bf16 inputs: forward and forward+backward time and
peak memory of grid_scan's and lightnet_scan's (causal, box, global) backends, and, in the same process, SDPA on
the same token count, each op against its attention (f+b / attn): grid_scan and LightNet's box and global modes
against SDPA, LightNet's causal mode against causal SDPA. "lightnet box sweeps" is box mode with logits spread
by up to 100, where the kernels take the row sweeps. `--dims 1` times 1D grids of the same token counts (196 to 16384),
where everything is causal.
"graph" is the forward+backward captured once in a CUDA graph and replayed: the GPU's time without the host's
launches and Python, which bound the small sizes in eager mode (what `torch.cuda.graph` or
`torch.compile(mode="reduce-overhead")` give a training step); nan where an op cannot be captured.
Prints a table and writes JSON.

    python benchmarks/scan.py [--backends torch,triton] [--dims 1,2] [--ops "grid_scan,lightnet box"] [--out F.json]
    python benchmarks/scan.py --host --backends triton   # the host's time per step at a tiny input
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


def graph_time(step) -> float:
    """Median milliseconds of `step` captured in a CUDA graph and replayed; NaN where it cannot be captured
    (it waits on the host)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: kernels compiled, cached index tables made
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.set_sync_debug_mode("error")  # found before a capture, whose failure would leave torch's state broken
    try:
        step()
    except RuntimeError as error:
        print(f"  (not captured: {str(error).splitlines()[0][:100]})")
        return float("nan")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return cuda_time(graph.replay)


def measure(run, leaves) -> dict:
    def forward_backward():
        run().float().square().mean().backward()
        for x in leaves:
            x.grad = None

    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = dict(forward_ms=cuda_time(lambda: run()), forward_backward_ms=cuda_time(forward_backward))
    result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    result["graph_forward_backward_ms"] = graph_time(forward_backward)
    return result


def host_ms(run, leaves, repeats: int = 200) -> float:
    """Wall milliseconds per forward+backward of a tiny input, synchronising once: the host's time per step
    (launches, dispatch, Python), which bounds every size whose GPU time is smaller."""
    def step():
        run().float().square().mean().backward()
        for x in leaves:
            x.grad = None

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


def host_table(backends: list[str]) -> list[dict]:
    """Host time per forward+backward at B=1, 64 tokens (an 8x8 grid), H=3, D=64, bf16."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    make = lambda *shape: torch.rand(1, 8, 8, 3, *shape, device=device).to(dtype).requires_grad_()
    q, k, v = make(64), make(64), make(64)
    gates = dict(source=make(2), transition=make(2, 2), mark=make(2), direct=make())
    sq, sk, sv = (torch.randn(1, 3, 64, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    runs = {"sdpa causal": (lambda: F.scaled_dot_product_attention(sq, sk, sv, is_causal=True), [sq, sk, sv])}
    for backend in backends:
        runs[f"grid_scan[{backend}]"] = (lambda b=backend: grid_scan(q, k, v, **gates, backend=b),
                                         [q, k, v, *gates.values()])
        runs[f"lightnet causal[{backend}]"] = (
            lambda b=backend: lightnet_scan(q, k, v, mode="causal", backend=b), [q, k, v])
    print(f"{'op':<24}{'host ms per f+b (B=1, 8x8)':>28}")
    rows = []
    for name, (run, leaves) in runs.items():
        ms = host_ms(run, leaves)
        print(f"{name:<24}{ms:28.3f}")
        rows.append(dict(op=name, host_ms=ms))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="torch", help="comma-separated grid_scan backends")
    parser.add_argument("--dims", default="2", help="comma-separated grid dimensionalities (1 and/or 2)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scan.json")
    parser.add_argument("--host", action="store_true", help="only the host time per step at a tiny input")
    parser.add_argument("--ops", default="grid_scan,lightnet causal,lightnet box,lightnet box sweeps,lightnet global",
                        help="comma-separated ops to time")
    args = parser.parse_args()
    if args.host:
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
        rows = host_table(args.backends.split(","))
        meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
        print(f"wrote {args.out}")
        return
    device, dtype, heads, dim = torch.device("cuda"), torch.bfloat16, 3, 64
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, H={heads}, D={dim}")
    print(f"{'op':<28}{'grid':>10}{'B':>4}{'fwd ms':>10}{'f+b ms':>10}{'peak MiB':>10}{'f+b / attn':>12}"
          f"{'graph ms':>10}{'graph / attn':>14}")
    cases = [case for n in map(int, args.dims.split(",")) for case in CASES[n]]
    for sizes, batch in cases:
        lead, n = (batch, *sizes, heads), len(sizes)
        make = lambda *shape, scale=1.0: (scale * torch.rand(*lead, *shape, device=device)).to(dtype).requires_grad_()
        q, k, v, wide = make(dim), make(dim), make(dim), make(dim, scale=100.0)
        gates = dict(source=make(n), transition=make(n, n, scale=1 / n), mark=make(n), direct=make())
        tokens = math.prod(sizes)
        sq, sk, sv = (torch.randn(batch, heads, tokens, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        # each op against its attention: a 1D scan and LightNet's causal mode see the past only (causal SDPA)
        runs = {"sdpa": (lambda: F.scaled_dot_product_attention(sq, sk, sv, is_causal=n == 1), [sq, sk, sv], None),
                "sdpa causal": (lambda: F.scaled_dot_product_attention(sq, sk, sv, is_causal=True), [sq, sk, sv], None)}
        if n == 1:
            del runs["sdpa causal"]
        causal_baseline = "sdpa" if n == 1 else "sdpa causal"
        for backend in args.backends.split(","):
            runs[f"grid_scan[{backend}]"] = (lambda b=backend: grid_scan(q, k, v, **gates, backend=b),
                                             [q, k, v, *gates.values()], "sdpa")
            runs[f"lightnet causal[{backend}]"] = (
                lambda b=backend: lightnet_scan(q, k, v, mode="causal", backend=b), [q, k, v], causal_baseline)
            runs[f"lightnet global[{backend}]"] = (
                lambda b=backend: lightnet_scan(q, k, v, mode="global", backend=b), [q, k, v], "sdpa")
            if n > 1:  # box mode on a 1D grid is causal mode
                runs[f"lightnet box[{backend}]"] = (
                    lambda b=backend: lightnet_scan(q, k, v, mode="box", backend=b), [q, k, v], "sdpa")
                # logits spread by up to 100, past box attention's 60: the op takes the row sweeps
                runs[f"lightnet box sweeps[{backend}]"] = (
                    lambda b=backend: lightnet_scan(q, wide, v, mode="box", backend=b), [q, wide, v], "sdpa")
        ops = args.ops.split(",")
        runs = {name: run for name, run in runs.items() if name.startswith("sdpa") or name.split("[")[0] in ops}
        results = {}
        for name, (run, leaves, _) in runs.items():
            try:
                results[name] = measure(run, leaves)
            except torch.OutOfMemoryError:
                results[name] = dict.fromkeys(("forward_ms", "forward_backward_ms", "peak_mib",
                                               "graph_forward_backward_ms"), float("nan"))
            torch.cuda.empty_cache()
        for name, r in results.items():
            baseline = runs[name][2] or name
            ratio = r["forward_backward_ms"] / results[baseline]["forward_backward_ms"]
            graph_ratio = r["graph_forward_backward_ms"] / results[baseline]["graph_forward_backward_ms"]
            print(f"{name:<28}{'x'.join(map(str, sizes)):>10}{batch:>4}{r['forward_ms']:10.2f}{r['forward_backward_ms']:10.2f}"
                  f"{r['peak_mib']:10.0f}{ratio:11.1f}x{r['graph_forward_backward_ms']:10.2f}{graph_ratio:13.2f}x")
            rows.append(dict(op=name, sizes=sizes, batch=batch, **r, baseline=baseline, forward_backward_vs_baseline=ratio,
                             graph_vs_baseline=graph_ratio))
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                dtype="bfloat16", heads=heads, dim=dim)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
