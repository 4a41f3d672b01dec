"""LightNet's box-mode kernels on 2D grids against the float64 reference: outputs and the gradients of q, k, v
and learned rotary angles on odd grids, large logits, dtypes, strides, programs splitting channels and values,
the custom op registration and torch.compile."""

import pytest
import torch

from mdlrnn import lightnet_scan
from mdlrnn.testing import lightnet_errors, lightnet_errors_with_torch, projection_slice, relative_error

pytest.importorskip("triton")
from mdlrnn.kernels import lightnet as causal_kernel  # noqa: E402
from mdlrnn.kernels import lightnet_box as kernel  # noqa: E402
from mdlrnn.ops.lightnet import tiles  # noqa: E402


@pytest.fixture
def device(kernel_device):
    return kernel_device


@pytest.fixture(params=["sweep", "tiles"])
def path(request, monkeypatch):
    """The op's two paths: tiled products (where one reference per channel is exact, as at these logits), in
    strips of 4 rows and tiles of 2 columns so that small grids have states above and left of their tiles, and
    the row sweeps with running maxima (forced)."""
    if request.param == "sweep":
        monkeypatch.setattr(kernel, "tiles_fit", lambda k: False)
    else:
        monkeypatch.setattr(tiles, "STRIP", 4)
        monkeypatch.setattr(tiles, "TILE", 2)
    return request.param


@pytest.fixture
def sweep(monkeypatch):
    monkeypatch.setattr(kernel, "tiles_fit", lambda k: False)


def compare(shape, dv, generator, device, **options):
    return lightnet_errors(shape, dv, generator, device, mode="box", **options)


@pytest.mark.parametrize("sizes", [(5, 7), (6, 3), (2, 2), (1, 9)], ids=str)
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_float32_matches_reference(sizes, rotary, path, generator, device):
    """Odd grids, both ways round (the sweep runs along the longer axis), rows off the power-of-two width; a grid
    with one axis of size 1 is causal mode and runs on the causal kernels."""
    errors = compare((2, *sizes, 1, 6), 5, generator, device, rotary=rotary)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("spread", [30.0, 300.0])
def test_large_logits(spread, generator, device):
    """Logits far beyond exp's float32 range: the sweeps' column and box maxima keep every factor <= 1. At
    spread 300 dk (a nearly saturated softmax's gradient: terms of logit size cancel) is held to three times the
    float32 torch path's error on the same inputs. The op takes the sweeps by itself here (at spread 30
    whenever the logits spread by 60 or more)."""
    errors, torch_errors = lightnet_errors_with_torch((1, 8, 9, 1, 16), 16, generator, device, mode="box",
                                                      spread=spread)
    assert errors.pop("k") < max(1e-5, 3 * torch_errors["k"]), (errors, torch_errors)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_programs_split_channels_and_values(rotary, sweep, generator, device, monkeypatch):
    """With a row state of 64 floats, a program holds a few channels and values: y, dv and dq, dk, the angles'
    gradient are sums of partial results over the programs of one (batch, head)."""
    monkeypatch.setattr(kernel, "STATE", 64)
    assert kernel._blocks(4, 16, 11, rotary, "c")[1] < 11 and kernel._blocks(4, 16, 11, rotary, "d")[0] < 16
    errors = compare((1, 3, 4, 1, 16), 11, generator, device, rotary=rotary)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs(dtype, path, generator, device):
    errors = compare((1, 4, 5, 2, 16), 16, generator, device, dtype=dtype)
    assert max(errors.values()) < 1e-2, errors


def test_strided_inputs(path, generator, device):
    """Slices of a fused projection and transposed layouts, read in place through their strides."""
    errors = compare((2, 4, 5, 1, 8), 8, generator, device,
                     transform=lambda x: projection_slice(x, (1, 3)))
    assert max(errors.values()) < 1e-5, errors


def test_heads_of_128_channels(path, generator, device):
    """The widest heads: Dk = 128 with angles, Dv = 128."""
    errors = compare((1, 2, 2, 1, 128), 128, generator, device, rotary=True)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
def test_custom_op_registration(rotary, transposed, path, generator, device):
    """Every opcheck check, on contiguous inputs and on the transposed views lightnet_box_triton passes for grids
    wider than tall (the saved weights must be contiguous like the fake's)."""
    turn = (lambda x: x.transpose(1, 2)) if transposed else (lambda x: x)
    randn = lambda *s: turn(torch.randn(*s, generator=generator).to(device))
    angles = randn(1, 4, 3, 2, 4) if rotary else None
    args = (*(randn(1, 4, 3, 2, 4).requires_grad_() for _ in range(2)), randn(1, 4, 3, 2, 3).requires_grad_(), angles, 0.5)
    torch.library.opcheck(torch.ops.mdlrnn.lightnet_box, args)  # every check, AOT dispatch included
    _, m, z = kernel.lightnet_box(*(x.detach() if torch.is_tensor(x) else x for x in args))
    torch.library.opcheck(torch.ops.mdlrnn.lightnet_box_backward,
                          (*(x.detach() for x in args[:3]), angles, m, z, randn(1, 4, 3, 2, 3), 0.5),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_compiles_without_graph_breaks(rotary, path, generator, device):
    """Under torch.compile the op runs both paths with their own backward: the sweeps', and the tiled products'
    written out (eagerly the tiled products run under autograd)."""
    randn = lambda *s: torch.randn(*s, generator=generator, dtype=torch.float64)
    leaves64 = [randn(2, 5, 4, 2, 4) for _ in range(3)] + ([3 * randn(2, 5, 4, 2, 4)] if rotary else [])
    leaves64 = [x.requires_grad_() for x in leaves64]
    leaves = [x.detach().float().to(device).requires_grad_() for x in leaves64]
    scan = torch.compile(lambda q, k, v, *a: lightnet_scan(q, k, v, mode="box", angles=a[0] if a else None,
                                                           backend="triton"), fullgraph=True, backend="aot_eager")
    out = scan(*leaves)
    ref = lightnet_scan(*leaves64[:3], mode="box", angles=leaves64[3] if rotary else None, backend="reference")
    weight = randn(*ref.shape)
    (out * weight.to(device, out.dtype)).sum().backward()
    (ref * weight).sum().backward()
    assert relative_error(out, ref) < 1e-5
    for name, a, b in zip(("q", "k", "v", "angles"), leaves, leaves64):
        assert relative_error(a.grad, b.grad) < 1e-5, name


def test_auto_takes_the_kernels_on_cuda_only(generator, device, monkeypatch):
    calls = []
    box, causal = kernel.lightnet_box_triton, causal_kernel.lightnet_causal_triton
    monkeypatch.setattr(kernel, "lightnet_box_triton", lambda *a, **kw: calls.append("box") or box(*a, **kw))
    monkeypatch.setattr(causal_kernel, "lightnet_causal_triton", lambda *a, **kw: calls.append("causal") or causal(*a, **kw))
    for sizes in ((3, 4), (1, 4)):
        q = torch.randn(1, *sizes, 1, 4, generator=generator).to(device)
        lightnet_scan(q, q, q, mode="box")
    assert calls == (["box", "causal"] if device.type == "cuda" else [])


def test_errors(generator, device):
    volume = torch.randn(1, 2, 3, 4, 1, 4, generator=generator).to(device)
    with pytest.raises(ValueError, match="box mode on 2D grids"):
        lightnet_scan(volume, volume, volume, mode="box", backend="triton")
    wide = torch.randn(1, 2, 3, 1, 129, generator=generator).to(device)
    with pytest.raises(ValueError, match="Dk=129"):
        lightnet_scan(wide, wide, wide, mode="box", backend="triton")
