"""The README's Python examples run as written, and its commands match .ci/run."""

from __future__ import annotations

import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run() -> None:
    """Every ```python block runs, in order, in one namespace (asserts inside must hold)."""
    # Blocks inside list items are indented; the indentation is Markdown's, not Python's.
    blocks = [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", README, flags=re.S)]
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run ends with exactly the README's test command."""
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_code_is_ruff_clean() -> None:
    """ruff check passes on the package and the tests."""
    result = subprocess.run(["ruff", "check", "afx", "tests"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
