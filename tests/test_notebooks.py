"""The notebooks in notebooks/ run top to bottom at their CI size and are committed executed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = [
    "01_compose_your_own_optimizer",
    "02_adafactor8bit_training",
    "03_codec_quantization_error",
    "04_inside_the_compiled_step",
]
# Seconds one cell may take at the CI size (the slowest ones compile an optimizer).
CELL_TIMEOUT = 300
# Notebooks whose committed outputs must include matplotlib figures.
WITH_FIGURES = {"02_adafactor8bit_training", "03_codec_quantization_error"}


def test_the_four_notebooks_exist() -> None:
    """notebooks/ holds exactly the four notebooks the README lists, each reading the size
    knob AFX_NOTEBOOK_SMALL."""
    assert [p.stem for p in NOTEBOOKS] == EXPECTED
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
        assert 'os.environ.get("AFX_NOTEBOOK_SMALL") == "1"' in source, path.name
        assert f"notebooks/{path.name}" in readme, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_executed(path: Path) -> None:
    """The committed notebook was run top to bottom in one kernel: every code cell has an
    execution count, in order, and no cell's output is an error."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    for cell in code:
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source[:80]
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert bool(images) == (path.stem in WITH_FIGURES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_ci_size(path: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Executed with AFX_NOTEBOOK_SMALL=1 in a fresh kernel, every cell runs without an error
    (the notebooks assert their own numerical claims) and the first cell reports the small
    size."""
    monkeypatch.setenv("AFX_NOTEBOOK_SMALL", "1")  # inherited by the kernel process
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the failing cell
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    first_output = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                           for o in c.outputs[:1])
    assert "small=True" in first_output
