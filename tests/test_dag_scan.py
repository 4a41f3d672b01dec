import itertools

import pytest
import torch

from mdlrnn import DAG, dag_scan, grid_scan, kernels
from mdlrnn.testing import (
    dag_inputs,
    disjoint_union,
    grid_dag,
    grid_inputs,
    layered_dag,
    molecule_dag,
    random_tree,
    relative_error,
)

NAMES = ("q", "k", "v", "source", "transition", "mark", "direct")
FAST = ("torch", "triton")


def runnable(backend, device):
    """The Triton kernels run on CUDA, or on the CPU in the interpreter (CI); a GPU machine tests them on CUDA."""
    if backend == "triton" and not kernels.usable(torch.device(device)):
        pytest.skip("Triton kernels on the CPU run in CI's interpreter (TRITON_INTERPRET=1)")


def families(gen):
    grid, _ = grid_dag((4, 5))
    molecules = [molecule_dag(int(n), 3, gen) for n in torch.randint(2, 30, (6,), generator=gen)]
    sizes = [int(e.max()) + 1 for e in molecules]
    batch, total = disjoint_union(molecules + [torch.zeros(2, 0, dtype=torch.long)], sizes + [3])
    return {
        "single": (torch.zeros(2, 0, dtype=torch.long), 1),
        "isolated": (torch.tensor([[0, 2], [2, 3]]), 6),
        "chain": (torch.stack([torch.arange(40), torch.arange(1, 41)]), 41),
        "tree": (random_tree(37, gen), 37),
        "parallel": (torch.tensor([[0, 0, 1, 1], [1, 1, 2, 2]]), 3),
        "grid": (grid.edge_index, grid.num_nodes),
        "layered": (layered_dag(5, 4, 0.6, gen), 20),
        "batch": (batch, total),
    }


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("family", ["single", "isolated", "chain", "tree", "parallel", "grid", "layered", "batch"])
def test_fast_path_matches_reference(family, backend, generator, device):
    runnable(backend, device)
    edge_index, num_nodes = families(generator)[family]
    graph = DAG.from_edge_index(edge_index, num_nodes)
    inputs = dag_inputs(graph, 3, 4, 5, generator=generator)
    leaves = [inputs[k].requires_grad_() for k in NAMES]
    outs, grads, weight = [], [], None
    for name, where in (("reference", "cpu"), (backend, device)):
        y = dag_scan(*(x.to(where) for x in leaves), graph.to(where), backend=name).cpu()
        if weight is None:
            weight = torch.randn(y.shape, generator=generator, dtype=y.dtype)
        outs.append(y)
        grads.append(torch.autograd.grad((y * weight).sum(), leaves, allow_unused=True, materialize_grads=True))
    assert outs[1].shape == (num_nodes, 3, 5)
    assert relative_error(outs[1], outs[0]) < 1e-12
    for name, a, b in zip(NAMES, grads[1], grads[0]):
        assert relative_error(a, b) < 1e-12, name


@pytest.mark.parametrize("backend", FAST)
def test_gradcheck(backend, generator, device):
    runnable(backend, device)
    graph = DAG.from_edge_index(layered_dag(3, 3, 0.8, generator), 9).to(device)
    inputs = dag_inputs(graph, 2, 2, 3, generator=generator)
    leaves = [inputs[k].to(device).requires_grad_() for k in NAMES]
    # fast mode (random projections) keeps the interpreter's many kernel calls affordable; CUDA's index_add
    # accumulates in any order, so repeated backward passes may differ in the last bits
    tolerance = 1e-12 if device.type == "cuda" else 0.0
    assert torch.autograd.gradcheck(lambda *xs: dag_scan(*xs, graph, backend=backend), leaves,
                                    fast_mode=backend == "triton", nondet_tol=tolerance)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", FAST)
def test_reduced_precision_against_float64(backend, dtype, bound, generator, device):
    """Inputs rounded to `dtype` once; the float64 reference on those rounded inputs is the target."""
    runnable(backend, device)
    graphs = [molecule_dag(int(n), 2, generator) for n in torch.randint(2, 40, (5,), generator=generator)]
    edges, total = disjoint_union(graphs, [int(e.max()) + 1 for e in graphs])
    graph = DAG.from_edge_index(edges, total)
    inputs = {k: x.to(dtype) for k, x in dag_inputs(graph, 2, 16, 24, generator=generator).items()}
    leaves = [inputs[k].to(device).requires_grad_() for k in NAMES]
    y = dag_scan(*leaves, graph.to(device), backend=backend)
    assert y.dtype == dtype
    weight = torch.randn(y.shape, generator=generator).to(device, dtype)
    grads = torch.autograd.grad((y * weight).float().sum(), leaves)
    exact = [inputs[k].double().requires_grad_() for k in NAMES]
    ref = dag_scan(*exact, graph, backend="reference")
    ref_grads = torch.autograd.grad((ref * weight.cpu().double()).sum(), exact)
    assert relative_error(y, ref) < bound
    for name, a, b in zip(NAMES, grads, ref_grads):
        assert relative_error(a, b) < bound, name


@pytest.mark.parametrize("sizes", [(6,), (1, 1), (4, 7), (7, 1), (2, 3, 4)], ids=str)
def test_grid_scan_equals_dag_scan_on_the_grid_dag(sizes, generator):
    inputs = grid_inputs(1, sizes, 2, 3, 4, generator=generator)
    graph, to_dag = grid_dag(sizes)
    expected = grid_scan(**inputs, backend="torch").reshape(-1, 2, 4)
    for backend in ("reference", "torch"):
        got = dag_scan(**to_dag(**inputs), graph=graph, backend=backend)
        assert relative_error(got, expected) < 1e-12


def test_batch_equals_graphs_one_by_one(generator):
    graphs = [molecule_dag(n, 2, generator) for n in (5, 12, 9)]
    sizes = [int(e.max()) + 1 for e in graphs]
    edges, total = disjoint_union(graphs, sizes)
    batch = DAG.from_edge_index(edges, total)
    inputs = dag_inputs(batch, 2, 3, 3, generator=generator)
    y = dag_scan(**inputs, graph=batch)
    node, edge = 0, 0
    for e, n in zip(graphs, sizes):
        one = DAG.from_edge_index(e, n)
        lines = (batch.line_edges[0] >= edge) & (batch.line_edges[0] < edge + one.num_edges)
        assert lines.sum() == one.num_line_edges
        # line edges of one graph, in the batch's order, matched to the single graph's numbering
        pairs = {tuple(p): j for j, p in enumerate(one.line_edges.T.tolist())}
        order = [pairs[(a - edge, b - edge)] for a, b in batch.line_edges[:, lines].T.tolist()]
        transition = torch.empty(one.num_line_edges, 2, dtype=torch.float64)
        transition[order] = inputs["transition"][lines]
        single = dag_scan(
            inputs["q"][node : node + n], inputs["k"][node : node + n], inputs["v"][node : node + n],
            inputs["source"][edge : edge + one.num_edges], transition,
            inputs["mark"][edge : edge + one.num_edges], inputs["direct"][node : node + n], one,
        )
        assert relative_error(y[node : node + n], single) < 1e-12
        node, edge = node + n, edge + one.num_edges


def test_line_edges_and_levels(generator):
    edge_index = layered_dag(4, 3, 0.7, generator)
    graph = DAG.from_edge_index(edge_index, 12)
    src, dst = edge_index.tolist()
    expected = {(a, b) for a, b in itertools.product(range(len(src)), repeat=2) if dst[a] == src[b]}
    assert set(map(tuple, graph.line_edges.T.tolist())) == expected
    assert graph.num_line_edges == len(expected)
    level = graph.edge_level
    assert (level[graph.line_edges[0]] < level[graph.line_edges[1]]).all()
    reverse = graph.reverse()
    assert torch.equal(reverse.edge_index, edge_index.flip(0))


def test_empty_graph():
    graph = DAG.from_edge_index(torch.zeros(2, 0, dtype=torch.long), 4)
    assert graph.num_edges == graph.num_line_edges == graph.num_levels == 0
    q = torch.randn(4, 2, 3)
    direct = torch.randn(4, 2)
    none = torch.zeros(0, 2)
    y = dag_scan(q, q, q, none, none, none, direct, graph)
    assert torch.allclose(y, 3**-0.5 * direct[..., None] * (q * q).sum(-1, keepdim=True) * q)
    assert dag_scan(q, q, q, none, none, none, None, graph).abs().sum() == 0
    nothing = DAG.from_edge_index(torch.zeros(2, 0, dtype=torch.long), 0)
    empty = torch.zeros(0, 2, 3)
    assert dag_scan(empty, empty, empty, none, none, none, None, nothing).shape == (0, 2, 3)


@pytest.mark.parametrize("backend", FAST)
def test_long_chain_finite_float32(backend, device):
    runnable(backend, device)
    n = 3000 if device.type == "cuda" or backend == "torch" else 300  # the interpreter: ~10 ms a level
    graph = DAG.from_edge_index(torch.stack([torch.arange(n - 1), torch.arange(1, n)]), n).to(device)
    gen = torch.Generator().manual_seed(0)
    inputs = dag_inputs(graph, 2, 8, 8, generator=gen, dtype=torch.float32)
    inputs["transition"] = torch.sign(inputs["transition"])  # |T| = 1 all along the chain
    leaves = {k: v.to(device).requires_grad_() for k, v in inputs.items()}
    y = dag_scan(**leaves, graph=graph, backend=backend)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves.values())


@pytest.mark.parametrize("head_dims", [(5, 3), (24, 24), (32, 32), (64, 48)], ids=str)
@pytest.mark.parametrize("backend", FAST)
def test_head_sizes(backend, head_dims, generator, device):
    """Every way the kernels split a state into blocks (the split depends on Dk, Dv and the device)."""
    runnable(backend, device)
    graphs = [molecule_dag(int(n), 2, generator) for n in torch.randint(2, 25, (3,), generator=generator)]
    edges, total = disjoint_union(graphs, [int(e.max()) + 1 for e in graphs])
    graph = DAG.from_edge_index(edges, total)
    inputs = dag_inputs(graph, 3, *head_dims, generator=generator)
    leaves = [inputs[k].requires_grad_() for k in NAMES]
    ref = dag_scan(*leaves, graph, backend="reference")
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    fast = [x.detach().to(device).requires_grad_() for x in leaves]
    y = dag_scan(*fast, graph.to(device), backend=backend)
    grads = torch.autograd.grad(y.square().sum(), fast)
    assert relative_error(y, ref) < 1e-12
    for name, a, b in zip(NAMES, grads, ref_grads):
        assert relative_error(a, b) < 1e-12, name
