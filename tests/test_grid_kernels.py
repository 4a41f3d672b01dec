"""The Triton kernels of grid_scan (1D grids) against the float64 reference: outputs, every gradient, dtypes,
strides, chunk edges, zero and negative gates, torch.library registration, errors."""

import pytest
import torch

from mdlrnn import grid_scan, kernels
from mdlrnn.testing import grid_inputs, relative_error

NAMES = ("q", "k", "v", "source", "transition", "mark", "direct")

pytest.importorskip("triton")
from mdlrnn.kernels import grid1d  # noqa: E402


@pytest.fixture
def device(kernel_device):
    return kernel_device


def signed_inputs(batch, length, heads, dk, dv, generator, direct=True):
    """grid_inputs with transitions over (-1, 1), some exactly zero and some negative."""
    inputs = grid_inputs(batch, (length,), heads, dk, dv, generator=generator, direct=direct)
    t = torch.tanh(2 * torch.randn(inputs["transition"].shape, generator=generator, dtype=torch.float64))
    t[..., ::7, :, :, :] = 0.0
    inputs["transition"] = t
    return inputs


def compare(inputs, device, dtype=torch.float32, chunk=None, **kwargs):
    """Relative errors of the kernels' output and of every gradient against the float64 reference."""
    ref_leaves = {k: x.clone().requires_grad_() for k, x in inputs.items() if x is not None}
    leaves = {k: x.to(device, dtype).requires_grad_() for k, x in inputs.items() if x is not None}
    ref = grid_scan(**{k: ref_leaves.get(k) for k in NAMES}, backend="reference", **kwargs)
    args = [leaves.get(k) for k in NAMES]
    if chunk is None:
        out = grid_scan(*args, backend="triton", **kwargs)
    else:
        out = grid1d.grid_scan_triton(*args, kwargs.get("scale", inputs["q"].shape[-1] ** -0.5), chunk=chunk)
    assert out.dtype == (dtype if chunk is None else torch.float32) and out.device.type == device.type
    weight = torch.randn(ref.shape, dtype=torch.float64)
    (ref * weight).sum().backward()
    (out * weight.to(device, out.dtype)).sum().backward()
    errors = {"y": relative_error(out, ref)}
    for name, leaf in leaves.items():  # the reference leaves a gate it never reads (T on a 1-long grid) without grad
        expected = ref_leaves[name].grad
        errors[name] = relative_error(leaf.grad, torch.zeros_like(ref_leaves[name]) if expected is None else expected)
    return errors


@pytest.mark.parametrize("length", [1, 2, 17, 64, 65, 131], ids=lambda n: f"L{n}")
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "no_direct"])
def test_float32_matches_reference(length, direct, generator, device):
    errors = compare(signed_inputs(2, length, 2, 8, 12, generator, direct), device)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("dims", [(5, 7), (16, 16), (33, 20)], ids=str)
def test_many_chunks_and_odd_head_sizes(dims, generator, device, monkeypatch):
    """Chunks of 16 so that small sequences cross many chunk borders; head sizes off the block grid; outputs
    poisoned with NaN first, so every element must be written."""
    monkeypatch.setattr(kernels, "POISON", True)
    errors = compare(signed_inputs(2, 53, 3, *dims, generator), device, chunk=16, scale=0.4)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs(dtype, generator, device):
    inputs = grid_inputs(2, (70,), 2, 16, 16, generator=generator)
    rounded = {k: x.to(dtype).double() for k, x in inputs.items()}  # the reference sees what the kernels see
    errors = compare(rounded, device, dtype=dtype)
    assert max(errors.values()) < 1e-2, errors


def test_strided_inputs(generator, device):
    """q, k as slices of one fused projection (row stride 3D, read in place) and v with a last stride of H."""
    batch, length, heads, d = 2, 40, 2, 8
    fused = torch.randn(batch, length, heads, 3 * d, generator=generator, dtype=torch.float64)
    v_transposed = torch.randn(batch, length, d, heads, generator=generator, dtype=torch.float64)
    inputs = dict(grid_inputs(batch, (length,), heads, d, d, generator=generator), q=fused[..., :d],
                  k=fused[..., d : 2 * d], v=v_transposed.transpose(-1, -2))
    ref = grid_scan(**inputs, backend="reference")
    fused, v_transposed = fused.float().to(device), v_transposed.float().to(device)
    args = dict({n: x.float().to(device) for n, x in inputs.items()}, q=fused[..., :d], k=fused[..., d : 2 * d],
                v=v_transposed.transpose(-1, -2))
    assert not args["q"].is_contiguous() and args["v"].stride(-1) == heads
    assert relative_error(grid_scan(**args, backend="triton"), ref) < 1e-5


def test_long_chain_stays_finite(device):
    """Gates near one in magnitude, alternating sign, over many chunks: outputs and gradients finite."""
    gen = torch.Generator().manual_seed(0)
    length = 4096 if device.type == "cuda" else 700
    inputs = grid_inputs(1, (length,), 1, 16, 16, generator=gen, dtype=torch.float32)
    inputs["transition"] = torch.where(torch.rand(inputs["transition"].shape, generator=gen) < 0.5, -1.0, 1.0) * 0.999
    leaves = {k: x.to(device).requires_grad_() for k, x in inputs.items()}
    y = grid_scan(**leaves, backend="triton")
    y.square().mean().backward()
    assert torch.isfinite(y).all()
    for name, x in leaves.items():
        assert torch.isfinite(x.grad).all(), name


def test_custom_op_registration(generator, device):
    """torch.library's own checks: schema, fake (meta) implementation, autograd registration."""
    inputs = grid_inputs(1, (20,), 2, 8, 8, generator=generator, dtype=torch.float32)
    q, k, v = (inputs[n].to(device).requires_grad_() for n in "qkv")
    gates = [inputs[n].to(device).reshape(1, 20, 2).contiguous().requires_grad_() for n in ("source", "transition", "mark")]
    direct = inputs["direct"].to(device).requires_grad_()
    torch.library.opcheck(torch.ops.mdlrnn.grid_scan_1d, (q, k, v, *gates, direct, 0.3, 16),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_compiles_without_graph_breaks(generator, device):
    inputs = {k: x.float().to(device) for k, x in grid_inputs(1, (24,), 2, 8, 8, generator=generator).items()}
    scan = torch.compile(lambda **kw: grid_scan(**kw, backend="triton"), fullgraph=True, backend="aot_eager")
    assert relative_error(scan(**inputs), grid_scan(**inputs, backend="triton")) < 1e-6


def test_auto_and_errors(generator, device):
    line = grid_inputs(1, (5,), 1, 4, 4, generator=generator)
    with pytest.raises(TypeError, match="float32"):
        grid_scan(**{k: x.to(device) for k, x in line.items()}, backend="triton")
    wide = grid_inputs(1, (5,), 1, 4, 130, generator=generator, dtype=torch.float32)
    with pytest.raises(ValueError, match="up to 128"):
        grid_scan(**{k: x.to(device) for k, x in wide.items()}, backend="triton")
    # on the CPU "auto" stays on the torch path, interpreter or not
    cpu = {k: x.float() for k, x in line.items()}
    assert torch.equal(grid_scan(**cpu), grid_scan(**cpu, backend="torch"))


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 per axis from 17 positions up, so that small grids cross many tile borders."""
    from mdlrnn.kernels import tiles

    monkeypatch.setattr(tiles, "WHOLE_GRID", 16)
    monkeypatch.setattr(tiles, "TILE_EDGE", 4)


# with and without the direct term on the small grid, once each on the others (CI time)
@pytest.mark.parametrize("sizes, direct", [((5, 7), True), ((5, 7), False), ((1, 9), True), ((9, 1), False),
                                           ((13, 11), True), ((1, 23), False), ((3, 4, 5), False)], ids=str)
def test_tile_kernels_match_reference(sizes, direct, generator, device, small_tiles, monkeypatch):
    """N >= 2 with backend='triton': the transfer (2D), read-out and exit kernels, every gradient, on grids
    off the tile grid and across tile borders; outputs poisoned with NaN first."""
    monkeypatch.setattr(kernels, "POISON", True)
    inputs = grid_inputs(2, sizes, 2, 4, 5, generator=generator, direct=direct)
    inputs["transition"] = torch.tanh(2 * torch.randn(inputs["transition"].shape, generator=generator, dtype=torch.float64))
    errors = compare(inputs, device)
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("sizes, tile", [((11, 9), (4, 3)), ((5, 13), (5, 4)), ((9, 2), (2, 2)), ((1, 40), (1, 16)),
                                        ((18, 18), (9, 9))], ids=str)
def test_across_tiles_kernels_match_the_torch_loop(sizes, tile, generator, device, monkeypatch):
    """mdlrnn.kernels.across (one program per group and feature block walking the tiles) against the torch loop over
    hyperplanes it replaces: the exit states, which hold the entering ones, dU and dA. Features off the block, E
    from 4 to 18 (blocks of 16 and 32 edges), one row of tiles; outputs poisoned with NaN first."""
    from mdlrnn.kernels import across
    from mdlrnn.ops.grid.chunk import TorchAcross
    from mdlrnn.ops.grid.plan import tile_plan

    monkeypatch.setattr(kernels, "POISON", True)

    plan = tile_plan(sizes, device, tile)
    tiles, border, size = plan.num_tiles, plan.num_border, plan.tile_size
    groups, features, width = 3, 37, size + border + 5
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(device)
    exits, local, d_entering = 0.5 * rand(tiles * groups, border, width), rand(tiles * groups, border, 1, features), \
        rand(tiles * groups, border, 1, features)
    a = exits[..., size:size + border].reshape(tiles, groups, border, border)
    entering = TorchAcross.states(local.view(tiles, groups, border, features).clone(), a, plan)
    d_local, d_a = TorchAcross.adjoint(d_entering.view_as(entering), a, entering, plan)
    states = across.states(local.clone(), exits, plan)
    source = across.sources(plan)[0].long()
    inside = (source >= 0)[:, None, :, None]
    # exit j of tile source[t, j] enters edge j of tile t
    gathered = states.view(tiles, groups, border, features)[source.clamp(min=0)[:, None, :],
                                                            torch.arange(groups, device=device)[None, :, None],
                                                            torch.arange(border, device=device)[None, None, :]]
    assert relative_error(torch.where(inside, gathered, 0.0), entering) < 1e-6
    d_local_k, d_a_k = across.adjoint(d_entering, states, exits, plan)
    assert relative_error(d_local_k.view_as(d_local), d_local) < 1e-6
    assert relative_error(d_a_k.view_as(d_a), d_a) < 1e-6


def test_tile_readout_needs_sources_for_several_tiles(device):
    """States stored per exit need the table of which tile each edge enters from; only one tile can go without."""
    from mdlrnn.kernels import tiles

    rows = tiles.Rows(torch.zeros(1, 2, 4, dtype=torch.int32, device=device), 2, 1, 1, 1, 8)
    with pytest.raises(ValueError, match="sources"):
        tiles._border_args(torch.zeros(2, 4, 3, 3, device=device), None, rows)


def test_tile_kernels_whole_grid_and_wide_heads(generator, device):
    """A small grid is one tile (no border states); head sizes off the block grid."""
    errors = compare(grid_inputs(1, (6, 11), 3, 24, 40, generator=generator), device, scale=0.3)
    assert max(errors.values()) < 1e-5, errors


def test_tile_shapes_of_2d_grids():
    """One tile up to 1024 positions and 32 per axis; beyond, tiles of up to 16 per axis, as even as can be."""
    from mdlrnn.kernels.tiles import TritonTiles

    assert TritonTiles.tile((14, 14)) == (14, 14) and TritonTiles.tile((32, 32)) == (32, 32)
    assert TritonTiles.tile((37, 29)) == (13, 15) and TritonTiles.tile((64, 64)) == (16, 16)
    assert TritonTiles.tile((1, 200)) == (1, 16)  # a long thin grid: no weight solve of 200 sequential steps


def test_tile_kernels_custom_op_registration(generator, device, small_tiles):
    from mdlrnn.kernels import grid2d, tiles  # noqa: F401  (registers the ops)

    rows, size, border = 3, 12, 7
    make = lambda *shape: torch.rand(*shape, generator=generator).to(device).requires_grad_()
    q, k, v = make(rows, size, 8), make(rows, size, 8), make(rows, size, 6)
    weights, entering, exits = make(rows, size, size + border), make(rows, border, 8, 6), make(rows, border, size + border)
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.mdlrnn.tile_readout, (q, k, v, weights, entering), test_utils=checks)
    torch.library.opcheck(torch.ops.mdlrnn.tile_exits, (k, v, exits), test_utils=checks)
    for sizes, orientations in [((3, 5), [0]), ((7, 6), [0, 1, 2, 3])]:  # one tile; four tiles of 4 x 3
        grid = grid_inputs(1, sizes, 1, 4, 3, generator=generator)
        count = len(orientations)  # gates (B, X, Y, O, H, ...)
        stack = lambda g: torch.stack([g] * count, 3).float().to(device).requires_grad_()
        q, k, v, direct = (grid[n].float().to(device).requires_grad_() for n in ("q", "k", "v", "direct"))
        args = (q, k, v, stack(grid["source"]), stack(grid["transition"]), stack(grid["mark"]), direct, 0.5, orientations)
        torch.library.opcheck(torch.ops.mdlrnn.grid_scan_2d, args, test_utils=checks)
    # the backward's fake gives contiguous gradients, as the op does, also for permuted inputs (inductor checks)
    q_permuted = q.detach().transpose(1, 2).contiguous().transpose(1, 2)
    y = torch.ops.mdlrnn.grid_scan_2d(*args)
    backward_args = (q_permuted, *args[1:7], torch.randn_like(y), 0.5, orientations)
    torch.library.opcheck(torch.ops.mdlrnn.grid_scan_2d_backward, backward_args, test_utils=("test_schema", "test_faketensor"))


def test_tile_kernels_read_strided_inputs_in_place(generator, device, small_tiles):
    """2D: q, k as slices of a fused projection, v with a last stride of H, source and direct as slices, mark as
    a permuted view (batch stride smallest): outputs and gradients of the tensors behind them as the reference's."""
    batch, sizes, heads, d = 2, (7, 6), 2, 4
    x = grid_inputs(batch, sizes, heads, d, d, generator=generator)
    storage = dict(
        fused=torch.cat([x["q"], x["k"], torch.randn(x["q"].shape, generator=generator, dtype=torch.float64)], -1),
        v_transposed=x["v"].transpose(-1, -2).contiguous(),
        source_wide=torch.cat([x["source"], torch.rand(x["source"].shape, generator=generator, dtype=torch.float64)], -1),
        mark_permuted=x["mark"].permute(1, 2, 0, 3, 4).contiguous(),
        direct_wide=torch.stack([x["direct"], torch.zeros_like(x["direct"])], -1),
        transition=x["transition"],
    )

    def scan(tensors, backend):
        args = dict(q=tensors["fused"][..., :d], k=tensors["fused"][..., d : 2 * d],
                    v=tensors["v_transposed"].transpose(-1, -2), source=tensors["source_wide"][..., :2],
                    mark=tensors["mark_permuted"].permute(2, 0, 1, 3, 4), direct=tensors["direct_wide"][..., 0],
                    transition=tensors["transition"])
        return grid_scan(**args, backend=backend)

    ref_leaves = {n: t.clone().requires_grad_() for n, t in storage.items()}
    leaves = {n: t.float().to(device).requires_grad_() for n, t in storage.items()}
    ref, out = scan(ref_leaves, "reference"), scan(leaves, "triton")
    weight = torch.randn(ref.shape, generator=generator, dtype=torch.float64)
    (ref * weight).sum().backward()
    (out * weight.to(device, out.dtype)).sum().backward()
    assert relative_error(out, ref) < 1e-5
    for name, leaf in leaves.items():
        assert relative_error(leaf.grad, ref_leaves[name].grad) < 1e-5, name


def test_nan_gate_propagates_like_the_reference(generator, device):
    """A NaN transition poisons every later output, as in the recurrence; it must not read as a zero gate."""
    inputs = grid_inputs(1, (10,), 1, 4, 4, generator=generator)
    inputs["transition"][0, 3] = float("nan")
    ref = grid_scan(**inputs, backend="reference")
    out = grid_scan(**{k: x.float().to(device) for k, x in inputs.items()}, backend="triton").cpu()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(ref[:, 4:]).all()


def test_tile_kernels_refuse_double_backward(generator, device, small_tiles):
    """Several tiles (small_tiles): a backward that records a graph raises at once (tests/test_double_backward.py
    covers every op)."""
    inputs = {k: x.float().to(device).requires_grad_() for k, x in grid_inputs(1, (5, 6), 1, 2, 2, generator=generator).items()}
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(grid_scan(**inputs, backend="triton").sum(), inputs["q"], create_graph=True)


def test_tile_kernels_half_precision(generator, device, small_tiles):
    inputs = grid_inputs(2, (9, 7), 2, 8, 8, generator=generator)
    rounded = {k: x.half().double() for k, x in inputs.items()}  # the reference sees what the kernels see
    errors = compare(rounded, device, dtype=torch.float16)
    assert max(errors.values()) < 1e-2, errors


def test_tile_readout_half_inputs_in_blocks_of_128(generator, device):
    """The forward read-out with half inputs takes blocks of 128 queries (where shared memory allows): against
    its formula in float64 on 156 positions (a full and a partial block), with entering border states and the
    weights of wavefront order (zero above the diagonal). The interpreter has no bfloat16: float16 here."""
    from mdlrnn.kernels import tiles

    rows, size, border, dk, dv = 2, 156, 25, 8, 12
    f64 = dict(generator=generator, dtype=torch.float64)
    q, k, v = (torch.randn(rows, size, d, **f64).half().double() for d in (dk, dk, dv))
    weights = torch.randn(rows, size, size + border, **f64)
    weights[..., :size] = weights[..., :size].tril()
    entering = torch.randn(rows, border, dk, dv, **f64)
    expected = (q @ k.mT * weights[..., :size]) @ v + torch.einsum("rpj,rpk,rjkv->rpv", weights[..., size:], q, entering)
    half = [x.to(device, torch.float16) for x in (q, k, v)]
    if tiles._readout_blocks(half[0], has_border=True) != (128, 8):
        pytest.skip("this GPU's shared memory takes the read-out's blocks of 64")
    y = tiles.tile_readout(*half, weights.to(device, torch.float32), entering.to(device, torch.float32))
    assert relative_error(y, expected) < 1e-2


def test_border_adjoints_half_inputs_in_blocks_of_128(generator, device):
    """The queries' adjoint and the exits' adjoint with half inputs take blocks of 128 where border states enter or
    leave (where shared memory allows): every gradient of the read-out and of the exit states against autograd
    of their formulas in float64 on 156 positions (a full and a partial block). float16: see above."""
    from mdlrnn.kernels import tiles

    rows, size, border, dk, dv = 2, 156, 25, 8, 12
    f64 = dict(generator=generator, dtype=torch.float64)
    q, k, v = (torch.randn(rows, size, d, **f64).half().double().requires_grad_() for d in (dk, dk, dv))
    weights = torch.randn(rows, size, size + border, **f64)
    weights[..., :size] = weights[..., :size].tril()
    weights.requires_grad_()
    entering = torch.randn(rows, border, dk, dv, **f64, requires_grad=True)
    exits = torch.randn(rows, border, size + border, **f64, requires_grad=True)
    dy, du = torch.randn(rows, size, dv, **f64), torch.randn(rows, border, dk, dv, **f64)
    half = [x.detach().to(device, torch.float16) for x in (q, k, v)]
    if tiles._border_blocks(half[0], half[2]) != (128, 8):
        pytest.skip("this GPU's shared memory takes the adjoints' blocks of 64")
    f32 = lambda x: x.detach().to(device, torch.float32)

    y = (q @ k.mT * weights[..., :size]) @ v + torch.einsum("rpj,rpk,rjkv->rpv", weights[..., size:], q, entering)
    expected = list(torch.autograd.grad(y, (q, k, v, weights, entering), dy))
    got = tiles.tile_readout_backward(*half, f32(weights), f32(entering), f32(dy))
    defined = torch.ones(size, size + border, dtype=torch.bool).tril()  # W above the diagonal is zero, its
    defined[:, size:] = True  # gradient unused (the kernels' tile blocks compute some of it)
    got[3], expected[3] = got[3].cpu()[:, defined], expected[3][:, defined]
    for name, g, e in zip(("q", "k", "v", "weights", "entering"), got, expected):
        assert relative_error(g, e) < 1e-2, name

    u = torch.einsum("res,rsk,rsv->rekv", exits[..., :size], k, v)
    expected = torch.autograd.grad(u, (k, v, exits), du)
    got = tiles.tile_exits_backward(half[1], half[2], f32(exits), f32(du))
    for name, g, e in zip(("k", "v", "exits"), got, expected):
        assert relative_error(g, e) < 1e-2, name


def test_plstm1d_layer_compiles_without_graph_breaks(device):
    """A whole pLSTM layer (two orientations, projections, gates) on the 1D kernels, under fullgraph compile."""
    from mdlrnn.layers import PLSTM1D

    layer = PLSTM1D(32, 2, backend="triton").to(device)
    x = torch.randn(2, 20, 32, device=device, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    assert relative_error(y, layer(x)) < 1e-6 and torch.isfinite(x.grad).all()


def test_plstm2d_layer_compiles_without_graph_breaks(device, small_tiles):
    """A whole 2D pLSTM layer (four orientations) on the tile kernels, with border states, under fullgraph compile."""
    from mdlrnn.layers import PLSTM2D

    layer = PLSTM2D(8, 1, backend="triton").to(device)
    x = torch.randn(1, 5, 5, 8, device=device, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.square().sum().backward()
    assert relative_error(y, layer(x)) < 1e-6 and torch.isfinite(x.grad).all()


def test_tile_kernels_backward_under_autocast(generator, device, small_tiles):
    """Backward called inside autocast (as training loops do) keeps the op's float32 steps in float32."""
    inputs = {k: x.float().to(device).requires_grad_() for k, x in grid_inputs(1, (6, 5), 2, 4, 4, generator=generator).items()}
    y = grid_scan(**inputs, backend="triton")
    expected = torch.autograd.grad(y.square().sum(), list(inputs.values()))
    with torch.autocast(device.type, dtype=torch.float16):
        y = grid_scan(**inputs, backend="triton")
        grads = torch.autograd.grad(y.square().sum(), list(inputs.values()))
    assert all(relative_error(g, e) < 1e-6 for g, e in zip(grads, expected))


@pytest.mark.parametrize("mode", ["P", "D"])
def test_plstm2d_orientations_through_the_slot_table(mode, device, small_tiles):
    """PLSTM2D on the 2D op reads its four orientations through the kernels' slot table (no flipped copies):
    the same outputs and gradients as the torch path's flipped copies."""
    from mdlrnn.layers import PLSTM2D

    torch.manual_seed(0)
    layer = PLSTM2D(8, 2, mode=mode, backend="triton").to(device)
    x = torch.randn(1, 6, 5, 8, device=device, requires_grad=True)
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    layer.backend = "torch"
    y_ref = layer(x)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x, *layer.parameters()])
    assert relative_error(y, y_ref) < 1e-5
    assert all(relative_error(g, r) < 1e-5 for g, r in zip(grads, grads_ref))


def test_grid_scan_orientations_on_empty_inputs(device):
    from mdlrnn.ops.grid import grid_scan_orientations

    q = torch.zeros(0, 4, 5, 1, 8, device=device)
    gates = torch.zeros(0, 4, 5, 4, 1, 2, device=device)
    flips = ((False, False), (True, False), (False, True), (True, True))
    y = grid_scan_orientations(q, q, q, gates, gates[..., None].expand(*gates.shape, 2), gates, flips, backend="triton")
    assert y.shape == q.shape
