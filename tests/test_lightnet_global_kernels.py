"""LightNet's global mode on its fused reduction (backend='triton') against the float64 reference: outputs and
the gradients of q, k, v and learned rotary angles across blocks, large logits, dtypes, strides, the custom
op registration and torch.compile."""

import pytest
import torch

from mdlrnn import lightnet_scan
from mdlrnn.testing import lightnet_errors, lightnet_errors_with_torch, projection_slice, relative_error

pytest.importorskip("triton")
from mdlrnn.kernels import lightnet_global as kernel  # noqa: E402


@pytest.fixture
def device(kernel_device):
    return kernel_device


def compare(shape, dv, generator, device, **options):
    return lightnet_errors(shape, dv, generator, device, mode="global", **options)


@pytest.mark.parametrize("sizes", [(1,), (63,), (150,), (5, 7), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_float32_matches_reference(sizes, rotary, generator, device):
    """One position, a block less one, blocks of 64 joined (150), and grids of any dimension (all positions)."""
    errors = compare((2, *sizes, 2, 6), 5, generator, device, rotary=rotary)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("spread", [30.0, 300.0])
def test_large_logits(spread, generator, device):
    """The blocks' maxima and their join in the frame of the largest keep every factor <= 1. At spread 300 each
    channel's softmax over 150 positions is one-hot to float32: dk, a difference of terms that agree far below
    float32's resolution, is noise on every path (1e-6 to 74 relative on the torch path over seeds) and is held
    to three times the float32 torch path's error on the same inputs."""
    errors, torch_errors = lightnet_errors_with_torch((1, 150, 2, 16), 16, generator, device, mode="global",
                                                      spread=spread)
    assert errors.pop("k") < max(1e-5, 3 * torch_errors["k"]), (errors, torch_errors)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs(dtype, generator, device):
    errors = compare((2, 70, 2, 16), 16, generator, device, dtype=dtype, rotary=True)
    assert max(errors.values()) < 1e-2, errors


def test_strided_inputs(generator, device):
    errors = compare((2, 33, 2, 8), 8, generator, device,
                     transform=lambda x: projection_slice(x, (1, 2)))
    assert max(errors.values()) < 1e-5, errors


def test_heads_of_128_channels(generator, device):
    errors = compare((1, 20, 1, 128), 128, generator, device, rotary=True)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_custom_op_registration(rotary, generator, device):
    randn = lambda *s: torch.randn(*s, generator=generator).to(device)
    angles = randn(1, 20, 2, 4) if rotary else None
    args = (*(randn(1, 20, 2, 4).requires_grad_() for _ in range(2)), randn(1, 20, 2, 3).requires_grad_(), angles,
            0.5, "ieee")
    torch.library.opcheck(torch.ops.mdlrnn.lightnet_global, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    _, m, z, kv = kernel.lightnet_global(*(x.detach() if torch.is_tensor(x) else x for x in args))
    torch.library.opcheck(torch.ops.mdlrnn.lightnet_global_backward,
                          (*(x.detach() for x in args[:3]), angles, m, z, kv, randn(1, 20, 2, 3), 0.5),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles_without_graph_breaks(generator, device):
    q, k, v = (torch.randn(2, 5, 4, 2, 4, generator=generator).to(device).requires_grad_() for _ in range(3))
    scan = torch.compile(lambda *xs: lightnet_scan(*xs, mode="global", backend="triton"), fullgraph=True,
                         backend="aot_eager")
    out = scan(q, k, v)
    out.sum().backward()
    assert relative_error(out, lightnet_scan(q, k, v, mode="global", backend="torch")) < 1e-5


def test_auto_keeps_the_torch_path(generator, device, monkeypatch):
    """"auto" does not take the fused reduction until it is timed on a GPU against the torch path."""
    calls = []
    run = kernel.lightnet_global_triton
    monkeypatch.setattr(kernel, "lightnet_global_triton", lambda *a, **kw: calls.append(1) or run(*a, **kw))
    q = torch.randn(1, 6, 1, 4, generator=generator).to(device)
    lightnet_scan(q, q, q, mode="global")
    assert not calls


def test_errors(generator, device):
    wide = torch.randn(1, 5, 1, 129, generator=generator).to(device)
    with pytest.raises(ValueError, match="Dk=129"):
        lightnet_scan(wide, wide, wide, mode="global", backend="triton")
