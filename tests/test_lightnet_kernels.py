"""LightNet's causal kernels (causal mode on any grid, box mode on 1D grids) against the float64 reference:
outputs and gradients across chunk and block edges, large logits, rotary angles, dtypes, strides, the custom
op registration and torch.compile."""

import pytest
import torch

from mdlrnn import lightnet_scan
from mdlrnn.testing import lightnet_errors, lightnet_errors_with_torch, projection_slice, relative_error

pytest.importorskip("triton")
from mdlrnn.kernels import lightnet as kernel  # noqa: E402


@pytest.fixture
def device(kernel_device):
    return kernel_device


def compare(shape, dv, generator, device, *, mode="causal", **options):
    return lightnet_errors(shape, dv, generator, device, mode=mode, **options)


@pytest.mark.parametrize("rows", [16, 32], ids=lambda n: f"rows{n}")
@pytest.mark.parametrize("length", [1, 2, 15, 17, 31, 33, 64, 65, 150], ids=lambda n: f"L{n}")
def test_float32_matches_reference(length, rows, generator, device, monkeypatch):
    """Chunks of 64 (150 positions cross two chunk edges) in blocks of 16 or 32 rows (two or four a chunk, so that
    the output and gradient kernels walk earlier and later blocks), lengths on and off both."""
    monkeypatch.setattr(kernel, "SUB", rows)
    errors = compare((2, length, 2, 8), 5, generator, device)
    assert max(errors.values()) < 1e-5, errors


def test_states_beyond_shared_memory_are_refused(generator, device, monkeypatch):
    """With half inputs, states above 128 x 64 take 128 KiB of the gradient kernel's shared memory: on a GPU with
    less (99 KiB, monkeypatched) backend='triton' says so instead of failing to launch; float32 inputs and states
    of 128 x 64 fit."""
    monkeypatch.setattr(kernel, "shared_memory", lambda device: 99 * 1024)
    q, k, v = (torch.randn(1, 20, 2, 128, generator=generator).to(device, torch.float16) for _ in range(3))
    with pytest.raises(ValueError, match="shared memory per block"):
        lightnet_scan(q, k, v, mode="causal", backend="triton")
    assert kernel.fits_shared_memory(128, 64, 2, q.device) and kernel.fits_shared_memory(128, 128, 4, q.device)


@pytest.mark.parametrize("chunk", [16, 32], ids=lambda n: f"chunk{n}")
def test_blocks_never_cross_chunks(chunk, generator, device, monkeypatch):
    """Chunks as short as a block or shorter than SUB: blocks shrink to the chunk (gradients of k and v went wrong
    when a block of 32 rows spanned two chunks of 16); a chunk that is not a power of two is refused."""
    monkeypatch.setattr(kernel, "CHUNK", chunk)
    errors = compare((2, 70, 2, 8), 5, generator, device)
    assert max(errors.values()) < 1e-5, errors
    with pytest.raises(ValueError, match="chunk: expected a power of two"):
        kernel._block_rows(8, 5, 24)


@pytest.mark.parametrize("blocks,tile", [(1, 64), (3, 2), (64, 4)], ids=lambda n: str(n))
def test_prefix_blocks_walk_and_join(blocks, tile, generator, device, monkeypatch):
    """The prefix kernels with 16 rows a step: one block walking all ten steps, three blocks of four steps whose
    summaries are joined two at a time, ten blocks of one step joined four at a time; logits spread so that
    the maxima rise inside and across blocks."""
    monkeypatch.setattr(kernel, "PREFIX_ROWS", 16)
    monkeypatch.setattr(kernel, "MAX_PREFIX_BLOCKS", blocks)
    monkeypatch.setattr(kernel, "CARRY_TILE", tile)
    errors = compare((1, 150, 2, 8), 5, generator, device, spread=30.0)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("mode,sizes", [("causal", (5, 7)), ("causal", (1, 9)), ("causal", (9, 1)),
                                        ("causal", (2, 3, 4)), ("box", (19,))], ids=str)
@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_grids_and_rotary_angles(mode, sizes, rotary, generator, device):
    """Causal mode flattens any grid; box mode on a 1D grid is causal mode; angles double the channels."""
    errors = compare((2, *sizes, 3, 6), 7, generator, device, mode=mode, rotary=rotary)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("spread", [30.0, 300.0])
def test_large_logits(spread, generator, device):
    """Logits far beyond exp's float32 range: the running maxima keep every factor <= 1, finite and exact.
    At spread 300 dk (a nearly saturated softmax's gradient: terms of logit size cancel) is held to three times the
    float32 torch path's error on the same inputs (1e-6 to 1e-4 over seeds)."""
    errors, torch_errors = lightnet_errors_with_torch((1, 70, 2, 16), 16, generator, device, mode="causal",
                                                      spread=spread)
    assert errors.pop("k") < max(1e-5, 3 * torch_errors["k"]), (errors, torch_errors)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs(dtype, generator, device):
    errors = compare((2, 40, 2, 16), 16, generator, device, dtype=dtype)
    assert max(errors.values()) < 1e-2, errors


def test_strided_inputs(generator, device):
    """Slices of a fused projection and a transposed v: read in place (v) or through one float32 copy (q, k)."""
    errors = compare((2, 33, 2, 8), 8, generator, device,
                     transform=lambda x: projection_slice(x, (1, 2)))
    assert max(errors.values()) < 1e-5, errors


def test_heads_of_128_channels(generator, device):
    """The widest heads one program holds: Dk = 64 with angles (128 channels), Dv = 128."""
    errors = compare((1, 20, 1, 64), 128, generator, device, rotary=True)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
def test_custom_op_registration(rotary, generator, device):
    randn = lambda *s: torch.randn(*s, generator=generator).to(device)
    angles = randn(1, 20, 2, 4) if rotary else None
    args = (randn(1, 20, 2, 4).requires_grad_(), randn(1, 20, 2, 4).requires_grad_(), randn(1, 20, 2, 3).requires_grad_(),
            angles, 0.5, 16, "ieee")
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.mdlrnn.lightnet_causal, args, test_utils=checks)
    _, qp, kp, m, z, states = kernel.lightnet_causal(*(x.detach() if torch.is_tensor(x) else x for x in args))
    torch.library.opcheck(torch.ops.mdlrnn.lightnet_causal_backward,
                          (qp, kp, m, z, args[2].detach(), angles, states, randn(1, 20, 2, 3), 0.5, 16, "ieee"),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles_without_graph_breaks(generator, device):
    q, k, v = (torch.randn(2, 24, 2, 4, generator=generator).to(device).requires_grad_() for _ in range(3))
    scan = torch.compile(lambda *xs: lightnet_scan(*xs, mode="causal", backend="triton"), fullgraph=True,
                         backend="aot_eager")
    out = scan(q, k, v)
    out.sum().backward()
    assert relative_error(out, lightnet_scan(q, k, v, mode="causal", backend="torch")) < 1e-5


def test_auto_takes_the_kernels_on_cuda_only(generator, device, monkeypatch):
    calls = []
    run = kernel.lightnet_causal_triton
    monkeypatch.setattr(kernel, "lightnet_causal_triton", lambda *a, **kw: calls.append(1) or run(*a, **kw))
    q = torch.randn(1, 6, 1, 4, generator=generator).to(device)
    lightnet_scan(q, q, q, mode="causal")
    assert len(calls) == (1 if device.type == "cuda" else 0)


def test_errors(generator, device):
    q = torch.randn(1, 3, 4, 2, 4, generator=generator).to(device)
    wide = torch.randn(1, 5, 1, 65, generator=generator).to(device)
    with pytest.raises(ValueError, match="130 channels"):
        lightnet_scan(wide, wide, wide, mode="causal", angles=wide, backend="triton")
    with pytest.raises(TypeError, match="computes in float32; got float64"):
        lightnet_scan(q.double(), q.double(), q.double(), mode="causal", backend="triton")


def test_gradient_of_the_angles(generator, device):
    """Learned rotary angles: their gradient through the kernels matches the reference's."""
    randn = lambda *s: torch.randn(*s, generator=generator, dtype=torch.float64)
    q, k, v, angles = randn(2, 37, 2, 6), 3 * randn(2, 37, 2, 6), randn(2, 37, 2, 5), 3 * randn(2, 37, 2, 6)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, angles)]
    leaves = [x.float().to(device).requires_grad_() for x in (q, k, v, angles)]
    ref = lightnet_scan(*ref_leaves[:3], mode="causal", angles=ref_leaves[3], backend="reference")
    out = lightnet_scan(*leaves[:3], mode="causal", angles=leaves[3], backend="triton")
    weight = randn(*ref.shape)
    (ref * weight).sum().backward()
    (out * weight.to(device, out.dtype)).sum().backward()
    for name, a, b in zip(("q", "k", "v", "angles"), leaves, ref_leaves):
        assert relative_error(a.grad, b.grad) < 1e-5, name
