import itertools

import pytest
import torch

from mdlrnn.layers import MDTPE, PLSTM, PLSTM1D, PLSTM2D, PLSTM3D, LightNetAttention
from mdlrnn.ops import grid_scan
from mdlrnn.testing import relative_error


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_p_mode_transitions_out_of_each_edge_sum_to_at_most_one(ndim):
    layer = PLSTM(16, 2, ndim=ndim, mode="P")
    x = 100 * torch.randn(3, *[5] * ndim, 16)  # large activations saturate every gate
    source, transition, mark = layer.scan_gates(x)
    assert transition.abs().sum(-2).max() <= 1 + 1e-6  # sum over outgoing axes a, for each entering b
    assert (source >= 0).all() and (source <= 1).all() and (mark >= 0).all() and (mark <= 1).all()


@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_d_mode_is_a_multitree_with_bounded_transitions(ndim):
    layer = PLSTM(16, 2, ndim=ndim, mode="D")
    x = 100 * torch.randn(3, *[5] * ndim, 16)
    _, transition, _ = layer.scan_gates(x)
    below = torch.ones(ndim, ndim, dtype=torch.bool).tril(-1)  # a > b: a state never turns back
    assert (transition[..., below] == 0).all()
    assert transition.abs().max() <= 1


def test_d_mode_stays_bounded_on_a_large_grid():
    layer = PLSTM2D(16, 2, mode="D")
    with torch.no_grad():
        layer.gate.bias.fill_(10.0)  # every source, mark and transition at its maximum
    y = layer(torch.randn(1, 48, 48, 16))
    assert torch.isfinite(y).all()


def naive_plstm(layer: PLSTM, x: torch.Tensor) -> torch.Tensor:
    """One grid_scan per orientation on explicitly flipped inputs (reference backend)."""
    q, k, v = layer.qkv(x).unflatten(-1, (3, layer.num_heads, layer.head_dim)).unbind(-3)
    source, transition, mark = layer.scan_gates(x)
    y = 0
    for o, flips in enumerate(itertools.product((False, True), repeat=layer.ndim)):
        dims = [1 + a for a, f in enumerate(flips) if f]
        flip = lambda t: t.flip(dims) if dims else t
        gates = [flip(g.select(1 + layer.ndim, o)) for g in (source, transition, mark)]
        y = y + flip(grid_scan(flip(q), flip(k), flip(v), *gates, None, backend="reference"))
    y = y + torch.sigmoid(layer.direct)[:, None] * (q * k).sum(-1, keepdim=True) * v * layer.head_dim**-0.5
    return layer.proj(layer.norm(y).flatten(-2))


@pytest.mark.parametrize("cls, sizes", [(PLSTM1D, (7,)), (PLSTM2D, (3, 5)), (PLSTM3D, (2, 3, 2))])
@pytest.mark.parametrize("mode", ["P", "D"])
def test_fused_orientations_match_separate_scans(cls, sizes, mode):
    torch.manual_seed(0)
    layer = cls(12, 2, mode=mode).double()
    with torch.no_grad():
        layer.gate.weight.normal_(0, 0.5)
        layer.direct.fill_(0.5)
    x = torch.randn(2, *sizes, 12, dtype=torch.float64)
    assert relative_error(layer(x), naive_plstm(layer, x)) < 1e-10


@pytest.mark.parametrize("cls, sizes", [(PLSTM1D, (9,)), (PLSTM2D, (6, 7)), (PLSTM3D, (3, 4, 2))])
def test_plstm_gradients_reach_every_parameter(cls, sizes):
    layer = cls(16, 2)
    x = torch.randn(2, *sizes, 16, requires_grad=True)
    layer(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("mode", ["global", "causal", "box"])
@pytest.mark.parametrize("md_lrpe", [True, False])
def test_lightnet_attention(mode, md_lrpe):
    layer = LightNetAttention(16, 2, mode=mode, md_lrpe=md_lrpe)
    x = torch.randn(2, 4, 5, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_lightnet_box_is_causal_in_the_box():
    """Box mode: changing a position changes only outputs at positions >= it on every axis."""
    layer = LightNetAttention(8, 2, mode="box").double()
    x = torch.randn(1, 5, 6, 8, dtype=torch.float64)
    changed = x.clone()
    changed[0, 2, 3] += 1.0
    diff = (layer(changed) - layer(x)).abs().sum(-1)[0]
    ii, jj = torch.meshgrid(torch.arange(5), torch.arange(6), indexing="ij")
    assert (diff[~((ii >= 2) & (jj >= 3))] == 0).all()
    assert (diff[(ii >= 2) & (jj >= 3)] > 0).all()


def test_mdtpe_is_a_toeplitz_kernel_per_axis():
    torch.manual_seed(0)
    layer = MDTPE(8, 2, ndim=2).double()
    x = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    q, k, v = layer.qkv(x).unflatten(-1, (3, 2, 4)).unbind(-3)
    lam = torch.sigmoid(layer.decay)  # (axis, head)
    y = torch.zeros_like(q)
    for i, j in itertools.product(range(4), range(5)):
        for s in range(i + 1):  # along axis 0
            y[:, i, j] += lam[0, :, None] ** (i - s) * (q[:, i, j] * k[:, s, j]).sum(-1, keepdim=True) * v[:, s, j]
        for s in range(j + 1):  # along axis 1
            y[:, i, j] += lam[1, :, None] ** (j - s) * (q[:, i, j] * k[:, i, s]).sum(-1, keepdim=True) * v[:, i, s]
    expected = layer.proj(layer.norm(y * 4**-0.5).flatten(-2))
    assert relative_error(layer(x), expected) < 1e-12


def test_layer_errors():
    with pytest.raises(ValueError, match=r"`mode` must be 'P' or 'D'"):
        PLSTM2D(16, 2, mode="X")
    with pytest.raises(ValueError, match=r"`x` must have shape \(B, \*S, dim\) with 2 spatial axes and dim=16"):
        PLSTM2D(16, 2)(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"divisible by `num_heads`"):
        PLSTM2D(15, 2)


def test_lightnet_layer_errors():
    with pytest.raises(ValueError, match=r"LightNetAttention: `x` must have shape \(B, \*S, dim=16\)"):
        LightNetAttention(16, 2)(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"divisible by `num_heads`"):
        LightNetAttention(15, 2)
    with pytest.raises(ValueError, match=r"MDTPE: `x` must have shape \(B, \*S, dim=16\) with 2 spatial axes"):
        MDTPE(16, 2, ndim=2)(torch.randn(2, 5, 16))
