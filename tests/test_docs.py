"""The README's examples and the demo run as written."""

import re
import runpy
from pathlib import Path

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
    assert "examples/scan_demo.py" in commands[0] and "pytest" in commands[1]


def test_demo_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "scan_demo.py"), run_name="__main__")
    out = capsys.readouterr().out
    errors = [float(x) for x in re.findall(r"rel\. error (\S+)", out)]
    assert len(errors) == 6 and max(errors) < 1e-12
