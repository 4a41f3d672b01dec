"""The three scan ops on the CPU: each fast path next to the step-by-step reference.

    python examples/scan_demo.py
"""

from __future__ import annotations

import time

import torch

from mdlrnn import DAG, dag_scan, grid_scan, lightnet_scan
from mdlrnn.testing import dag_inputs, disjoint_union, grid_inputs, molecule_dag, relative_error


def compare(name: str, run) -> None:
    """Run an op with both backends in float64, outputs and gradients of every input."""
    rows = []
    for backend in ("reference", "torch"):
        leaves, start = {}, time.perf_counter()
        out = run(backend, leaves)
        out.square().sum().backward()
        rows.append((out, {k: x.grad for k, x in leaves.items()}, time.perf_counter() - start))
    (ref, ref_grads, ref_time), (fast, fast_grads, fast_time) = rows
    grad_error = max(relative_error(fast_grads[k], ref_grads[k]) for k in ref_grads)
    print(
        f"{name:<44} output rel. error {relative_error(fast, ref):.1e}   gradients {grad_error:.1e}   "
        f"reference {ref_time * 1e3:7.1f} ms   torch {fast_time * 1e3:6.1f} ms"
    )


def leaf(leaves: dict, inputs: dict) -> dict:
    for name, x in inputs.items():
        if x is not None:
            leaves[name] = x.clone().requires_grad_()
    return {name: leaves.get(name) for name in inputs}


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    print(f"mdlrnn scan core on {torch.device('cpu')} (torch {torch.__version__}), float64\n")

    image = grid_inputs(2, (12, 15), 3, 8, 8, generator=gen)
    compare("grid_scan  2D 12x15, B=2, H=3, D=8", lambda b, leaves: grid_scan(**leaf(leaves, image), backend=b))
    volume = grid_inputs(1, (4, 5, 6), 2, 4, 4, generator=gen)
    compare("grid_scan  3D 4x5x6, B=1, H=2, D=4", lambda b, leaves: grid_scan(**leaf(leaves, volume), backend=b))

    molecules = [molecule_dag(25, 2, gen) for _ in range(16)]
    edges, nodes = disjoint_union(molecules, [25] * 16)
    graph = DAG.from_edge_index(edges, nodes)
    graph_inputs = dag_inputs(graph, 2, 8, 8, generator=gen)
    compare(
        f"dag_scan   16 molecules, {graph.num_edges} edges",
        lambda b, leaves: dag_scan(**leaf(leaves, graph_inputs), graph=graph, backend=b),
    )

    q, k, v = (torch.randn(1, 8, 9, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    k = 40 * k  # large key logits: running maxima keep the softmax finite
    for mode in ("global", "causal", "box"):
        qkv = dict(q=q, k=k, v=v)
        compare(
            f"lightnet_scan {mode:<6} 8x9, |k| up to {k.abs().max():.0f}",
            lambda b, leaves: lightnet_scan(**leaf(leaves, qkv), mode=mode, backend=b),
        )


if __name__ == "__main__":
    main()
