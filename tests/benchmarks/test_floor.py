"""benchmarks/floor.py: how the lower bounds are put together from the timed loops."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from floor import bounds, bounds_bandwidth

NUMEL, GBPS = 1_000_000, 10.0
ANCHORS = {"a8b-default": 400.0, "hf-adafactor": 400.0, "a8b-beta1": 1000.0,
           "a8b-came": 1000.0, "torch-adamw-fused": 50.0, "torchao-adamw8bit": 2000.0}


def _bounds(linear_ns: float, log_ns: float) -> dict[tuple[str, str], float]:
    prims = {"code_update_fixed_scale": {"ns_per_element": linear_ns},
             "log_code_update_fixed_range": {"ns_per_element": log_ns}}
    return {(b["optimizer"], b["anchor"]): b["floor_ms"]
            for b in bounds(prims, GBPS, NUMEL, ANCHORS)}


def test_the_adamw_like_bound_pays_for_one_linear_and_one_log_space_code() -> None:
    """The AdamW-like preset stores M in a linear code and V in al8: its bound is its 12 B of
    parameter update plus both loops, each less the gradient read it shares; the 8-bit
    momentum bounds use the linear loop alone."""
    base = _bounds(linear_ns=2.0, log_ns=5.0)
    g_read_ms = 1e3 * 4 * NUMEL / (GBPS * 1e9)
    update_ms = 1e3 * 12 * NUMEL / (GBPS * 1e9)
    loops_ms = (2.0 + 5.0) * NUMEL / 1e6 - 2 * g_read_ms
    for anchor in ("torch-adamw-fused", "torchao-adamw8bit"):
        assert abs(base[("afx-a8b-adamw", anchor)] - (update_ms + loops_ms)) < 1e-9

    slower_log = _bounds(linear_ns=2.0, log_ns=9.0)
    key = ("afx-a8b-adamw", "torch-adamw-fused")
    assert abs(slower_log[key] - base[key] - 4.0 * NUMEL / 1e6) < 1e-9
    assert slower_log[("afx-a8b-beta1", "a8b-beta1")] == base[("afx-a8b-beta1", "a8b-beta1")]


def test_bounds_assume_the_fastest_rate_measured() -> None:
    """A loop over a cache-sized tensor can beat the DRAM triad: the bounds then use the loop's
    rate, never a slower one, so a bound stays below what a step can reach."""
    prims = {"fp32_read": {"gbps": 17.1}, "fp32_update": {"gbps": 24.2},
             "code_read": {"gbps": 99.0}}
    assert bounds_bandwidth(15.3, None, prims) == 24.2
    assert bounds_bandwidth(30.0, 15.0, prims) == 30.0
    assert bounds_bandwidth(15.3, 26.0, prims) == 26.0
    assert bounds_bandwidth(15.3, None, {}) == 15.3
