"""Graph benchmarks: pLSTM against PyG's GIN/GCN/GAT under the pLSTM paper's protocol.

Classification (TU datasets): 10-fold stratified cross-validation (seed 42), 11.1% of each training fold
held out for validation, AdamW with warm-up and cosine decay, the best-validation checkpoint tested.
Regression (MoleculeNet, a CSV of SMILES): the same machinery with random folds, MAE and RMSE.

    python train/graphs.py --dataset MUTAG --data-root DIR --models plstm,gin --folds 10 --epochs 100 \\
        --batch-size 64 --out DIR
    python train/graphs.py --csv micro_ZINC.csv --smiles-col SMILES --target-col logp --models plstm,gin ...

TU datasets are read from DIR/NAME/raw (downloaded only with --download). Writes results.json and
results.md (mean +- std per model) to --out. --only-folds runs part of the folds; `python train/graphs.py
merge RUN_DIR ... OUT_DIR` combines such runs into the full protocol's table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from mdlrnn.data.graphs import folds, prepare_graph, split_validation
from mdlrnn.graphs import BaselineGNN, PLSTMGraphNet
from mdlrnn.graphs.dag import ORDERS
from mdlrnn.training import optimizer_step, warmup_cosine

MODELS = ("plstm", "gin", "gcn", "gat")


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------- data


def load_dataset(args):
    """A list of PyG Data objects with float x (and float edge_attr where present), and the task."""
    if args.csv:
        return load_csv(args), "regression"
    from torch_geometric.datasets import MoleculeNet, TUDataset

    root = Path(args.data_root)
    if args.dataset in MoleculeNet.names or args.dataset.lower() in MoleculeNet.names:
        require_rdkit(args.dataset)
        name = args.dataset.lower()
        if not args.download and not (root / name / "raw").exists():
            fail(f"{root / name / 'raw'} does not exist; put the raw files there or pass --download")
        dataset, task = MoleculeNet(str(root), name), "regression"
    else:
        if not args.download and not (root / args.dataset / "raw").exists():
            fail(f"{root / args.dataset / 'raw'} does not exist; put the TU raw files there or pass --download")
        try:
            dataset, task = TUDataset(str(root), args.dataset), "classification"
        except Exception as error:  # PyG raises on unknown names only when it tries to download
            fail(f"cannot load TU dataset {args.dataset!r} from {root}: {error}")
    graphs = [prepare_graph(g) for g in dataset]
    if task == "regression" and graphs[0].y.dim() > 1 and graphs[0].y.shape[-1] > 1:
        for g in graphs:
            g.y = g.y[..., :1]
    return graphs, task


def require_rdkit(what: str):
    try:
        import rdkit  # noqa: F401
    except ImportError:
        fail(f"{what} needs rdkit to read SMILES: pip install rdkit")


def load_csv(args):
    import csv

    from torch_geometric.utils import from_smiles

    require_rdkit(args.csv)
    path = Path(args.csv)
    if not path.exists():
        fail(f"CSV file {path} does not exist")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    for column in (args.smiles_col, args.target_col):
        if rows and column not in rows[0]:
            fail(f"column {column!r} not in {path} (columns: {', '.join(rows[0])})")
    graphs = []
    for row in rows:
        graph = from_smiles(row[args.smiles_col])
        graph.y = torch.tensor([[float(row[args.target_col])]])
        graphs.append(prepare_graph(graph))
    return graphs


# --------------------------------------------------------------------------------------------- models


def make_model(name: str, in_channels: int, out_channels: int, edge_dim: int | None, args) -> nn.Module:
    if name == "plstm":
        return PLSTMGraphNet(in_channels, out_channels, hidden_channels=args.hidden, num_layers=args.layers,
                             heads=args.heads, edge_dim=edge_dim, pooling=args.pooling, dropout=args.dropout,
                             directions=args.directions, order=args.order, head_norm=args.head_norm,
                             final_norm=args.final_norm)
    return BaselineGNN(name, in_channels, out_channels)


# ------------------------------------------------------------------------------------------- training


def evaluate(model, loader, task: str, device) -> dict:
    model.eval()
    correct = count = 0
    abs_err = sq_err = 0.0
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            out = model(batch.x, batch.edge_index, batch.edge_attr, batch.batch)
            if task == "classification":
                correct += (out.argmax(-1) == batch.y.view(-1)).sum().item()
            else:
                error = out.view(-1) - batch.y.view(-1).float()
                abs_err += error.abs().sum().item()
                sq_err += error.square().sum().item()
            count += batch.num_graphs
    if task == "classification":
        return dict(accuracy=correct / max(count, 1))
    return dict(mae=abs_err / max(count, 1), rmse=math.sqrt(sq_err / max(count, 1)))


def better(task: str, new: dict, best: dict | None) -> bool:
    if best is None:
        return True
    return new["accuracy"] > best["accuracy"] if task == "classification" else new["mae"] < best["mae"]


def run_fold(name, graphs, train_idx, val_idx, test_idx, task, out_channels, args, device, progress):
    from torch_geometric.loader import DataLoader

    torch.manual_seed(args.seed)
    subset = lambda idx: [graphs[i] for i in idx.tolist()]
    train_loader = DataLoader(subset(train_idx), batch_size=args.batch_size, shuffle=True)
    val_loader = DataLoader(subset(val_idx), batch_size=args.batch_size)
    test_loader = DataLoader(subset(test_idx), batch_size=args.batch_size)
    edge_dim = graphs[0].edge_attr.shape[1] if graphs[0].edge_attr is not None else None
    model = make_model(name, graphs[0].x.shape[1], out_channels, edge_dim, args).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = len(train_loader)
    scheduler = warmup_cosine(optimizer, args.epochs * steps, max(1, int(args.warmup_epochs * steps)))
    loss_fn = nn.CrossEntropyLoss() if task == "classification" else nn.L1Loss()
    best, best_state = None, None
    for _ in range(args.epochs):
        model.train()
        loss_sum = torch.zeros((), device=device)
        for batch in train_loader:
            batch = batch.to(device)
            out = model(batch.x, batch.edge_index, batch.edge_attr, batch.batch)
            target = batch.y.view(-1) if task == "classification" else batch.y.view(-1, 1).float()
            loss = loss_fn(out, target)
            optimizer_step(loss, model, optimizer, scheduler, args.clip_grad)
            loss_sum += loss.detach() * batch.num_graphs
        train_loss = loss_sum.item() / len(train_loader.dataset)
        val = evaluate(model, val_loader, task, device)
        if better(task, val, best):
            best, best_state = val, copy.deepcopy(model.state_dict())
        progress.set_postfix(model=name, loss=f"{train_loss:.3f}", **{k: f"{v:.3f}" for k, v in val.items()})
        progress.update()
    model.load_state_dict(best_state)
    return dict(final_train_loss=train_loss, validation=best, test=evaluate(model, test_loader, task, device))


def summarize(results: dict, task: str) -> str:
    metrics = ("accuracy",) if task == "classification" else ("mae", "rmse")
    lines = ["| model | " + " | ".join(f"test {m}" for m in metrics) + " | folds |",
             "| --- | " + " | ".join("---" for _ in metrics) + " | --- |"]
    for name, runs in results.items():
        cells = []
        for metric in metrics:
            values = torch.tensor([r["test"][metric] for r in runs], dtype=torch.float64)
            std = values.std().item() if len(values) > 1 else 0.0
            cells.append(f"{values.mean().item():.4f} +- {std:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="MUTAG", help="TU dataset name or MoleculeNet name")
    parser.add_argument("--data-root", default="data", help="folder holding NAME/raw")
    parser.add_argument("--csv", help="CSV of SMILES (regression), instead of --dataset")
    parser.add_argument("--smiles-col", default="smiles")
    parser.add_argument("--target-col", default="target")
    parser.add_argument("--download", action="store_true", help="download missing data sets")
    parser.add_argument("--models", default="plstm,gin")
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-epochs", type=float, default=5.0)
    parser.add_argument("--clip-grad", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
    parser.add_argument("--val-fraction", type=float, default=0.111)
    parser.add_argument("--hidden", type=int, default=96, help="pLSTM hidden size")
    parser.add_argument("--layers", type=int, default=4, help="pLSTM layers (the paper: 2)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--pooling", default="sum", choices=("mean", "sum"), help="pLSTM graph pooling (the paper: mean)")
    parser.add_argument("--directions", default="both", choices=("alternate", "both"),
                        help="pLSTM: scan both DAGs in every layer, or alternate forward/reverse over layers "
                             "(the paper)")
    parser.add_argument("--order", default="index", choices=ORDERS, help="pLSTM: node order orienting the edges")
    parser.add_argument("--head-norm", action=argparse.BooleanOptionalAction, default=True,
                        help="pLSTM: per-head RMSNorm of the scan output")
    parser.add_argument("--final-norm", action=argparse.BooleanOptionalAction, default=False,
                        help="pLSTM: RMSNorm of the node features before pooling")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only-folds", type=lambda text: [int(f) for f in text.split(",")],
                        help="run these folds only (e.g. 0,1,2), to split the protocol over runs; "
                             "combine them with: python train/graphs.py merge RUN_DIR ... OUT_DIR")
    parser.add_argument("--out", default="results/graphs")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if args.folds < 2:
        parser.error("--folds must be at least 2")
    if args.only_folds is not None and not all(0 <= f < args.folds for f in args.only_folds):
        parser.error(f"--only-folds must name folds in [0, {args.folds})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args, names


def main(argv=None):
    from tqdm import tqdm

    args, names = parse_args(argv)
    device = torch.device(args.device)
    graphs, task = load_dataset(args)
    labels = torch.tensor([int(g.y.view(-1)[0]) if task == "classification" else 0 for g in graphs])
    out_channels = int(labels.max()) + 1 if task == "classification" else 1
    stratified = task == "classification"
    test_folds = folds(labels, args.folds, args.seed, stratified)
    chosen = args.only_folds if args.only_folds is not None else list(range(args.folds))
    results = {name: [] for name in names}
    start = time.time()
    with tqdm(total=len(names) * len(chosen) * args.epochs, desc=args.csv or args.dataset) as progress:
        for fold in chosen:
            test_idx = test_folds[fold]
            train_idx = torch.tensor(sorted(set(range(len(graphs))) - set(test_idx.tolist())), dtype=torch.long)
            train_idx, val_idx = split_validation(train_idx, labels, args.val_fraction, args.seed + fold, stratified)
            for name in names:
                result = run_fold(name, graphs, train_idx, val_idx, test_idx, task, out_channels, args, device, progress)
                results[name].append(dict(fold=fold, **result))
    write_results(Path(args.out), dict(config=vars(args), task=task, seconds=time.time() - start, results=results))
    return results


def write_results(out: Path, record: dict) -> None:
    table = summarize(record["results"], record["task"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(record, indent=2))
    (out / "results.md").write_text(table + "\n")
    print(table)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


def merge(paths: list[str], out: Path) -> None:
    """Combine runs of disjoint folds (--only-folds) of the same protocol into one record."""
    records = [json.loads((Path(p) / "results.json").read_text()) for p in paths]
    results = {}
    for record in records:
        for name, runs in record["results"].items():
            results.setdefault(name, []).extend(runs)
    for name, runs in results.items():
        folds_seen = [run["fold"] for run in runs]
        if len(set(folds_seen)) != len(folds_seen):
            fail(f"fold(s) of {name} appear in more than one run: {sorted(folds_seen)}")
        runs.sort(key=lambda run: run["fold"])
    write_results(out, dict(config=records[0]["config"], task=records[0]["task"],
                            seconds=sum(r["seconds"] for r in records), merged_from=paths, results=results))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "merge":
        if len(sys.argv) < 4:
            fail("usage: python train/graphs.py merge RUN_DIR [RUN_DIR ...] OUT_DIR")
        merge(sys.argv[2:-1], Path(sys.argv[-1]))
    else:
        main()
