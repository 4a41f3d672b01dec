import pytest
import torch

from mdlrnn.ops import lightnet_scan
from mdlrnn.testing import relative_error

MODES = ["global", "causal", "box"]


def qkv(batch, sizes, heads, dk, dv, generator, dtype=torch.float64, spread=1.0):
    randn = lambda *s: torch.randn(batch, *sizes, heads, *s, generator=generator, dtype=dtype)
    return randn(dk), spread * randn(dk), randn(dv)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes", [(1,), (10,), (1, 1), (1, 6), (6, 1), (5, 7), (2, 3, 4)], ids=str)
def test_torch_matches_reference(mode, sizes, generator, device):
    leaves = [x.requires_grad_() for x in qkv(2, sizes, 2, 3, 4, generator)]
    outs, grads, weight = [], [], None
    for backend, where in (("reference", "cpu"), ("torch", device)):
        y = lightnet_scan(*(x.to(where) for x in leaves), mode=mode, backend=backend).cpu()
        if weight is None:
            weight = torch.randn(y.shape, generator=generator, dtype=y.dtype)
        outs.append(y)
        grads.append(torch.autograd.grad((y * weight).sum(), leaves))
    assert relative_error(outs[1], outs[0]) < 1e-12
    for name, a, b in zip("qkv", grads[1], grads[0]):
        assert relative_error(a, b) < 1e-12, name


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(mode, generator):
    leaves = [x.requires_grad_() for x in qkv(1, (3, 4), 2, 2, 3, generator)]
    assert torch.autograd.gradcheck(lambda *xs: lightnet_scan(*xs, mode=mode, backend="torch"), leaves)


@pytest.mark.parametrize("mode", MODES)
def test_large_logits_float32(mode, generator, device):
    """Key logits spread over [-80, 80]: float32 stays finite and matches the float64 reference."""
    torch.backends.cuda.matmul.allow_tf32 = False
    q, _, v = qkv(2, (9, 11), 2, 8, 8, generator)
    k = 160 * torch.rand(q.shape, generator=generator, dtype=torch.float64) - 80
    ref = lightnet_scan(q, k, v, mode=mode, backend="reference")
    leaves = [x.float().to(device).requires_grad_() for x in (q, k, v)]
    out = lightnet_scan(*leaves, mode=mode, backend="torch")
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < 1e-5
    out.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves)


@pytest.mark.parametrize("spread,tiled", [(58.0, True), (62.0, False)])
def test_box_paths_at_the_tiles_limit(spread, tiled, generator, device, monkeypatch):
    """2D box mode runs on tiled products while the logits of each channel spread by less than 60 from the first
    position (e^-58 still far inside float32), else on the grid scan with running maxima: float32 exact either way.
    Strips of 4 rows and tiles of 3 columns: every position has states above and left of its tile, whose sums
    span e^-58..1."""
    from mdlrnn.ops.lightnet import tiles

    monkeypatch.setattr(tiles, "STRIP", 4)
    monkeypatch.setattr(tiles, "TILE", 3)
    tiles_fit = tiles.tiles_fit
    torch.backends.cuda.matmul.allow_tf32 = False
    q, _, v = qkv(2, (9, 11), 2, 8, 8, generator)
    k = torch.rand(q.shape, generator=generator, dtype=torch.float64) * spread - spread / 2
    k[:, 0, 0] = -spread / 2
    k[:, -1, -1] = spread / 2
    assert tiles_fit(k) == tiled
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = lightnet_scan(*ref_leaves, mode="box", backend="reference")
    leaves = [x.float().to(device).requires_grad_() for x in (q, k, v)]
    out = lightnet_scan(*leaves, mode="box", backend="torch")
    assert relative_error(out, ref) < 1e-5
    weight = torch.randn(ref.shape, generator=generator, dtype=torch.float64)
    (ref * weight).sum().backward()
    (out * weight.to(device, out.dtype)).sum().backward()
    for name, a, b in zip("qkv", leaves, ref_leaves):  # the gradient of Z spans e^-58..1 here
        assert relative_error(a.grad, b.grad) < 1e-5, name


def test_box_mode_under_cuda_graph_capture_says_why_not(generator, monkeypatch):
    """Box mode picks its path on the host: inside a CUDA graph capture it raises a clear error, not an
    invalidated capture."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    q, k, v = qkv(1, (3, 4), 1, 4, 4, generator)
    with pytest.raises(RuntimeError, match="capture"):
        lightnet_scan(q, k, v, mode="box", backend="torch")


def test_causal_is_box_on_the_flattened_sequence(generator):
    q, k, v = qkv(1, (4, 5), 2, 3, 3, generator)
    causal = lightnet_scan(q, k, v, mode="causal")
    flat = lambda x: x.reshape(1, 20, 2, 3)
    box = lightnet_scan(flat(q), flat(k), flat(v), mode="box").reshape(causal.shape)
    assert relative_error(causal, box) < 1e-14


def test_bfloat16(generator):
    q, k, v = (x.bfloat16() for x in qkv(1, (8, 8), 2, 16, 16, generator))
    ref = lightnet_scan(q.double(), k.double(), v.double(), mode="box", backend="reference")
    out = lightnet_scan(q, k, v, mode="box")
    assert out.dtype == torch.bfloat16 and relative_error(out, ref) < 1e-2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes", [(7,), (4, 5), (2, 3, 3)], ids=str)
def test_rotary_angles_match_reference(mode, sizes, generator, device):
    q, k, v = qkv(2, sizes, 2, 4, 3, generator)
    angles = 3 * torch.randn(q.shape, generator=generator, dtype=torch.float64)
    leaves = [x.requires_grad_() for x in (q, k, v, angles)]
    outs, grads, weight = [], [], None
    for backend, where in (("reference", "cpu"), ("torch", device)):
        q_, k_, v_, a_ = (x.to(where) for x in leaves)
        y = lightnet_scan(q_, k_, v_, mode=mode, angles=a_, backend=backend).cpu()
        if weight is None:
            weight = torch.randn(y.shape, generator=generator, dtype=y.dtype)
        outs.append(y)
        grads.append(torch.autograd.grad((y * weight).sum(), leaves))
    assert relative_error(outs[1], outs[0]) < 1e-12
    for name, a, b in zip(("q", "k", "v", "angles"), grads[1], grads[0]):
        assert relative_error(a, b) < 1e-12, name


def test_zero_angles_change_nothing(generator):
    q, k, v = qkv(1, (3, 4), 2, 3, 3, generator)
    plain = lightnet_scan(q, k, v, mode="box")
    assert relative_error(lightnet_scan(q, k, v, mode="box", angles=torch.zeros(3, 4, 2, 3, dtype=q.dtype)), plain) < 1e-14
