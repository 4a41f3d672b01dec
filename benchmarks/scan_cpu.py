"""Torch backend vs the step-by-step reference on the CPU: forward and forward+backward time.

Cases: 32x32 grids (grid_scan) and a batch of 128 molecule-sized DAGs (~25 nodes each, dag_scan).
Three timings each: inference (forward under no_grad), forward (of a training step: inputs require grad,
so the reference records its autograd graph) and forward+backward. Prints a table and writes JSON.

    python benchmarks/scan_cpu.py [--repeats 10] [--out benchmarks/results/scan_cpu.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import time
from pathlib import Path

import torch

from mdlrnn import DAG, dag_scan, grid_scan
from mdlrnn.testing import dag_inputs, disjoint_union, grid_inputs, molecule_dag


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    By default glibc serves large blocks with mmap and gives them back on free, so every call of an op
    that allocates a few MB page-faults that memory in afresh; whether it does depends on the heap's
    history, which made timings of the same call differ 3x between processes. This is what PyTorch's
    CPU tuning guide gets from jemalloc/tcmalloc; it applies to both backends alike.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 62))


def seconds(fn, repeats: int) -> float:
    """Fastest of `repeats` calls after a warm-up call: the timeit convention, since slower calls measure
    interference (other processes, page faults of fresh allocations), not the code."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(scan, inputs: dict, backend: str, repeats: int, **kwargs) -> dict[str, float]:
    """Inference forward (no_grad), training forward (inputs require grad) and forward+backward."""
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v is not None}

    def inference():
        with torch.no_grad():
            scan(**inputs, backend=backend, **kwargs)

    def training_forward():
        scan(**inputs, backend=backend, **kwargs)

    def forward_backward():
        scan(**inputs, backend=backend, **kwargs).square().mean().backward()
        for x in leaves.values():
            x.grad = None

    return dict(
        inference=seconds(inference, repeats),
        forward=seconds(training_forward, repeats),
        forward_backward=seconds(forward_backward, repeats),
    )


def cases(seed: int):
    gen = torch.Generator().manual_seed(seed)
    for batch, heads, dim in [(1, 4, 16), (1, 3, 64)]:
        inputs = grid_inputs(batch, (32, 32), heads, dim, dim, generator=gen, dtype=torch.float32)
        yield f"grid_scan 32x32 B={batch} H={heads} D={dim}", grid_scan, inputs, {}
    molecules = [molecule_dag(25, 2, gen) for _ in range(128)]
    edges, nodes = disjoint_union(molecules, [25] * 128)
    graph = DAG.from_edge_index(edges, nodes)
    inputs = dag_inputs(graph, 4, 16, 16, generator=gen, dtype=torch.float32)
    name = f"dag_scan 128 molecules ({graph.num_nodes} nodes, {graph.num_edges} edges) H=4 D=16"
    yield name, dag_scan, inputs, {"graph": graph}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="timed calls of the torch backend")
    parser.add_argument("--reference-repeats", type=int, default=3, help="timed calls of the reference")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scan_cpu.json")
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc settings as they are")
    args = parser.parse_args()
    kept = False if args.glibc_default else keep_freed_memory()

    rows = []
    columns = ("inference", "forward", "forward_backward")
    header = f"{'case':<66}" + "".join(f"{name + ' ref':>24}{'torch':>10}{'x':>6}" for name in columns)
    print(header)
    print("-" * len(header))
    for name, scan, inputs, kwargs in cases(args.seed):
        reference = measure(scan, inputs, "reference", args.reference_repeats, **kwargs)
        fast = measure(scan, inputs, "torch", args.repeats, **kwargs)
        row = dict(case=name, reference_s=reference, torch_s=fast, speedup={c: reference[c] / fast[c] for c in columns})
        rows.append(row)
        print(
            f"{name:<66}"
            + "".join(f"{reference[c] * 1e3:22.1f}ms{fast[c] * 1e3:8.2f}ms{reference[c] / fast[c]:5.0f}x" for c in columns)
        )
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), processor=platform.processor() or platform.machine(),
                date=time.strftime("%Y-%m-%d"), glibc_keeps_freed_memory=kept)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
