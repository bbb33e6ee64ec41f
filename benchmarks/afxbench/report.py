"""Aggregating the rounds of each (optimizer, size) and rendering the markdown report.

Torch-free: it works on the JSON dictionaries the worker processes write.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from afxbench.registry import REGISTRY

MIB = 2**20
#: Bytes a Python int or float kept in an optimizer state counts for: its 64-bit value.
PYTHON_NUMBER_BYTES = 8


def summarize(key: str, size: str, rounds: Sequence[Mapping[str, Any]],
              bandwidth_gbps: float | None, status: str | None = None,
              error: str | None = None) -> dict[str, Any]:
    """One report row from the rounds of one (optimizer, size).

    Step times are pooled over the steady-state steps of every successful round before the
    median is taken. The cold first step is round 0's (the only process that started with an
    empty Inductor cache); the warm first step is the median over later rounds. Peak memory
    is the largest over rounds (conservative); recompiles are the most seen in any round.

    Args:
        key, size: which optimizer and size.
        rounds: worker results in round order (failed rounds included).
        bandwidth_gbps: measured memory bandwidth for the roofline, or ``None``.
        status, error: set for rows that never ran (e.g. "not installed").
    """
    spec = REGISTRY[key]
    row: dict[str, Any] = {"optimizer": key, "label": spec.label, "afx": spec.afx,
                           "size": size, "rounds": list(rounds)}
    ok = [r for r in rounds if r.get("status") == "ok"]
    failures = [r for r in rounds if r.get("status") != "ok"]
    row["errors"] = [f"round {r.get('round')}: {r.get('status')}: {r.get('error')}"
                     for r in failures]
    if status is not None:
        return {**row, "status": status, "error": error}
    if not ok:
        first = failures[0] if failures else {"status": "error", "error": "no rounds ran"}
        return {**row, "status": first.get("status", "error"), "error": first.get("error")}

    times = [t for r in ok for t in r["step_ms"]]
    median_ms = statistics.median(times)
    q1, _, q3 = (statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1
                 else (times[0],) * 3)
    cold = next((r["first_step_s"] for r in ok if r["round"] == 0), None)
    warm = [r["first_step_s"] for r in ok if r["round"] > 0]
    numel = ok[0]["numel"]
    min_bytes = ok[0]["min_bytes_per_step"]
    achieved_gbps = min_bytes / (median_ms / 1e3) / 1e9
    row.update(
        status="ok",
        error=None,
        params=numel,
        tensors=ok[0]["tensors"],
        rounds_ok=len(ok),
        steps_timed=len(times),
        step_ms_median=median_ms,
        step_ms_q1=q1,
        step_ms_q3=q3,
        step_ms_min=min(times),
        first_step_cold_s=cold,
        first_step_warm_s=statistics.median(warm) if warm else None,
        graphs_first_step=ok[0]["graphs_first_step"],
        recompiles=max(r["recompiles"] for r in ok),
        graph_breaks=max(r["graph_breaks"] for r in ok),
        state_bytes=ok[0]["state_bytes"],
        state_bytes_per_param=ok[0]["state_bytes"] / numel,
        state_numbers=ok[0]["state_numbers"],
        peak_extra_bytes=max(r["peak_extra_bytes"] for r in ok),
        memory_method=ok[0]["memory_method"],
        min_bytes_per_step=min_bytes,
        achieved_gbps=achieved_gbps,
        roofline_pct=100 * achieved_gbps / bandwidth_gbps if bandwidth_gbps else None,
    )
    return row


def add_ratios(rows: Sequence[dict[str, Any]]) -> None:
    """Adds ``ratios`` (afx median ÷ anchor median, same size, same run) to each afx row."""
    for row in rows:
        if not row["afx"] or row["status"] != "ok":
            continue
        row["ratios"] = {a["optimizer"]: row["step_ms_median"] / a["step_ms_median"]
                         for a in rows if not a["afx"] and a["status"] == "ok"
                         and a["size"] == row["size"]}


# --- formatting -------------------------------------------------------------------------------

def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _s(value: float | None) -> str:
    # Seconds: first steps range from milliseconds (eager) to minutes (cold compiles).
    if value is None:
        return "–"
    return f"{value:.3g}" if value < 10 else f"{value:,.0f}"


def _ms(value: float) -> str:
    # Three significant figures from 1 ms up; tiny sizes need decimals.
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _note(row: Mapping[str, Any], width: int = 90) -> str:
    if row["status"] == "ok":
        # Graph breaks say a "compiled" row partly ran eagerly; then rounds that failed
        # although others succeeded.
        breaks = [f"{row['graph_breaks']} graph breaks"] if row["graph_breaks"] else []
        text = "; ".join(breaks + row["errors"])
    else:
        text = f"{row['status']}: {row.get('error') or ''}".rstrip(": ")
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def size_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The main markdown table of one size."""
    head = ("| optimizer | ms/step (median) | IQR ms | first step cold s | warm s | graphs "
            "| recompiles | state B/param | peak extra MiB | roofline % | note |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['optimizer']} | – | – | – | – | – | – | – | – | – | {_note(r)} |")
            continue
        lines.append(
            f"| {r['optimizer']} | {_ms(r['step_ms_median'])} "
            f"| {_ms(r['step_ms_q1'])}–{_ms(r['step_ms_q3'])} "
            f"| {_s(r['first_step_cold_s'])} | {_s(r['first_step_warm_s'])} "
            f"| {r['graphs_first_step']} | {r['recompiles']} "
            f"| {r['state_bytes_per_param']:.4f} | {r['peak_extra_bytes'] / MIB:,.1f} "
            f"| {_num(r['roofline_pct'])} | {_note(r)} |")
    return head + "\n".join(lines) + "\n"


def ratio_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """afx rows × anchors: median step time ratios (below 1 means afx is faster)."""
    anchors = [r["optimizer"] for r in rows if not r["afx"] and r["status"] == "ok"]
    subjects = [r for r in rows if r["afx"] and r["status"] == "ok"]
    if not anchors or not subjects:
        return ""
    head = ("| afx ÷ anchor | " + " | ".join(anchors) + " |\n"
            "|---|" + "---:|" * len(anchors) + "\n")
    lines = []
    for r in subjects:
        cells = []
        for a in anchors:
            cell = f"{r['ratios'][a]:.3f}×"
            # Bold the anchor the afx optimizer replaces: that is the comparison that matters.
            cells.append(f"**{cell}**" if REGISTRY[r["optimizer"]].counterpart == a else cell)
        lines.append(f"| {r['optimizer']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def scaling_table(rows: Sequence[Mapping[str, Any]], sizes: Sequence[str]) -> str:
    """Median ms/step and ns per parameter at each size (linear scaling ⇔ constant ns/param)."""
    head = ("| optimizer | " + " | ".join(f"{s} ms (ns/param)" for s in sizes) + " |\n"
            "|---|" + "---:|" * len(sizes) + "\n")
    keys = list(dict.fromkeys(r["optimizer"] for r in rows))
    by = {(r["optimizer"], r["size"]): r for r in rows}
    lines = []
    for key in keys:
        cells = []
        for s in sizes:
            r = by.get((key, s))
            if r is None or r["status"] != "ok":
                cells.append("–")
            else:
                ns = r["step_ms_median"] * 1e6 / r["params"]
                cells.append(f"{_ms(r['step_ms_median'])} ({ns:.2f})")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


# --- issue 5 targets ---------------------------------------------------------------------------

Check = Callable[[Mapping[str, Mapping[str, Any]]], tuple[str, bool | None]]


def _ratio_target(subject: str, anchor: str, limit: float) -> tuple[str, Check]:
    def check(by: Mapping[str, Mapping[str, Any]]) -> tuple[str, bool | None]:
        s, a = by.get(subject), by.get(anchor)
        if not s or not a or s["status"] != "ok" or a["status"] != "ok":
            return "not measured", None
        ratio = s["step_ms_median"] / a["step_ms_median"]
        return f"{ratio:.3f}×", ratio <= limit

    return f"{subject} step ≤ {limit}× {anchor}", check


def _value_target(subject: str, field: str, limit: float, what: str, unit: str,
                  scale: float = 1.0) -> tuple[str, Check]:
    def check(by: Mapping[str, Mapping[str, Any]]) -> tuple[str, bool | None]:
        s = by.get(subject)
        if not s or s["status"] != "ok" or s.get(field) is None:
            return "not measured", None
        value = s[field] if scale == 1 else s[field] / scale
        shown = f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"
        return f"{shown} {unit}".strip(), value <= limit

    bound = "= 0" if limit == 0 else f"≤ {limit:g} {unit}".strip()
    return f"{subject} {what} {bound}", check


def _state_target(subject: str) -> tuple[str, Check]:
    anchor = REGISTRY[subject].counterpart or ""

    def check(by: Mapping[str, Mapping[str, Any]]) -> tuple[str, bool | None]:
        s, a = by.get(subject), by.get(anchor)
        if not s or not a or s["status"] != "ok" or a["status"] != "ok":
            return "not measured", None
        # Every value the state keeps: tensors by their bytes, Python numbers (adafactor8bit's
        # step counters, where afx keeps a 4-byte tensor) at 8 bytes each.
        mine, theirs = _all_state_bytes(s), _all_state_bytes(a)
        tensors = s["state_bytes"] - a["state_bytes"]
        return (f"{mine / s['params']:.4f} vs {theirs / a['params']:.4f} (difference "
                f"{mine - theirs:+,} B in all, tensors alone {tensors:+,} B)"), mine <= theirs

    return f"{subject} state B/param, numbers included, ≤ {anchor}'s", check


def _all_state_bytes(row: Mapping[str, Any]) -> int:
    return row["state_bytes"] + PYTHON_NUMBER_BYTES * row["state_numbers"]


def targets() -> list[tuple[str, Check]]:
    """Issue 5's targets (defined for GPT-2-small shapes, fp32, one thread)."""
    out = [
        _ratio_target("afx-a8b-default", "a8b-default", 0.25),
        _ratio_target("afx-a8b-default", "hf-adafactor", 0.25),
        _ratio_target("afx-adafactor", "a8b-default", 0.25),
        _ratio_target("afx-adafactor", "hf-adafactor", 0.25),
        _ratio_target("afx-a8b-beta1", "a8b-beta1", 0.2),
        _ratio_target("afx-a8b-came", "a8b-came", 0.2),
        _ratio_target("afx-a8b-apollo", "a8b-apollo", 0.35),
        _ratio_target("afx-a8b-adamw", "torch-adamw-fused", 2.0),
        _ratio_target("afx-a8b-adamw", "torchao-adamw8bit", 0.05),
        _value_target("afx-a8b-default", "first_step_cold_s", 60, "first step, cold cache", "s"),
        _value_target("afx-a8b-default", "first_step_warm_s", 10, "first step, warm cache", "s"),
        _value_target("afx-a8b-default", "recompiles", 0, "recompiles after first step", ""),
    ]
    subjects = [s.key for s in REGISTRY.values() if s.afx]
    out += [_value_target(k, "peak_extra_bytes", 200, "peak extra memory", "MiB", MIB)
            for k in subjects]
    out += [_state_target(k) for k in subjects if REGISTRY[k].counterpart]
    return out


def evaluate_targets(rows: Sequence[Mapping[str, Any]], size: str) -> list[dict[str, Any]]:
    """Each target's measured value and verdict (``None`` = not measured) at ``size``.

    Only targets whose afx optimizer is among ``rows`` are listed.
    """
    by = {r["optimizer"]: r for r in rows if r["size"] == size}
    results = []
    for name, check in targets():
        if name.split()[0] not in by:
            continue
        value, passed = check(by)
        results.append({"target": name, "size": size, "measured": value, "pass": passed})
    return results


def targets_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Markdown rendering of :func:`evaluate_targets`."""
    verdict = {True: "pass", False: "**FAIL**", None: "not measured"}
    lines = [f"| {t['target']} | {t['measured']} | {verdict[t['pass']]} |" for t in results]
    return "| target | measured | verdict |\n|---|---:|---|\n" + "\n".join(lines) + "\n"
