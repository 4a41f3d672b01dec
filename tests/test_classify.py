"""train/classify.py: exact resume, torchrun with two CPU processes (gloo), one-line errors."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("safetensors")
from safetensors.torch import load_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train" / "classify.py"
TINY_VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "embed_dim=32", "depth=2",
            "num_heads=2", "drop_rate=0.1", "--img-size", "32"]
QUICK = ["--dataset", "fake", "--train-samples", "96", "--val-samples", "33", "--batch-size", "16",
         "--workers", "0", "--no-progress", "--device", "cpu"]


def load_script():
    spec = importlib.util.spec_from_file_location("classify", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def weights(folder: Path, name="checkpoint.safetensors") -> dict:
    return load_file(str(folder / name))


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path):
    classify = load_script()
    # dropout, mixup, label smoothing and EMA all draw on or carry state that the resume must restore
    common = [*TINY_VIT, *QUICK, "--epochs", "3", "--eval-sizes", "32", "64", "--mixup", "0.8", "--smoothing", "0.1",
              "--ema", "--ema-decay", "0.9"]
    whole = classify.main([*common, "--out", str(tmp_path / "whole")])
    classify.main([*common, "--out", str(tmp_path / "parts"), "--stop-after-epochs", "1"])
    assert json.loads((tmp_path / "parts" / "summary.json").read_text())["finished"] is False
    parts = classify.main([*common, "--out", str(tmp_path / "parts"), "--resume", str(tmp_path / "parts")])
    for name in ("checkpoint.safetensors", "checkpoint_ema.safetensors"):
        a, b = weights(tmp_path / "whole", name), weights(tmp_path / "parts", name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timeless = lambda history: [{k: v for k, v in row.items() if k != "img_per_s"} for row in history]
    assert timeless(parts["history"]) == timeless(whole["history"])  # losses and accuracies of every epoch
    for produced in ("log.csv", "curves.png", "summary.json", "checkpoint_state.pt"):
        assert (tmp_path / "parts" / produced).stat().st_size > 0


def test_arrows_with_plstm_trains_small_and_evaluates_at_twice_the_size(tmp_path):
    classify = load_script()
    summary = classify.main([
        "--model", "plstm_vit_tiny_patch16_224", "--model-kwargs", "patch_size=8", "embed_dim=16", "depth=2",
        "num_heads=1", "--dataset", "arrows", "--img-size", "40", "--eval-sizes", "40", "80",
        "--arrow-padding", "4", "--arrow-radius", "3", "6", "--arrow-length", "4", "8", "--arrow-width", "1", "2",
        "--train-samples", "32", "--val-samples", "16", "--epochs", "1", "--batch-size", "16", "--workers", "0",
        "--no-progress", "--device", "cpu", "--grad-checkpointing", "--out", str(tmp_path / "arrows")])
    row = summary["history"][-1]
    assert 0 <= row["val40_acc"] <= 1 and 0 <= row["val80_acc"] <= 1 and summary["finished"]


def test_torchrun_with_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), *TINY_VIT, *QUICK, "--epochs", "2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["finished"]
    # 33 validation images split 17/16 over the ranks: only the sum over both gives a multiple of 1/33
    accuracy = summary["final"]["val32_acc"]
    assert abs(accuracy * 33 - round(accuracy * 33)) < 1e-9
    assert len(list(out.glob("checkpoint*"))) == 2  # only rank 0 writes: one weights file, one state file


@pytest.mark.parametrize("arguments, message", [
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    ([*TINY_VIT, "--img-size", "36"], "not divisible by vit_tiny_patch16_224's patch size 8"),
    (["--model", "vit_tiny_patch16_224", "--dataset", "imagefolder", "--data-dir", "missing"], "needs missing/train"),
    (["--model", "vit_tiny_patch16_224", "--dataset", "cifar10", "--data-dir", "missing"], "pass --download"),
    ([*TINY_VIT, "--resume", "nowhere"], "--resume nowhere: no such folder"),
])
def test_bad_arguments_end_with_one_line(arguments, message, tmp_path):
    # argparse keeps the last of a repeated option: `arguments` override QUICK's
    done = subprocess.run([sys.executable, str(SCRIPT), *QUICK, *arguments], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error:") and message in done.stderr
