"""One measurement process: one optimizer, one size, one round.

Run as ``python -m afxbench.worker SPEC.json`` by ``benchmarks/run.py``; the spec names the
optimizer, size, step counts, thread count and where to write the result JSON. The Inductor
cache directory and thread environment variables are set by the driver before the process
starts, so the first step sees a cold or a warm cache as the driver intends.

Phases, in order: build parameters and gradients; construct the optimizer; time the first
step (compilation included); ``warmup`` untimed steps; ``steps`` timed steps (default glibc
malloc); one untimed memory step (see :mod:`afxbench.memory`); state and compile statistics.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def state_bytes(state: Any) -> tuple[int, int]:
    """Bytes of all tensors in an optimizer state, and how many plain numbers it also holds.

    Each tensor is counted once even if reachable twice (by data pointer and size). Tensor
    subclasses that wrap plain tensors (torchao's quantized states) are counted through their
    inner tensors, because their own ``nbytes`` reports the logical dtype, not the storage.
    """
    import torch
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    seen: set[tuple[int, int]] = set()
    total = numbers = 0

    def visit(x: Any) -> None:
        nonlocal total, numbers
        if isinstance(x, torch.Tensor):
            if is_traceable_wrapper_subclass(x):
                names, _ = x.__tensor_flatten__()
                for name in names:
                    visit(getattr(x, name))
                return
            key = (x.data_ptr(), x.nbytes)
            if key not in seen:
                seen.add(key)
                total += x.nbytes
        elif isinstance(x, dict):
            for value in x.values():
                visit(value)
        elif isinstance(x, (list, tuple)):
            for value in x:
                visit(value)
        elif isinstance(x, (int, float)):  # bool is an int: flags count as numbers too
            numbers += 1

    visit(state)
    return total, numbers


def _counter(name: str, key: str) -> int:
    from torch._dynamo.utils import counters

    return int(counters[name][key])


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs the phases described in the module docstring and returns the measurements."""
    import torch

    from afxbench import memory
    from afxbench.registry import REGISTRY
    from afxbench.shapes import SIZES, make_params

    torch.set_num_threads(spec["threads"])
    params = make_params(SIZES[spec["size"]], seed=spec["seed"])
    numel = sum(p.numel() for p in params)
    # Minimal traffic of any optimizer: read the gradient, read and write the parameter.
    base_bytes = sum(p.numel() * (p.grad.element_size() + 2 * p.element_size())
                     for p in params)
    rss_params = memory.rss_bytes()

    opt, step = REGISTRY[spec["optimizer"]].build(params)
    start = time.perf_counter()
    step()
    first_step_s = time.perf_counter() - start
    graphs_first = _counter("stats", "unique_graphs")

    for _ in range(spec["warmup"]):
        step()
    gc.collect()
    # Rise of the peak during the timed steps themselves (default malloc): near zero when
    # the allocator reuses the previous steps' blocks, so it is reported only in the JSON.
    rss_steady = memory.rss_bytes()
    hwm_reset = memory.reset_hwm()
    times_ms = []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        step()
        times_ms.append((time.perf_counter() - start) * 1e3)
    peak_steady = max(memory.hwm_bytes(), memory.rss_bytes())

    gc.collect()
    malloc_fixed = memory.release_and_fix_malloc()
    rss_before, peak, method = memory.peak_during(step, repeat=spec["memory_steps"])
    graphs_end = _counter("stats", "unique_graphs")

    tensor_bytes, numbers = state_bytes(opt.state)
    # Imported only now: eager optimizers should not pay for it before being timed.
    from torch._inductor import config as inductor_config

    return {
        "numel": numel,
        "tensors": len(params),
        "first_step_s": first_step_s,
        "step_ms": times_ms,
        "graphs_first_step": graphs_first,
        "recompiles": graphs_end - graphs_first,
        "graph_breaks": _graph_breaks(),
        "state_bytes": tensor_bytes,
        "state_numbers": numbers,
        "min_bytes_per_step": base_bytes + 2 * tensor_bytes,
        "peak_extra_bytes": max(0, peak - rss_before),
        "memory_method": method + ("; glibc mmap threshold fixed at 64 KiB, heap trimmed"
                                   if malloc_fixed else "; malloc not adjusted (not glibc)"),
        "rss_params_bytes": rss_params,
        "rss_steady_bytes": rss_steady,
        "steady_hwm_rise_bytes": max(0, peak_steady - rss_steady) if hwm_reset else None,
        "torch_threads": torch.get_num_threads(),
        # Inductor compiles in this many worker processes: it sets the cold first-step time.
        "inductor_compile_threads": inductor_config.compile_threads,
    }


def main(argv: list[str]) -> int:
    """Entry point: reads the spec, measures, writes the result JSON (errors included)."""
    spec = json.loads(Path(argv[0]).read_text())
    result: dict[str, Any] = {"optimizer": spec["optimizer"], "size": spec["size"],
                              "round": spec["round"]}
    try:
        result.update(measure(spec))
        result["status"] = "ok"
    except NotImplementedError as exc:
        result.update(status="not implemented", error=str(exc))
    except Exception as exc:  # any failure becomes a row of the report, not a crash
        result.update(status="error", error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc())
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
