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


def test_the_apollo_bound_is_its_projection_plus_the_parameter_update() -> None:
    """APOLLO's bound adds the measured projection products (which read the gradient) to the
    12 B per element of the update; without a projection time there is no APOLLO row."""
    prims = {"code_update_fixed_scale": {"ns_per_element": 2.0},
             "log_code_update_fixed_range": {"ns_per_element": 5.0}}
    anchors = {**ANCHORS, "a8b-apollo": 3000.0}
    rows = {b["optimizer"]: b for b in bounds(prims, GBPS, NUMEL, anchors, projection_ms=700.0)}
    apollo = rows["afx-a8b-apollo"]
    assert abs(apollo["floor_ms"] - (700.0 + 1e3 * 12 * NUMEL / (GBPS * 1e9))) < 1e-9
    assert apollo["target_ms"] == 0.35 * 3000.0 and apollo["reachable"]
    assert "afx-a8b-apollo" not in {b["optimizer"] for b in bounds(prims, GBPS, NUMEL, anchors)}


def test_the_projection_times_each_matrix_once_per_occurrence() -> None:
    """time_projection skips vectors, views N-D tensors as (R, C), counts 2·R·C·r
    floating-point operations per matrix, repeated shapes included, and bounds the products
    by the faster of torch's mm and the oneDNN product of afx's compiled step."""
    from afxbench.projection import time_projection

    out = time_projection([(8, 4), (4, 8), (8, 4), (5,), (2, 3, 4)], rank=2, reps=1)
    assert abs(out["gflop"] * 1e9 - 2 * 2 * (8 * 4 * 2 + 4 * 8 + 2 * 12)) < 1e-6
    assert sorted((tuple(s["shape"]), s["count"]) for s in out["shapes"]) == [
        ((2, 3, 4), 1), ((4, 8), 1), ((8, 4), 2)]
    assert set(out["libraries"]) == {"torch.mm", "afx.matmul.cpu_mm"}
    assert out["ms"] == min(out["libraries"].values()) > 0
    assert all(set(s["ms"]) == set(out["libraries"]) for s in out["shapes"])
