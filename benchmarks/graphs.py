"""Graphs per second of a PLSTMConv network against GIN, forward+backward on batches of 128 TU graphs.

pLSTM by default in the paper's configuration (2 layers alternating the DAG's directions, hidden 96, 4 heads,
mean pooling; --layers/--directions/--pooling as in train/graphs.py), GIN as train/graphs.py builds it (4
layers, hidden 128), timed in the same process; the DAG construction of each batch is in pLSTM's time.

    python benchmarks/graphs.py --data-root DIR [--dataset NCI1] [--device cuda] [--out results/graphs.json]
        [--layers 4 --directions both --pooling sum]   (the configuration train/graphs.py's table uses)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mdlrnn.data.graphs import prepare_graph
from mdlrnn.graphs import BaselineGNN, PLSTMGraphNet


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="NCI1")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20, help="timed batches")
    parser.add_argument("--layers", type=int, default=2, help="pLSTM layers")
    parser.add_argument("--directions", default="alternate", choices=("alternate", "both"))
    parser.add_argument("--pooling", default="mean", choices=("mean", "sum"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "graphs.json")
    args = parser.parse_args()
    from torch_geometric.datasets import TUDataset
    from torch_geometric.loader import DataLoader

    device = torch.device(args.device)
    dataset = [prepare_graph(g) for g in TUDataset(args.data_root, args.dataset)]
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    batches = [b for _, b in zip(range(args.batches), loader)]
    features, classes = dataset[0].x.shape[1], int(max(int(g.y) for g in dataset)) + 1
    models = {
        "gin": BaselineGNN("gin", features, classes),
        "plstm": PLSTMGraphNet(features, classes, hidden_channels=96, num_layers=args.layers, heads=4,
                               directions=args.directions, pooling=args.pooling),
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = {}
    name_of = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.dataset}, batches of {args.batch_size} graphs, forward+backward, {name_of}, torch {torch.__version__}")
    for name, model in models.items():
        model = model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(batch):
            batch = batch.to(device)
            out = model(batch.x, batch.edge_index, None, batch.batch)
            torch.nn.functional.cross_entropy(out, batch.y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for batch in batches[:3]:
            step(batch)
        sync()
        start = time.perf_counter()
        for batch in batches:
            step(batch)
        sync()
        seconds = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        rows[name] = dict(graphs_per_s=len(batches) * args.batch_size / seconds, params=params)
        print(f"{name:<8} {rows[name]['graphs_per_s']:10.0f} graphs/s   {params / 1e3:7.1f}k params")
    ratio = rows["plstm"]["graphs_per_s"] / rows["gin"]["graphs_per_s"]
    print(f"plstm / gin throughput: {ratio:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=name_of, torch=torch.__version__, dataset=args.dataset, batch_size=args.batch_size,
                plstm=dict(layers=args.layers, directions=args.directions, pooling=args.pooling),
                date=time.strftime("%Y-%m-%d"))
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows, plstm_over_gin=ratio), indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
