import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torch_geometric")
from torch_geometric.data import Batch, Data  # noqa: E402

from mdlrnn.graphs import PLSTMConv, PLSTMGraphNet, build_dags, node_rank, to_dag  # noqa: E402
from mdlrnn.ops import dag_scan  # noqa: E402
from mdlrnn.testing import molecule_dag, relative_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mutag_root(tmp_path):
    """A data root whose MUTAG/raw is the vendored copy (PyG writes MUTAG/processed next to it)."""
    (tmp_path / "data" / "MUTAG").mkdir(parents=True)
    (tmp_path / "data" / "MUTAG" / "raw").symlink_to(ROOT / "tests" / "data" / "MUTAG" / "raw")
    return str(tmp_path / "data")


def undirected(edges):
    edges = torch.as_tensor(edges).T
    return torch.cat([edges, edges.flip(0)], 1)


def test_to_dag_keeps_each_undirected_edge_once_low_to_high():
    edge_index = torch.cat([undirected([(0, 2), (2, 1), (1, 3)]), torch.tensor([[3], [0]]), torch.tensor([[2], [2]])], 1)
    dag, ids = to_dag(edge_index, 4)
    pairs = sorted(map(tuple, dag.edge_index.T.tolist()))
    assert pairs == [(0, 2), (0, 3), (1, 2), (1, 3)]  # the lonely 3 -> 0 flipped, the self-loop dropped
    assert torch.equal(edge_index[:, ids].sort(0).values, dag.edge_index.sort(0).values)
    parallel, _ = to_dag(undirected([(0, 1), (0, 1)]), 2)
    assert parallel.num_edges == 2 and parallel.num_line_edges == 0


def test_orders():
    path = undirected([(0, 1), (1, 2), (2, 3), (1, 4)])
    assert node_rank(path, 5, "index").tolist() == [0, 1, 2, 3, 4]
    assert node_rank(path, 5, "degree")[1] == 0  # node 1 has the highest degree
    bfs = node_rank(path, 5, "bfs", root=torch.tensor([3]))
    assert bfs.tolist() == [3, 2, 1, 0, 4]  # hop distances 3, 2, 1, 0, 3; ties by index
    keys = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    dag, _ = to_dag(path, 5, order=keys)
    assert (dag.edge_index[0] > dag.edge_index[1]).all()  # every edge from higher to lower id
    with pytest.raises(ValueError, match="`order` must be one of"):
        to_dag(path, 5, order="random")
    with pytest.raises(ValueError, match=r"shape \(num_nodes,\)"):
        to_dag(path, 5, order=torch.zeros(3))


def test_directed_cycles():
    cycle = torch.tensor([[0, 1, 2], [1, 2, 0]])
    with pytest.raises(ValueError, match="cycle through node"):
        to_dag(cycle, 3, directed=True)
    dag, ids = to_dag(cycle, 3, directed=True, on_cycle="break")
    assert ids.tolist() == [0, 1] and dag.num_edges == 2
    with pytest.raises(ValueError, match="`on_cycle` must be"):
        to_dag(cycle, 3, directed=True, on_cycle="ignore")


def random_graph(num_nodes, gen, features=6, edge_dim=3):
    edges = undirected(molecule_dag(num_nodes, 2, gen).T.tolist()) if num_nodes > 1 else torch.zeros(2, 0, dtype=torch.long)
    x = torch.randn(num_nodes, features, generator=gen)
    return Data(x=x, edge_index=edges, edge_attr=torch.randn(edges.shape[1], edge_dim, generator=gen))


@pytest.mark.parametrize("mode", ["P", "D"])
def test_conv_is_one_dag_scan_per_direction(mode, generator):
    graph = random_graph(15, generator)
    conv = PLSTMConv(6, 8, heads=2, mode=mode, edge_dim=3).double()
    x, e = graph.x.double(), graph.edge_attr.double()
    dags = build_dags(graph.edge_index, 15)
    q, k, v = conv.qkv(x).view(15, 3, 2, 4).unbind(1)
    y = 0
    for index, direction in enumerate(("forward", "reverse")):
        dag = dags.get(direction)
        source, transition, mark = conv.scan_gates(x, dag, dags.edge_ids, e, index)
        if mode == "P":  # incoming transitions of every edge: absolute sum below one
            total = torch.zeros_like(source).index_add_(0, dag.line_edges[1], transition.abs())
            assert (total < 1).all()
        else:  # at most one incoming line edge per edge carries a transition: a forest
            alive = torch.zeros(dag.num_edges, 2, dtype=torch.long).index_add_(0, dag.line_edges[1], (transition != 0).long())
            assert alive.max() <= 1
        y = y + dag_scan(q, k, v, source, transition, mark, None, dag, backend="reference")
    y = y + torch.sigmoid(conv.direct)[:, None] * (q * k).sum(-1, keepdim=True) * v * 0.5
    expected = conv.out(conv.norm(y).flatten(1))
    assert relative_error(conv(x, graph.edge_index, e), expected) < 1e-12


def test_relabelling_nodes_with_the_order_relabels_the_result(generator):
    graph = random_graph(12, generator)
    conv = PLSTMConv(6, 8, heads=2, edge_dim=3, order="index").double()
    y = conv(graph.x.double(), graph.edge_index, graph.edge_attr.double())
    perm = torch.randperm(12, generator=generator)  # new id of old node i is perm[i]
    inverse = torch.argsort(perm)
    keys = inverse.double()  # orders the new ids as the old ids were
    relabelled = PLSTMConv(6, 8, heads=2, edge_dim=3, order=keys).double()
    relabelled.load_state_dict(conv.state_dict())
    y_new = relabelled(graph.x.double()[inverse], perm[graph.edge_index], graph.edge_attr.double())
    assert relative_error(y_new[perm], y) < 1e-12


def test_batch_equals_graphs_one_by_one(generator):
    graphs = [random_graph(n, generator) for n in (7, 1, 11, 2, 5)]
    graphs.append(Data(x=torch.randn(3, 6, generator=generator), edge_index=torch.zeros(2, 0, dtype=torch.long),
                       edge_attr=torch.zeros(0, 3)))  # isolated nodes, no edges
    model = PLSTMGraphNet(6, 2, hidden_channels=16, num_layers=3, heads=2, edge_dim=3).double().eval()
    batch = Batch.from_data_list(graphs)
    together = model(batch.x.double(), batch.edge_index, batch.edge_attr.double(), batch.batch)
    alone = torch.cat([model(g.x.double(), g.edge_index, g.edge_attr.double()) for g in graphs])
    assert together.shape == (6, 2) and relative_error(together, alone) < 1e-12


@pytest.mark.parametrize("options", [{}, dict(head_norm=False, final_norm=True, order="bfs")])
def test_gradients_and_degenerate_graphs(options, generator):
    model = PLSTMGraphNet(6, 1, hidden_channels=16, heads=2, edge_dim=3, pooling="sum", **options)
    for graph in (random_graph(20, generator), random_graph(1, generator)):
        out = model(graph.x, graph.edge_index, graph.edge_attr)
        out.sum().backward()
        assert out.shape == (1, 1) and torch.isfinite(out).all()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    empty = model(torch.zeros(0, 6), torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, 1)


def test_conv_errors():
    with pytest.raises(ValueError, match="`mode` must be 'P' or 'D'"):
        PLSTMConv(4, 8, mode="X")
    conv = PLSTMConv(4, 8, heads=2, edge_dim=3)
    with pytest.raises(ValueError, match=r"built with edge_dim=3, but edge_attr is missing"):
        conv(torch.randn(3, 4), torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match=r"`x` must have shape \(N, 4\)"):
        conv(torch.randn(3, 5), torch.tensor([[0], [1]]), torch.randn(1, 3))


def test_training_script_quick_mode(tmp_path, mutag_root):
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train" / "graphs.py"), "--dataset", "MUTAG", "--data-root",
               mutag_root, "--models", "plstm,gin", "--folds", "2", "--epochs", "2", "--out", str(out)]
    options = ["--clip-grad", "1", "--order", "degree", "--final-norm", "--no-head-norm"]
    subprocess.run(command + options, check=True, capture_output=True, cwd=tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"plstm", "gin"} and results["task"] == "classification"
    assert all(0 <= run["test"]["accuracy"] <= 1 and run["final_train_loss"] > 0
               for runs in results["results"].values() for run in runs)
    assert "| plstm |" in (out / "results.md").read_text()
    bad = subprocess.run(command[:-2] + ["--models", "transformer"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown model" in bad.stderr
    missing = subprocess.run(command[:3] + ["Nope", "--data-root", str(tmp_path)], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error:")
    assert "Traceback" not in missing.stderr


def test_training_script_runs_folds_apart_and_merges(tmp_path, mutag_root):
    script = str(ROOT / "train" / "graphs.py")
    common = ["--dataset", "MUTAG", "--data-root", mutag_root, "--models", "gin", "--folds", "3",
              "--epochs", "1"]
    for part, folds in (("a", "0,2"), ("b", "1")):
        subprocess.run([sys.executable, script, *common, "--only-folds", folds, "--out", str(tmp_path / part)],
                       check=True, capture_output=True)
    subprocess.run([sys.executable, script, "merge", str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "all")],
                   check=True, capture_output=True)
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    assert [run["fold"] for run in merged["results"]["gin"]] == [0, 1, 2]
    again = subprocess.run([sys.executable, script, "merge", str(tmp_path / "a"), str(tmp_path / "a"), str(tmp_path / "x")],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "more than one run" in again.stderr


def test_graph_net_errors():
    with pytest.raises(ValueError, match="`pooling` must be 'mean' or 'sum'"):
        PLSTMGraphNet(4, 2, pooling="max")
    with pytest.raises(ValueError, match="`directions` must be 'alternate' or 'both'"):
        PLSTMGraphNet(4, 2, directions="forward")
    with pytest.raises(ValueError, match=r"`out_channels` \(10\) must be divisible by `heads` \(4\)"):
        PLSTMConv(4, 10, heads=4)
    with pytest.raises(ValueError, match=r"`edge_index` must be a \(2, E\) tensor"):
        to_dag(torch.zeros(3, 4, dtype=torch.long), 5)
    with pytest.raises(ValueError, match=r"nodes outside \[0, num_nodes=2\)"):
        to_dag(torch.tensor([[0], [5]]), 2)


@pytest.mark.parametrize("source", ["csv", "moleculenet"])
def test_training_script_regression_on_molecules(source, tmp_path):
    pytest.importorskip("rdkit")
    data = ROOT / "tests" / "data"
    if source == "csv":
        where = ["--csv", str(data / "micro_zinc_60.csv"), "--smiles-col", "SMILES", "--target-col", "logp"]
    else:
        where = ["--dataset", "FreeSolv", "--data-root", str(tmp_path / "root")]
        (tmp_path / "root" / "freesolv").mkdir(parents=True)
        (tmp_path / "root" / "freesolv" / "raw").symlink_to(data / "freesolv" / "raw")
    out = tmp_path / "run"
    subprocess.run([sys.executable, str(ROOT / "train" / "graphs.py"), *where, "--models", "plstm,gin", "--folds", "2",
                    "--epochs", "1", "--out", str(out)], check=True, capture_output=True)
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "regression"
    assert all(run["test"]["mae"] >= 0 and run["test"]["rmse"] >= run["test"]["mae"]
               for runs in results["results"].values() for run in runs)
