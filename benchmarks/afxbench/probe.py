"""Memory-bandwidth probe: a STREAM-triad-like torch op, run in its own process.

Run as ``python -m afxbench.probe SPEC.json`` (spec: ``threads``, ``mib`` per array, ``reps``,
``result``). Measures ``a = b + s·c`` with ``torch.add(b, c, alpha=s, out=a)`` on three fp32
arrays of ``mib`` MiB each, with the thread count of the optimizer processes. Bytes are counted
as STREAM does: two arrays read and one written (3 × size), no write-allocate traffic; the
optimizers' byte model (:mod:`afxbench.worker`) counts the same way, so the ratio is fair.
``out=`` writes into an array touched beforehand, so no page faults enter the timing.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs the triad ``reps`` times; returns best and median GB/s (1 GB = 1e9 bytes)."""
    import torch

    torch.set_num_threads(spec["threads"])
    n = spec["mib"] * 2**20 // 4
    a = torch.zeros(n)
    b = torch.rand(n)
    c = torch.rand(n)
    moved = 3 * n * 4
    rates = []
    for _ in range(spec["reps"]):
        start = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        rates.append(moved / (time.perf_counter() - start) / 1e9)
    rates = rates[1:] if len(rates) > 1 else rates  # the first pass warms TLBs and code
    return {
        "best_gbps": max(rates),
        "median_gbps": statistics.median(rates),
        "array_mib": spec["mib"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def main(argv: list[str]) -> int:
    """Entry point: reads the spec, measures, writes the result JSON (errors included)."""
    spec = json.loads(Path(argv[0]).read_text())
    try:
        result = {"status": "ok", **measure(spec)}
    except Exception as exc:  # reported, never fatal to the run
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
