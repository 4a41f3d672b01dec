"""Box attention's Triton kernels (mdlrnn.kernels.box_attention) against the torch tiled products in float64:
odd grids, one-row and one-column grids, grids off the strip and tile edges, several strips and tiles (edges
patched small), the reversed box, strided and half-precision inputs, state blocks split over channels and
values, and TF32 products."""

import pytest
import torch

from mdlrnn.ops.lightnet import tiles
from mdlrnn.testing import relative_error

pytest.importorskip("triton")
from mdlrnn.kernels.box_attention import box_attention_triton  # noqa: E402


@pytest.fixture
def device(kernel_device):
    return kernel_device


@pytest.fixture(params=[(16, 16), (4, 3)], ids=["edges16", "edges4x3"])
def edges(request, monkeypatch):
    """Strips and tiles of the default 16, and of 4 rows and 3 columns, so that small grids have many of both."""
    monkeypatch.setattr(tiles, "STRIP", request.param[0])
    monkeypatch.setattr(tiles, "TILE", request.param[1])
    return request.param


def _inputs(shape, features, generator):
    query, keys = (torch.randn(*shape, generator=generator, dtype=torch.float64) for _ in range(2))
    return query, keys, torch.randn(*shape[:-1], features, generator=generator, dtype=torch.float64)


def _error(inputs, device, flip, **options):
    reference = tiles.box_attention(*inputs, flip=flip)
    out = box_attention_triton(*(x.float().to(device) for x in inputs), flip=flip, **options)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    return relative_error(out, reference)


@pytest.mark.parametrize("grid", [(7, 9), (18, 5), (1, 11), (11, 1), (17, 20), (2, 2)], ids=str)
@pytest.mark.parametrize("flip", [False, True], ids=["box", "reversed"])
def test_matches_torch_tiles(grid, flip, edges, generator, device):
    inputs = _inputs((2, *grid, 2, 6), 5, generator)
    assert _error(inputs, device, flip) < 1e-5


def test_state_blocks_split_channels_and_values(edges, generator, device):
    """70 channels and 40 values: the state kernel's blocks of 32 split both, the output kernel's the values."""
    inputs = _inputs((1, 9, 8, 1, 70), 40, generator)
    assert _error(inputs, device, False) < 1e-5
    assert _error(inputs, device, True) < 1e-5


@pytest.mark.parametrize("channels,block", [(128, 32), (256, 16)], ids=["channels128", "channels256"])
def test_output_blocks_fit_small_shared_memory(channels, block, generator, device, monkeypatch):
    """On a GPU with 99 KiB of shared memory per block (monkeypatched; sm_86, sm_89) the output kernel takes fewer
    values per program at 128 and 256 channels (the defaults need 152 and 176 KiB); same results."""
    import mdlrnn.kernels.box_attention as kernel

    monkeypatch.setattr(kernel, "shared_memory", lambda device: 99 * 1024)
    assert kernel._output_blocks(channels, 64, torch.device(device))[0] == block
    inputs = _inputs((1, 5, 6, 1, channels), 40, generator)
    assert _error(inputs, device, False) < 1e-5
    assert _error(inputs, device, True) < 1e-5


def test_strided_and_half_inputs(generator, device, monkeypatch):
    monkeypatch.setattr(tiles, "STRIP", 4)
    monkeypatch.setattr(tiles, "TILE", 4)
    query, keys, values = _inputs((1, 10, 9, 3, 8), 6, generator)
    reference = tiles.box_attention(query, keys, values)
    strided = [x.to(device).transpose(1, 2).contiguous().transpose(1, 2) for x in (query, keys, values)]
    assert relative_error(box_attention_triton(*(x.float() for x in strided)), reference) < 1e-5
    heads_first = [x.float().to(device).permute(0, 3, 1, 2, 4).contiguous().permute(0, 2, 3, 1, 4)
                   for x in (query, keys, values)]
    assert relative_error(box_attention_triton(*heads_first), reference) < 1e-5
    rounded = [x.to(torch.bfloat16) for x in (query, keys, values)]
    out = box_attention_triton(*(x.to(device) for x in rounded), precision="tf32")
    assert relative_error(out, tiles.box_attention(*(x.double() for x in rounded))) < 3e-3


def test_empty_grid(device):
    query = torch.zeros(2, 0, 5, 1, 4, device=device)
    assert box_attention_triton(query, query, torch.zeros(2, 0, 5, 1, 3, device=device)).shape == (2, 0, 5, 1, 3)


def test_float64_default_dtype(generator, device, monkeypatch):
    """The state buffers are float32 whatever torch's default dtype (float64 here made them float64 once)."""
    monkeypatch.setattr(tiles, "STRIP", 4)
    monkeypatch.setattr(tiles, "TILE", 3)
    inputs = _inputs((1, 9, 8, 2, 4), 3, generator)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert _error(inputs, device, False) < 1e-5
    finally:
        torch.set_default_dtype(default)


def test_errors(device):
    query = torch.zeros(1, 3, 3, 1, 4, device=device)
    with pytest.raises(ValueError, match="one shape"):
        box_attention_triton(query, torch.zeros(1, 3, 3, 1, 5, device=device), query)
    with pytest.raises(ValueError, match="one shape"):
        box_attention_triton(query, query, torch.zeros(1, 3, 2, 1, 4, device=device))
    wide = torch.zeros(1, 3, 3, 1, 257, device=device)
    with pytest.raises(ValueError, match="at most 256 channels"):
        box_attention_triton(wide, wide, query)
