import pytest
import torch

from mdlrnn.ops import grid_scan
from mdlrnn.testing import grid_inputs, relative_error

NAMES = ("q", "k", "v", "source", "transition", "mark", "direct")

SIZES = [
    (1,), (2,), (7,), (64,), (131,),                      # 1D: chunk edge cases, prime, off the chunk grid
    (1, 1), (1, 9), (9, 1), (2, 2), (5, 7), (13, 11), (17, 6),  # 2D: 1xN, Nx1, odd, prime
    (1, 1, 1), (3, 1, 4), (3, 4, 5), (2, 5, 3),            # 3D
]


def run_both(inputs, device="cpu", **kwargs):
    """Reference on the CPU, torch backend on `device`; outputs and gradients of every input."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
    outs, grads = [], []
    weight = None
    for backend, where in (("reference", "cpu"), ("torch", device)):
        args = {k: (leaves[k].to(where) if k in leaves else None) for k in NAMES}
        y = grid_scan(**args, backend=backend, **kwargs).cpu()
        weight = torch.randn_like(y) if weight is None else weight
        grads.append(torch.autograd.grad((y * weight).sum(), list(leaves.values()), allow_unused=True, materialize_grads=True))
        outs.append(y)
    return outs, grads, list(leaves)


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("direct", [True, False])
def test_torch_matches_reference_float64(sizes, direct, generator, device):
    inputs = grid_inputs(2, sizes, 3, 4, 5, generator=generator, direct=direct)
    (ref, out), (g_ref, g_out), names = run_both(inputs, device)
    assert out.shape == ref.shape == (2, *sizes, 3, 5)
    assert relative_error(out, ref) < 1e-12
    for name, a, b in zip(names, g_out, g_ref):
        assert relative_error(a, b) < 1e-12, name


@pytest.mark.parametrize("sizes", [(37,), (11, 13), (3, 5, 4)], ids=str)
def test_float32_matches_float64_reference(sizes, generator, device):
    torch.backends.cuda.matmul.allow_tf32 = False
    inputs = grid_inputs(2, sizes, 2, 8, 8, generator=generator)
    ref = grid_scan(**inputs, backend="reference")
    out = grid_scan(**{k: v.float().to(device) for k, v in inputs.items()}, backend="torch")
    assert out.dtype == torch.float32
    assert relative_error(out, ref) < 1e-5


def test_scale_and_auto(generator):
    inputs = grid_inputs(1, (4, 6), 2, 3, 3, generator=generator)
    ref = grid_scan(**inputs, scale=0.7, backend="reference")
    assert relative_error(grid_scan(**inputs, scale=0.7), ref) < 1e-12
    default = grid_scan(**inputs, backend="torch")
    assert relative_error(default, grid_scan(**inputs, scale=3**-0.5, backend="torch")) < 1e-14


@pytest.mark.parametrize("sizes", [(11,), (5, 6), (3, 2, 3)], ids=str)  # several tiles each
def test_gradcheck(sizes, generator):
    inputs = grid_inputs(1, sizes, 2, 2, 3, generator=generator)
    leaves = [inputs[k].requires_grad_() for k in NAMES]
    fn = lambda *xs: grid_scan(*xs, backend="torch")
    assert torch.autograd.gradcheck(fn, leaves)


def test_half_precision_accumulates_in_float32(generator):
    low = {k: v.bfloat16() for k, v in grid_inputs(1, (9, 10), 2, 16, 16, generator=generator).items()}
    inputs = {k: v.double() for k, v in low.items()}
    ref = grid_scan(**inputs, backend="reference")
    out = grid_scan(**low, backend="torch")
    assert out.dtype == torch.bfloat16
    assert relative_error(out, ref) < 1e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = grid_scan(**{k: v.float() for k, v in inputs.items()})
    assert auto.dtype == torch.float32 and relative_error(auto, ref) < 1e-5


def test_large_grid_stays_finite_float32():
    """128 x 128 with transitions whose absolute sums are 1: states stay bounded forward and backward."""
    gen = torch.Generator().manual_seed(0)
    inputs = grid_inputs(1, (128, 128), 1, 8, 8, generator=gen, dtype=torch.float32)
    t = torch.randn(inputs["transition"].shape, generator=gen)
    inputs["transition"] = t / t.abs().sum(-2, keepdim=True)  # sum_a |T[p, a, b]| = 1 for each entering b
    inputs["source"] = torch.ones_like(inputs["source"])
    inputs["mark"] = torch.ones_like(inputs["mark"])
    leaves = {k: v.requires_grad_() for k, v in inputs.items()}
    y = grid_scan(**leaves)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    for name, x in leaves.items():
        assert torch.isfinite(x.grad).all(), name
