#!/usr/bin/env python
"""Where the floor of afx's compiled step lies on this machine, and why.

Usage (see benchmarks/README.md)::

    python benchmarks/floor.py [--anchors benchmarks/results/afxbench-*.json] [--reps 7]

Four measurements in one process, one thread:

1. memory bandwidth (the triad of ``afxbench.probe``);
2. the cost per element of the cheapest loops a step is built from, each compiled by Inductor
   alone on a tensor of the embedding's shape (``afxbench.primitives``);
3. the passes over memory of each afx configuration's compiled bucket, read from Inductor's
   C++ output for one 3072×768 parameter (``afxbench.passes``);
4. APOLLO's rank-256 projection of the 124M model's gradients (``afxbench.projection``).

With a result file of ``benchmarks/run.py`` (``--anchors``, default: the newest in
``benchmarks/results``), it turns them into lower bounds on the 124M step and sets them against
the issue's targets, as a markdown table and JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO))

from afxbench import passes, primitives, probe, projection  # noqa: E402  (needs the path above)
from afxbench.registry import A8B_CONFIGS  # noqa: E402
from run import machine_info  # noqa: E402

#: afx configurations whose compiled bucket is read, with their benchmark keys.
CONFIGS = {"afx-adafactor": None, "afx-a8b-default": "default", "afx-a8b-beta1": "beta1",
           "afx-a8b-came": "came", "afx-a8b-adamw": "adamw", "afx-a8b-apollo": "apollo"}

#: Bytes per element every Adafactor step with update clipping and parameter scaling moves at
#: least through Inductor: p read for its RMS, g read for the row statistics, g read again for
#: the column statistics and the clip's sum (Inductor cannot put a row loop and a column loop
#: in one sweep), then p and g read and p written by the update itself.
ADAFACTOR_MIN_BYTES = 24

#: The APOLLO preset's rank (``A8B_CONFIGS["apollo"]``).
APOLLO_RANK = A8B_CONFIGS["apollo"]["apollo_rank"]


def _shape(text: str) -> tuple[int, int]:
    rows, cols = (int(v) for v in text.lower().split("x"))
    return rows, cols


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--anchors", type=Path, default=None,
                        help="benchmarks/run.py JSON with 124M results (default: newest)")
    parser.add_argument("--reps", type=int, default=7, help="timed calls per primitive")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", type=_shape, default=(50257, 768),
                        help="tensor shape of the primitives (default: GPT-2's embedding)")
    parser.add_argument("--pass-shape", type=_shape, default=(3072, 768),
                        help="parameter shape whose compiled bucket is read")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be at least 1, got {args.reps}")
    if args.anchors is None:
        found = sorted((BENCH_DIR / "results").glob("afxbench-*.json"))
        args.anchors = found[-1] if found else None
    return args


def read_passes(shape: tuple[int, int]) -> dict[str, dict[str, Any]]:
    """Compiles each afx configuration for one parameter and counts its passes."""
    import torch
    from torch._inductor.utils import fresh_cache, run_and_get_code

    import afx

    out = {}
    for key, config in CONFIGS.items():
        print(f"  passes: {key}", flush=True)
        param = torch.nn.Parameter(torch.randn(shape) * 0.02)
        param.grad = torch.randn(shape) * 1e-3
        opt = (afx.Adafactor([param]) if config is None
               else afx.Adafactor8Bit([param], **A8B_CONFIGS[config]))
        with fresh_cache():  # a cache hit would return no source
            _, sources = run_and_get_code(opt.step)
        found = [passes.analyse(source, param.numel()) for source in sources]
        out[key] = {
            "graphs": len(sources),
            "passes": sum(len(k.passes) for k in found),
            "bytes_per_element": sum(k.bytes_per_element for k in found),
            "code_loads": sum(k.code_loads for k in found),
            "temporaries_per_element": sum(k.temporaries_bytes for k in found) / param.numel(),
            "detail": [[vars(p) for p in k.passes] for k in found],
        }
    return out


def _anchor_ms(anchors: dict[str, Any] | None) -> tuple[dict[str, float], int | None]:
    if anchors is None:
        return {}, None
    rows = [r for r in anchors["results"] if r["size"] == "124M" and r["step_ms_median"]]
    return {r["optimizer"]: r["step_ms_median"] for r in rows}, (rows[0]["params"] if rows
                                                                 else None)


#: The plain fp32 loops whose effective rate caps the bandwidth the bounds assume.
FP32_LOOPS = ("fp32_read", "fp32_update")


def bounds_bandwidth(triad_gbps: float, anchor_gbps: float | None,
                     prims: dict[str, dict[str, Any]]) -> float:
    """The bandwidth the lower bounds assume: the fastest rate any measurement reached.

    That is the larger of the triad's best (this run's or the anchor run's) and the effective
    rate of the plain fp32 loops. A higher bandwidth only lowers the bounds, so they hold for
    every one of these machine states. The fp32 loops matter on a CPU whose last-level cache
    holds a sizeable part of a parameter (480 MiB of L3 on one Xeon seen): there the triad's
    256 MiB arrays come from DRAM, but a loop over one embedding-sized tensor, like the later
    passes of a step over one bucket, is partly served from cache and runs faster.
    """
    loops = [prims[name]["gbps"] for name in FP32_LOOPS if name in prims]
    return max([triad_gbps, anchor_gbps or 0.0, *loops])


def bounds(prims: dict[str, dict[str, Any]], gbps: float, numel: int,
           ms: dict[str, float], projection_ms: float | None = None) -> list[dict[str, Any]]:
    """Lower bounds on the 124M step of each target, next to the target and the measurement.

    ``at_bandwidth(b)`` is the time ``b`` bytes per element take at the measured bandwidth.
    An 8-bit state adds the measured cost of the cheapest loop updating its code (fixed scale
    for a linear code, fixed range for a log-space one) minus the time of its own gradient
    read, which a fused step would share; this assumes that loop's compute does not overlap
    other passes' memory traffic, as no two loop nests of Inductor's C++ output do.
    APOLLO's bound (given ``projection_ms``, the time of its projection's matrix products,
    which read the gradient) adds the 12 B per element of the parameter update alone.
    """
    def at_bandwidth(nbytes: float) -> float:
        return 1e3 * nbytes * numel / (gbps * 1e9)

    def without_g(loop: str) -> float:
        return max(0.0, prims[loop]["ns_per_element"] * numel / 1e6 - at_bandwidth(4))

    code_without_g = without_g("code_update_fixed_scale")
    # The AdamW-like preset keeps its second moment in al8, a log-space code.
    adamw = at_bandwidth(12) + code_without_g + without_g("log_code_update_fixed_range")
    adamw_basis = "12 B/element + one 8-bit and one log-space 8-bit update loop"
    adafactor = at_bandwidth(ADAFACTOR_MIN_BYTES)
    rows = [
        ("afx-a8b-default", "a8b-default", 0.25, adafactor, "24 B/element at bandwidth"),
        ("afx-adafactor", "hf-adafactor", 0.25, adafactor, "24 B/element at bandwidth"),
        ("afx-a8b-beta1", "a8b-beta1", 0.2, adafactor + code_without_g,
         "24 B/element + one 8-bit update loop"),
        ("afx-a8b-came", "a8b-came", 0.2, adafactor + code_without_g,
         "24 B/element + one 8-bit update loop (CAME's own passes not counted)"),
        ("afx-a8b-adamw", "torch-adamw-fused", 2.0, adamw, adamw_basis),
        ("afx-a8b-adamw", "torchao-adamw8bit", 0.05, adamw, adamw_basis),
    ]
    if projection_ms is not None:
        rows.append(("afx-a8b-apollo", "a8b-apollo", 0.35, projection_ms + at_bandwidth(12),
                     f"the rank-{APOLLO_RANK} projection's products + 12 B/element"))
    out = []
    for afx_key, anchor, ratio, floor_ms, basis in rows:
        target = ratio * ms[anchor] if anchor in ms else None
        out.append({"optimizer": afx_key, "anchor": anchor, "ratio": ratio,
                    "target_ms": target, "floor_ms": floor_ms, "basis": basis,
                    "measured_ms": ms.get(afx_key),
                    "reachable": None if target is None else floor_ms <= target})
    return out


def _n(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def markdown(doc: dict[str, Any]) -> str:
    """The report."""
    bw = doc["bandwidth"]
    lines = [
        f"# afx floor analysis, {doc['date_utc']}", "",
        f"Command: `{doc['command']}`", "",
        f"Machine: {doc['machine']['cpu_model']} "
        f"({doc['machine'].get('simd') or 'SIMD unknown'}), "
        f"{doc['machine']['cpus_available']} CPUs, "
        f"L3 {doc['machine']['l3_cache']}; {doc['machine']['threads']} thread; torch "
        f"{doc['machine']['versions']['torch']}; afx {str(doc['machine']['afx_commit'])[:10]}.",
        "",
        f"Bandwidth (fp32 triad, 256 MiB arrays): best {bw['best_gbps']:.2f} GB/s, median "
        f"{bw['median_gbps']:.2f} GB/s. The lower bounds use {doc['bounds_gbps']:.2f} GB/s, the "
        "fastest of this best, the anchor run's and the rate of the plain fp32 loops below.", "",
        f"## Loops alone (Inductor C++, one tensor of {doc['shape'][0]}×{doc['shape'][1]}, "
        f"median of {doc['reps']} calls)", "",
        "| loop | what | B/element | ns/element | GB/s | % of triad | ms at 124M |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    numel = doc["numel_124M"] or 0
    for p in doc["primitives"].values():
        lines.append(f"| {p['name']} | {p['what']} | {p['bytes_per_element']:g} | "
                     f"{p['ns_per_element']:.3f} | {p['gbps']:.1f} | "
                     f"{100 * p['gbps'] / bw['best_gbps']:.0f} | "
                     f"{_n(p['ns_per_element'] * numel / 1e6)} |")
    lines += ["", f"## Passes of each compiled bucket (one {doc['pass_shape'][0]}×"
              f"{doc['pass_shape'][1]} parameter, read from Inductor's output code)", "",
              "| optimizer | passes | B/element | 8-bit loads | fp32 temporaries B/element | "
              "these bytes at the bounds' bandwidth, ms at 124M | measured ms at 124M |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for key, p in doc["passes"].items():
        at_bw = 1e3 * p["bytes_per_element"] * numel / (doc["bounds_gbps"] * 1e9)
        lines.append(f"| {key} | {p['passes']} | {p['bytes_per_element']} | {p['code_loads']} "
                     f"| {p['temporaries_per_element']:g} | {_n(at_bw)} | "
                     f"{_n(doc['measured_ms'].get(key))} |")
    proj = doc.get("projection")
    if proj:
        lines += ["", f"## APOLLO's projection (rank {proj['rank']}, the 124M model's matrices, "
                  f"median of {doc['reps']} products each)", "",
                  f"{_n(proj['ms'])} ms per step: {proj['gflop']:.1f} GFLOP at "
                  f"{proj['gflops']:.0f} GFLOP/s with the faster library ("
                  + ", ".join(f"{name} {_n(ms)} ms"
                              for name, ms in proj.get("libraries", {}).items()) + ")."]
    if doc["bounds"]:
        lines += ["", f"## Lower bounds against the targets (124M; anchors from "
                  f"`{doc['anchors']}`)", "",
                  "| target | target ms | lower bound ms | basis | measured ms | reachable |",
                  "|---|---:|---:|---|---:|---|"]
        for b in doc["bounds"]:
            verdict = {True: "not ruled out", False: "**no**", None: "—"}[b["reachable"]]
            lines.append(f"| {b['optimizer']} ≤ {b['ratio']}× {b['anchor']} | "
                         f"{_n(b['target_ms'])} | {_n(b['floor_ms'])} | {b['basis']} | "
                         f"{_n(b['measured_ms'])} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the three measurements and writes ``afxfloor-<UTC time>.{json,md}``."""
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.timezone.utc)
    print("bandwidth", flush=True)
    bandwidth = probe.measure({"threads": args.threads, "mib": 256, "reps": 6})
    prims = {}
    for prim in primitives.PRIMITIVES:
        print(f"  loop: {prim.name}", flush=True)
        prims[prim.name] = primitives.time_primitive(prim, args.shape, args.reps)
    found = read_passes(args.pass_shape)
    from afxbench.shapes import SIZES

    print("  projection", flush=True)
    proj = projection.time_projection([s for _, s in SIZES["124M"].tensors()], APOLLO_RANK,
                                      args.reps)
    anchors = json.loads(args.anchors.read_text()) if args.anchors else None
    ms, numel = _anchor_ms(anchors)
    bounds_gbps = bounds_bandwidth(
        bandwidth["best_gbps"], (anchors or {}).get("bandwidth", {}).get("used_gbps"), prims)
    if numel is None:
        numel = SIZES["124M"].numel
    doc = {
        "command": " ".join(["python benchmarks/floor.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": started.isoformat(timespec="seconds"),
        "machine": machine_info(args.threads), "bandwidth": bandwidth,
        "shape": list(args.shape), "pass_shape": list(args.pass_shape), "reps": args.reps,
        "numel_124M": numel, "anchors": str(args.anchors.relative_to(REPO)
                                            if args.anchors and args.anchors.is_relative_to(REPO)
                                            else args.anchors),
        "measured_ms": ms, "primitives": prims, "passes": found, "projection": proj,
        "bounds_gbps": bounds_gbps,
        "bounds": bounds(prims, bounds_gbps, numel, ms, proj["ms"]) if ms else [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"afxfloor-{started.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    text = markdown(doc)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
