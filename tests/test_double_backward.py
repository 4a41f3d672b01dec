"""Second derivatives through ops whose gradients are computed outside autograd (the Triton kernels, the torch
paths' adjoint scans) raise, never silently drop a term; the reference backends and the tiled products of
LightNet's box mode, plain torch, take them exactly."""

import pytest
import torch

from mdlrnn import DAG, dag_scan, grid_scan, lightnet_scan
from mdlrnn.testing import dag_inputs, grid_inputs, relative_error

pytest.importorskip("triton")
from mdlrnn.kernels import lightnet_box  # noqa: E402


@pytest.fixture
def device(kernel_device):
    return kernel_device


def _grid(sizes, backend, generator, device):
    inputs = {name: x.float().to(device).requires_grad_()
              for name, x in grid_inputs(1, sizes, 1, 4, 3, generator=generator).items()}
    return inputs["q"], lambda: grid_scan(**inputs, backend=backend)


def _dag(backend, generator, device):
    graph = DAG.from_edge_index(torch.tensor([[0, 0, 1, 2], [1, 2, 3, 3]]), 4)
    inputs = {name: x.float().requires_grad_() for name, x in dag_inputs(graph, 1, 4, 3, generator=generator).items()}
    graph, inputs = (graph.to(device), {n: x.to(device) for n, x in inputs.items()}) if backend == "triton" else (graph, inputs)
    return inputs["q"], lambda: dag_scan(graph=graph, **inputs, backend=backend)


def _lightnet(mode, sizes, generator, device):
    q, k, v = (torch.randn(1, *sizes, 1, 4, generator=generator).to(device).requires_grad_() for _ in range(3))
    return q, lambda: lightnet_scan(q, k, v, mode=mode, backend="triton")


CASES = {
    "grid_scan 1D triton": lambda g, d: _grid((7,), "triton", g, d),
    "grid_scan 2D triton": lambda g, d: _grid((3, 4), "triton", g, d),
    "grid_scan 2D torch": lambda g, d: _grid((17, 17), "torch", g, d),  # several tiles: the pass across them
    "dag_scan torch": lambda g, d: _dag("torch", g, d),
    "dag_scan triton": lambda g, d: _dag("triton", g, d),
    "lightnet causal": lambda g, d: _lightnet("causal", (7,), g, d),
    "lightnet box sweeps": lambda g, d: _lightnet("box", (3, 4), g, d),
    "lightnet box attention": lambda g, d: _lightnet("box", (3, 4), g, d),
    "lightnet global": lambda g, d: _lightnet("global", (7,), g, d),
}


@pytest.mark.parametrize("case", CASES)
def test_second_derivatives_raise(case, generator, device, monkeypatch):
    monkeypatch.setattr(lightnet_box, "tiles_fit", lambda k: case != "lightnet box sweeps")
    q, run = CASES[case](generator, device)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(run().sum(), q, create_graph=True)


def test_box_tiles_take_second_derivatives(generator):
    """A gradient penalty through box mode's tiled products (eager autograd) against the float64 reference."""
    randn = lambda: torch.randn(2, 5, 6, 2, 4, generator=generator, dtype=torch.float64)
    leaves64 = [randn().requires_grad_() for _ in range(3)]
    leaves = [x.detach().float().requires_grad_() for x in leaves64]
    grads = []
    for xs, backend in ((leaves64, "reference"), (leaves, "torch")):
        y = lightnet_scan(*xs, mode="box", backend=backend)
        (dq,) = torch.autograd.grad(y.sum(), xs[0], create_graph=True)
        grads.append(torch.autograd.grad(dq.square().sum(), xs[1])[0])
    assert relative_error(grads[1], grads[0]) < 1e-5
