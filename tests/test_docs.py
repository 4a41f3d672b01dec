"""The README's examples and the demo run as written."""

import json
import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    commands = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(commands) == 2
    assert "train/arrows.py" in commands[0] and "pytest" in commands[1]
    assert "pip install" in commands[0] and "pip install" in commands[1]


def test_main_demo_runs_interrupted_and_resumed(tmp_path, capsys):
    """train/arrows.py as the README runs it, shrunk: both models, a stop after one epoch, a resume to the end."""
    pytest.importorskip("timm")
    demo = runpy.run_path(str(ROOT / "train" / "arrows.py"))
    quick = ["--out", str(tmp_path), "--train-samples", "64", "--val-samples", "16", "--epochs", "2",
             "--workers", "0", "--no-progress"]
    demo["main"]([*quick, "--stop-after-epochs", "1"])
    summaries = demo["main"]([*quick, "--resume"])
    assert all(s["finished"] and len(s["history"]) == 2 for s in summaries.values())
    out = capsys.readouterr().out
    assert re.search(r"\| pLSTM \| [\d.]+M \| 2/2 \| [\d.]+ \| [\d.]+ \|", out) and "acc@96 (2x)" in out
    assert re.search(r"\| ViT \| [\d.]+M \| 2/2 \|", out)
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert results["pLSTM"]["config"]["eval_sizes"] == [48, 96]
    assert (tmp_path / "extrapolation.png").stat().st_size > 0


def test_main_demo_rejects_flags_it_sets():
    demo = runpy.run_path(str(ROOT / "train" / "arrows.py"))
    for argv in (["--model", "resnet18"], ["--only", "Mamba"], ["--dataset", "cifar10"]):
        with pytest.raises(SystemExit) as error:
            demo["main"](argv)
        assert error.value.code == 2


def test_scan_demo_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "scan_demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    errors = [float(x) for x in re.findall(r"rel\. error (\S+)", out)]
    assert len(errors) == 6 and max(errors) < 1e-12
