"""benchmarks/afxbench/report.py: how the issue's state-bytes targets are judged."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from afxbench.report import PYTHON_NUMBER_BYTES, evaluate_targets

PARAMS, TENSORS = 1_000_000, 148


def _row(key: str, state_bytes: int, numbers: int) -> dict:
    return {"optimizer": key, "size": "124M", "status": "ok", "params": PARAMS,
            "state_bytes": state_bytes, "state_bytes_per_param": state_bytes / PARAMS,
            "state_numbers": numbers}


def _verdict(afx_bytes: int, afx_numbers: int, package_bytes: int, package_numbers: int
             ) -> dict:
    rows = [_row("afx-a8b-adamw", afx_bytes, afx_numbers),
            _row("a8b-adamw", package_bytes, package_numbers)]
    (target,) = [t for t in evaluate_targets(rows, "124M")
                 if t["target"].startswith("afx-a8b-adamw state")]
    return target


def test_a_tensor_step_counter_is_no_more_than_a_python_int() -> None:
    """afx keeps a 4-byte step tensor per parameter tensor where the package keeps a Python
    int: counted at 8 bytes per number, afx's state is the smaller one."""
    base = 2 * PARAMS
    target = _verdict(base + 4 * TENSORS, 0, base, TENSORS)
    assert target["pass"] is True
    assert f"{4 * TENSORS - PYTHON_NUMBER_BYTES * TENSORS:+,} B in all" in target["measured"]
    assert f"tensors alone {4 * TENSORS:+,} B" in target["measured"]


def test_more_state_in_all_fails() -> None:
    """One byte more than the package, numbers included, fails the target."""
    base = 2 * PARAMS
    assert _verdict(base + PYTHON_NUMBER_BYTES * TENSORS + 1, 0, base, TENSORS)["pass"] is False
    assert _verdict(base, TENSORS, base, TENSORS)["pass"] is True
