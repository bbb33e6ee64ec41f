"""``python -m afx.demo``: trains, prints the table, writes the PNG, and rejects bad options."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from afx.demo import OPTIMIZERS, PNG_NAME, TABLE_NAME, main

# A model small enough that a run is mostly the compilation of afx's update.
TINY = ["--steps", "12", "--d-model", "16", "--heads", "2", "--layers", "1", "--context", "16",
        "--batch-size", "4", "--quiet"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def table_rows(text: str) -> dict[str, list[str]]:
    """The demo's Markdown table rows, keyed by optimizer name."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in OPTIMIZERS:
            rows[cells[0]] = cells[1:]
    return rows


def test_demo_prints_table_and_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run with AdamW and the compiled afx.Adafactor8Bit prints one table row per optimizer
    (finite validation loss below the uniform-guess loss, positive timings, 8-bit state smaller
    than AdamW's) and writes the same table and a valid PNG into the output folder."""
    out = tmp_path / "new" / "folder"  # created by the demo
    assert main([*TINY, "--optimizers", "adamw,afx-adafactor8bit", "--out", str(out)]) is None
    printed = capsys.readouterr().out
    vocab = int(re.search(r"\((\d+) distinct\)", printed).group(1))
    rows = table_rows(printed)
    assert list(rows) == ["adamw", "afx-adafactor8bit"]
    for cells in rows.values():
        val_loss, state_bytes, per_param, opt_ms, tokens_per_s, first_s = cells
        # below the loss of a uniform guess, where the untrained model starts
        assert math.isfinite(float(val_loss)) and float(val_loss) < math.log(vocab)
        assert int(state_bytes.replace(",", "")) > 0 and float(per_param) > 0
        assert float(opt_ms) > 0 and float(tokens_per_s.replace(",", "")) > 0
        assert float(first_s) >= 0
    adamw_bytes = int(rows["adamw"][1].replace(",", ""))
    assert float(rows["adamw"][2]) == pytest.approx(8.0, abs=0.05)  # two float32 moments
    assert int(rows["afx-adafactor8bit"][1].replace(",", "")) < adamw_bytes / 2

    table = (out / TABLE_NAME).read_text()
    assert table_rows(table) == rows
    png = (out / PNG_NAME).read_bytes()
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 400 and height > 200
    image = pytest.importorskip("matplotlib.image").imread(out / PNG_NAME)
    assert image.shape[:2] == (height, width) and image.std() > 0  # decodes, not blank
    assert str(out / PNG_NAME) in printed


def test_png_skipped_without_matplotlib(tmp_path: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib the table is still printed and saved, no PNG is written, and the
    message says that the PNG was skipped and how to install what it needs."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    main([*TINY, "--steps", "2", "--optimizers", "adamw", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert list(table_rows(printed)) == ["adamw"]
    assert "PNG skipped" in printed and "pip install" in printed and ".[demo]" in printed
    assert not (tmp_path / PNG_NAME).exists()
    assert list(table_rows((tmp_path / TABLE_NAME).read_text())) == ["adamw"]


@pytest.mark.parametrize(("flag", "value"), [
    ("--optimizers", "adamw,sgdx"),
    ("--optimizers", "apollo"),
    ("--steps", "0"),
    ("--steps", "-5"),
    ("--steps", "ten"),
    ("--threads", "-1"),
])
def test_bad_option_exits_2_naming_it(flag: str, value: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    """A bad option value exits with code 2 and a message naming the option and the value,
    before anything is trained or written."""
    with pytest.raises(SystemExit) as exit_info:
        main([flag, value, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    bad = value.split(",")[-1]
    assert f"argument {flag}:" in captured.err and bad in captured.err
    assert captured.out == "" and not (tmp_path / "out").exists()


def test_unwritable_output_folder_exits_2_before_training(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An output folder that cannot be created (its parent is a file) is reported as an error
    of --out, with the path, before training starts."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--out", str(blocker / "out")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "argument --out:" in captured.err and str(blocker / "out") in captured.err
    assert captured.out == ""  # nothing was trained


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root can write to read-only folders")
def test_read_only_output_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An existing folder without write permission is reported as an error of --out."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main([*TINY, "--out", str(folder)])
    finally:
        folder.chmod(0o700)
    assert exit_info.value.code == 2
    assert "argument --out:" in capsys.readouterr().err


def test_module_entry_point_reports_bad_flag() -> None:
    """`python -m afx.demo` runs main() and exits with status 2 on a bad flag."""
    result = subprocess.run([sys.executable, "-m", "afx.demo", "--optimizers", "nope"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "argument --optimizers:" in result.stderr and "'nope'" in result.stderr
    assert "adamw" in result.stderr  # lists the valid names
