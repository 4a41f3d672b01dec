"""Bad input gets a ValueError/TypeError naming the argument and what was expected."""

import sys

import pytest
import torch

from mdlrnn import DAG, dag_scan, grid_scan, kernels, lightnet_scan
from mdlrnn.testing import dag_inputs, grid_inputs


@pytest.fixture
def grid():
    return grid_inputs(2, (3, 4), 2, 5, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "name, shape, pattern",
    [
        ("k", (2, 3, 4, 2, 4), r"`k` must have the shape of `q`"),
        ("v", (2, 3, 5, 2, 6), r"`v` must have shape \(2, 3, 4, 2, 'Dv'\)"),
        ("source", (2, 3, 4, 2, 3), r"`source` must have shape \(B, \*S, H, N\) = \(2, 3, 4, 2, 2\)"),
        ("transition", (2, 3, 4, 2, 2), r"`transition` must have shape \(B, \*S, H, N, N\) = \(2, 3, 4, 2, 2, 2\)"),
        ("mark", (2, 3, 4, 2), r"`mark` must have shape \(B, \*S, H, N\)"),
        ("direct", (2, 3, 4, 2, 1), r"`direct` must have shape \(B, \*S, H\) = \(2, 3, 4, 2\)"),
    ],
)
def test_grid_shapes(grid, name, shape, pattern):
    grid[name] = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=pattern):
        grid_scan(**grid)


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("source", r"grid_scan_orientations: `source` must have shape \(B, \*S, O, H, N\) = \(2, 3, 4, 4, 2, 2\)"),
        ("transition", r"`transition` must have shape \(B, \*S, O, H, N, N\) = \(2, 3, 4, 4, 2, 2, 2\)"),
        ("mark", r"`mark` must have shape \(B, \*S, O, H, N\)"),
    ],
)
def test_grid_orientation_gate_shapes(grid, name, pattern):
    from mdlrnn.ops.grid import grid_scan_orientations

    flips = ((False, False), (True, False), (False, True), (True, True))
    gates = {g: torch.stack([grid[g]] * 4, 3) for g in ("source", "transition", "mark")}
    gates[name] = grid[name]  # without the orientation axis
    with pytest.raises(ValueError, match=pattern):
        grid_scan_orientations(grid["q"], grid["k"], grid["v"], **gates, orientations=flips)


def test_grid_dtypes_devices_backend(grid):
    with pytest.raises(TypeError, match=r"`source` must be a floating-point tensor"):
        grid_scan(**{**grid, "source": grid["source"].long()})
    with pytest.raises(TypeError, match=r"`q`, `k` and `v` must share a dtype"):
        grid_scan(**{**grid, "v": grid["v"].float()})
    with pytest.raises(TypeError, match=r"`mark` must be a torch.Tensor"):
        grid_scan(**{**grid, "mark": 1.0})
    with pytest.raises(ValueError, match=r"`transition` is on meta but `q` is on cpu"):
        grid_scan(**{**grid, "transition": grid["transition"].to("meta")})
    with pytest.raises(ValueError, match=r"`backend` must be one of 'auto', 'reference', 'torch', 'triton'; got 'cuda'"):
        grid_scan(**grid, backend="cuda")
    with pytest.raises(ValueError, match=r"at least one spatial axis"):
        grid_scan(*(torch.zeros(2, 3, 4) for _ in range(6)))


def test_grid_empty_axis_returns_empty():
    inputs = grid_inputs(2, (0, 4), 2, 3, 5)
    assert grid_scan(**inputs).shape == (2, 0, 4, 2, 5)


def test_dag_construction_errors():
    with pytest.raises(ValueError, match=r"cycle through node [123]\b"):
        DAG.from_edge_index(torch.tensor([[0, 1, 2, 3], [1, 2, 3, 1]]), 5)
    with pytest.raises(ValueError, match=r"self-loop at node 2"):
        DAG.from_edge_index(torch.tensor([[0, 2], [1, 2]]), 3)
    with pytest.raises(ValueError, match=r"node 7, outside \[0, num_nodes=3\)"):
        DAG.from_edge_index(torch.tensor([[0, 7], [1, 2]]), 3)
    with pytest.raises(ValueError, match=r"node -1, outside"):
        DAG.from_edge_index(torch.tensor([[0, -1], [1, 2]]), 3)
    with pytest.raises(ValueError, match=r"`edge_index` must have shape \(2, E\)"):
        DAG.from_edge_index(torch.tensor([[0, 1, 2]]), 3)
    with pytest.raises(TypeError, match=r"`edge_index` must be an integer tensor"):
        DAG.from_edge_index(torch.tensor([[0.0], [1.0]]), 3)
    with pytest.raises(ValueError, match=r"`num_nodes` must be a non-negative int"):
        DAG.from_edge_index(torch.tensor([[0], [1]]), -2)


def test_cycle_node_is_on_the_cycle():
    # 0 -> 1 -> 2 -> 3 -> 1 and 3 -> 4: only 1, 2, 3 are on the cycle; 4 is downstream of it
    edge_index = torch.tensor([[0, 1, 2, 3, 3], [1, 2, 3, 1, 4]])
    with pytest.raises(ValueError) as info:
        DAG.from_edge_index(edge_index, 5)
    assert int(str(info.value).rsplit(" ", 1)[1]) in {1, 2, 3}


def test_dag_scan_errors():
    graph = DAG.from_edge_index(torch.tensor([[0, 1, 0], [1, 2, 2]]), 3)
    inputs = dag_inputs(graph, 2, 3, 4)
    with pytest.raises(ValueError, match=r"`transition` must have shape \(P, H\) = \(1, 2\)"):
        dag_scan(**{**inputs, "transition": torch.zeros(3, 2, dtype=torch.float64)}, graph=graph)
    with pytest.raises(ValueError, match=r"Nn = graph.num_nodes = 3"):
        dag_scan(**{k: (v[:2] if k in "qkv" else v) for k, v in inputs.items()}, graph=graph)
    with pytest.raises(TypeError, match=r"`graph` must be a mdlrnn.ops.DAG"):
        dag_scan(**inputs, graph=graph.edge_index)
    with pytest.raises(ValueError, match=r"`graph` is on meta but `q` is on cpu"):
        dag_scan(**inputs, graph=graph.to("meta"))
    with pytest.raises(ValueError, match=r"`source` must have shape \(E, H\) = \(3, 2\)"):
        dag_scan(**{**inputs, "source": torch.zeros(3, 1, dtype=torch.float64)}, graph=graph)


def test_lightnet_errors():
    q = torch.randn(1, 4, 4, 2, 3)
    with pytest.raises(ValueError, match=r"`mode` must be one of 'global', 'causal', 'box'; got 'local'"):
        lightnet_scan(q, q, q, mode="local")
    with pytest.raises(ValueError, match=r"`v` must have shape"):
        lightnet_scan(q, q, q[:, :2], mode="box")
    with pytest.raises(TypeError, match=r"`k` must be a floating-point tensor"):
        lightnet_scan(q, q.long(), q, mode="box")


def test_lightnet_angles_errors():
    q = torch.randn(1, 4, 4, 2, 3)
    with pytest.raises(ValueError, match=r"`angles` must broadcast to the shape of `q`"):
        lightnet_scan(q, q, q, mode="box", angles=torch.zeros(4, 5, 2, 3))
    with pytest.raises(TypeError, match=r"`angles` must be a floating-point tensor"):
        lightnet_scan(q, q, q, mode="box", angles=torch.zeros(4, 4, 2, 3, dtype=torch.long))


def test_dag_triton_backend_where_it_cannot_run(monkeypatch):
    graph = DAG.from_edge_index(torch.tensor([[0, 1], [1, 2]]), 3)
    inputs = dag_inputs(graph, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"dag_scan: backend='triton' needs CUDA tensors \(or TRITON_INTERPRET=1 on the CPU\), got cpu"):
        dag_scan(**inputs, graph=graph, backend="triton")
    line = grid_inputs(1, (5,), 1, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"grid_scan: backend='triton' needs CUDA tensors"):
        grid_scan(**line, backend="triton")
    with pytest.raises(ValueError, match=r"lightnet_scan: backend='triton' needs CUDA tensors"):
        lightnet_scan(line["q"], line["k"], line["v"], mode="causal", backend="triton")
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    with pytest.raises(ValueError, match=r"dag_scan: backend='triton' needs the triton package"):
        dag_scan(**inputs, graph=graph, backend="triton")
    with pytest.raises(ValueError, match=r"grid_scan: backend='triton' needs the triton package"):
        grid_scan(**line, backend="triton")


@pytest.mark.parametrize("mode", ["causal", "box", "global"])
def test_lightnet_without_triton(mode, monkeypatch):
    """Without the triton package (an optional dependency) lightnet_scan takes its torch path, whose choice must not
    import the kernel modules (they import triton); backend='triton' says what is missing."""
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    for name in [m for m in sys.modules if m.startswith("mdlrnn.kernels.")]:
        monkeypatch.delitem(sys.modules, name)
    q, k, v = (torch.randn(1, 5, 6, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.testing.assert_close(lightnet_scan(q, k, v, mode=mode), lightnet_scan(q, k, v, mode=mode, backend="torch"))
    with pytest.raises(ValueError, match=r"lightnet_scan: backend='triton' needs the triton package"):
        lightnet_scan(q, k, v, mode=mode, backend="triton")
