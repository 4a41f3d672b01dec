"""Arrow pointing: train at one resolution, test at twice it (the pLSTM paper's extrapolation task).

Does the arrow point at the circle? The shapes keep their pixel size at every resolution, so a model
trained on small images meets longer distances at test time. pLSTM scans the image in its own geometry
and carries the arrow's direction across it; a ViT's position embedding has to be resampled.

    python train/arrows.py                           # CPU demo: small pLSTM-ViT vs a ViT of the same size
    python train/arrows.py --paper                   # the paper: pLSTM-T vs ViT-T, 192 px -> 384 px, 100k, 50 epochs
    torchrun --nproc_per_node 2 train/arrows.py --paper --batch-size 64       # --batch-size is per process

Both models train with the same train/classify.py flags; any flag not listed below goes to it, and wins
over the preset's (e.g. --epochs 5 --train-samples 20000 --lr 3e-4). --model-kwargs replaces both models'.
Writes OUT/<model>/ (checkpoints, log.csv, curves.png, summary.json), OUT/results.json and
OUT/extrapolation.png, and prints the table of held-out accuracy at both resolutions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # train/classify.py, beside this file
import classify  # noqa: E402

SMALL = ["patch_size=8", "embed_dim=32", "depth=2", "num_heads=1"]
PRESETS = {
    # ~8 minutes on 2 CPU cores; shapes scaled to 48 px (a usable square of 40 px)
    "demo": dict(
        models={"pLSTM": ("plstm_vit_tiny_patch16_224", SMALL), "ViT": ("vit_tiny_patch16_224", SMALL)},
        args=["--img-size", "48", "--eval-sizes", "48", "96", "--train-samples", "16000", "--val-samples", "1000",
              "--epochs", "4", "--batch-size", "64", "--lr", "1e-3", "--warmup-epochs", "0.5",
              "--arrow-padding", "4", "--arrow-radius", "4", "8", "--arrow-length", "12", "18",
              "--arrow-width", "2", "4", "--workers", "1"],
        paper=None),
    # DESIGN.md section 5: 100k images at 192 px, held-out sets at 192 and 384 px (10,240 each, the paper's test size)
    "paper": dict(
        models={"pLSTM-T": ("plstm_vit_tiny_patch16_224", []), "ViT-T": ("vit_tiny_patch16_224", [])},
        args=["--img-size", "192", "--eval-sizes", "192", "384", "--train-samples", "100000", "--val-samples", "10240",
              "--epochs", "50", "--batch-size", "128", "--lr", "1e-3", "--weight-decay", "0.05", "--clip-grad", "1",
              "--warmup-epochs", "1", "--workers", "8"],
        paper={"pLSTM-T": (0.972, 0.778), "ViT-T": (0.915, 0.707)}),  # mean of 5 seeds, test@192 / ext@384
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # abbreviations of classify.py's flags pass through whole
    parser.add_argument("--paper", action="store_true", help="the paper's setup (for GPUs) instead of the CPU demo")
    parser.add_argument("--only", nargs="+", default=None, metavar="LABEL", help="train only these models (by label)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/arrows_demo or runs/arrows_paper)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the runs in OUT: interrupted ones resume, finished ones are only reported")
    args, forwarded = parser.parse_known_args(argv)
    preset = PRESETS["paper" if args.paper else "demo"]
    args.out = Path(args.out or f"runs/arrows_{'paper' if args.paper else 'demo'}")
    unknown = sorted(set(args.only or []) - set(preset["models"]))
    if unknown:
        parser.error(f"--only: unknown labels {unknown}; this preset has {list(preset['models'])}")
    for flag in ("--model", "--dataset"):
        if any(a == flag or a.startswith(flag + "=") for a in forwarded):
            parser.error(f"{flag} is set by this script")
    return args, forwarded, preset


def train(label: str, name: str, kwargs: list[str], args, forwarded: list[str], preset: dict) -> dict:
    out = args.out / label
    argv = ["--model", name, "--dataset", "arrows", *preset["args"], "--out", str(out)]
    if kwargs:
        argv += ["--model-kwargs", *kwargs]
    if args.resume and (out / "checkpoint_state.pt").exists():
        argv += ["--resume", str(out)]
    return classify.main(argv + forwarded)  # the user's flags last: argparse keeps the last value


def report(summaries: dict, preset: dict, out: Path) -> str:
    """The extrapolation table (markdown) and OUT/extrapolation.png: accuracy per epoch at every eval size."""
    config = next(iter(summaries.values()))["config"]
    trained, sizes = config["img_size"], config["eval_sizes"]
    heads = [f"acc@{s}" + (f" ({s / trained:g}x)" if s != trained else "") for s in sizes]
    paper = " paper |" if preset["paper"] else ""
    lines = [f"| model | params | epochs | {' | '.join(heads)} |{paper}",
             "| --- " * (3 + len(sizes)) + "|" + (" --- |" if paper else "")]
    for label, summary in summaries.items():
        row = summary["final"]
        accuracies = " | ".join(f"{row[f'val{s}_acc']:.3f}" for s in sizes)
        done = f"{len(summary['history'])}/{summary['config']['epochs']}"
        line = f"| {label} | {summary['params'] / 1e6:.2f}M | {done} | {accuracies} |"
        if paper:
            line += " {:.3f} / {:.3f} |".format(*preset["paper"][label])
        lines.append(line)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    for index, (label, summary) in enumerate(summaries.items()):
        epochs = [row["epoch"] for row in summary["history"]]
        for size, style in zip(sizes, ("-", "--", ":", "-.") * len(sizes)):
            axis.plot(epochs, [row[f"val{size}_acc"] for row in summary["history"]], style, color=f"C{index}",
                      label=f"{label} @{size} px")
    axis.axhline(0.5, color="grey", lw=0.8)
    axis.set(xlabel="epoch", ylabel="held-out accuracy", title=f"arrow pointing: trained at {trained} px")
    axis.legend()
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "extrapolation.png", dpi=100)
    plt.close(fig)
    return "\n".join(lines)


def main(argv=None) -> dict:
    args, forwarded, preset = parse_args(argv)
    models = {k: v for k, v in preset["models"].items() if args.only is None or k in args.only}
    summaries = {label: train(label, name, kwargs, args, forwarded, preset) for label, (name, kwargs) in models.items()}
    if int(os.environ.get("RANK", 0)) == 0:
        table = report(summaries, preset, args.out)
        results = {label: dict(model=models[label][0], model_kwargs=models[label][1], params=s["params"],
                               finished=s["finished"], final=s["final"], device=s["device_name"],
                               world_size=s["world_size"], config=s["config"]) for label, s in summaries.items()}
        (args.out / "results.json").write_text(json.dumps(dict(results=results, table=table), indent=2, default=str))
        print("\nHeld-out accuracy (final epoch)\n" + table)
        print(f"\nwrote {args.out / 'results.json'} and {args.out / 'extrapolation.png'}")
    return summaries


if __name__ == "__main__":
    main()
