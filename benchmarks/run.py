#!/usr/bin/env python
"""afx's benchmark: step time, compile time, state size, peak memory and roofline of optimizers.

Usage (see benchmarks/README.md)::

    python benchmarks/run.py [--sizes 5M,30M,124M] [--optimizers default] [--reps 3]
                             [--threads 1] [--out benchmarks/results]

Every (optimizer, size, round) runs in a fresh subprocess (``python -m afxbench.worker``), so
compile caches, allocator pools and RSS never carry over. Rounds are interleaved: round 1 runs
every optimizer once, then round 2, ..., each round starting one optimizer later, so slow drift
of the machine (a colleague's job, thermal state) spreads over all optimizers instead of
landing on one. Round 1 of each (optimizer, size) starts with an empty Inductor cache of its
own; later rounds reuse that directory, which gives the cold and warm first-step times.

This driver never imports torch: it only starts processes, collects their JSON and reports.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from afxbench import report  # noqa: E402  (needs the path above)
from afxbench.registry import GROUPS, REGISTRY  # noqa: E402
from afxbench.shapes import SIZES  # noqa: E402

#: Timed steps per round when --steps is not given: more where steps are short and noisy.
DEFAULT_STEPS = {"tiny": 20, "5M": 10, "30M": 5, "124M": 5}


# --- command line -------------------------------------------------------------------------------

def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and validates the command line (sizes and optimizer names resolved to keys)."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Benchmark afx's optimizers against their anchors on GPT-2-style shapes.",
        epilog="Optimizer groups: " + ", ".join(f"{k} ({len(v)})" for k, v in GROUPS.items())
        + ". Keys: " + ", ".join(REGISTRY) + ".")
    parser.add_argument("--sizes", default="5M,30M,124M",
                        help=f"comma-separated sizes from {', '.join(SIZES)} "
                             "(default: %(default)s)")
    parser.add_argument("--optimizers", default="default",
                        help="comma-separated optimizer keys or groups (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=3,
                        help="rounds, i.e. processes per (optimizer, size); round 1 is the "
                             "cold-cache one, so use >= 2 for warm first-step times "
                             "(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per round (default: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps between the first step and the timed ones "
                             "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch/OpenMP threads in every process (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results",
                        help="directory for the JSON and markdown reports (default: "
                             "benchmarks/results)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds before a measurement process is killed; its row then "
                             "reports the timeout (default: %(default)s)")
    parser.add_argument("--bandwidth-mib", type=int, default=256,
                        help="MiB per array of the bandwidth triad; keep 3 arrays well above "
                             "the last-level cache (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="parameter/gradient seed")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the temporary directory (Inductor caches, process logs)")
    parser.add_argument("--list", action="store_true", help="list the optimizers and exit")
    args = parser.parse_args(argv)

    by_lower = {name.lower(): name for name in SIZES}
    sizes = []
    for item in _csv(args.sizes):
        if item.lower() not in by_lower:
            parser.error(f"unknown size {item!r}; choose from {', '.join(SIZES)}")
        sizes.append(by_lower[item.lower()])
    keys: list[str] = []
    for item in _csv(args.optimizers):
        if item in GROUPS:
            keys += GROUPS[item]
        elif item in REGISTRY:
            keys.append(item)
        else:
            parser.error(f"unknown optimizer {item!r}; see --list")
    if args.reps < 1 or args.warmup < 0 or (args.steps is not None and args.steps < 1):
        parser.error("--reps and --steps must be >= 1, --warmup >= 0")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    args.sizes = list(dict.fromkeys(sizes))
    args.optimizers = list(dict.fromkeys(keys))
    return args


# --- machine description ------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: CPU flags (``/proc/cpuinfo``) of the vector extensions Inductor's C++ backend compiles for,
#: widest first: the code it writes for 8-bit states differs between them (``read_bytes``).
_SIMD_FLAGS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sve", "SVE"), ("asimd", "NEON"))


def simd_from_flags(flags: str) -> str | None:
    """The widest vector extension in a ``/proc/cpuinfo`` flags (or ``Features``) line.

    Example:
        >>> simd_from_flags("fpu sse2 avx avx2 fma avx512f avx512bw")
        'AVX-512'
        >>> simd_from_flags("fpu sse2") is None
        True
    """
    present = set(flags.split())
    return next((name for flag, name in _SIMD_FLAGS if flag in present), None)


def _simd() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return simd_from_flags(line.split(":", 1)[1])
    except OSError:
        pass
    return None


def _meminfo_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git(*cmd: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True,
                             timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _loadavg() -> str | None:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


def machine_info(threads: int) -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, memory, versions, afx revision, environment."""
    dirty = _git("status", "--porcelain")
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    return {
        "cpu_model": _cpu_model(),
        "simd": _simd(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": affinity,
        "l3_cache": l3.read_text().strip() if l3.exists() else None,
        "memory_gib": _meminfo_gib(),
        "threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "transformers", "adafactor8bit",
                                              "torchao", "afx", "optree")},
        "afx_commit": _git("rev-parse", "HEAD"),
        "afx_uncommitted_changes": dirty.splitlines() if dirty else [],
        "environment": {k: v for k, v in os.environ.items()
                        if k.startswith(("TORCH", "OMP_", "MKL_", "KMP_", "MALLOC"))},
        "loadavg_start": _loadavg(),
    }


# --- subprocesses -------------------------------------------------------------------------------

def _child_env(threads: int, cache_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    # OpenMP reads these at start-up, before torch.set_num_threads runs in the worker; Inductor
    # also bakes the thread count into the kernels it compiles.
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    if cache_dir is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    return env


def _tail(path: Path, lines: int = 12) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def run_process(module: str, spec: dict[str, Any], work: Path, name: str, timeout: float,
                env: dict[str, str]) -> dict[str, Any]:
    """Runs ``python -m module SPEC`` and returns its result JSON, or an error result.

    The child gets its own session so that a timeout kills it together with the compile
    workers Inductor may have started (one signal to its process group, nothing else).
    """
    spec = {**spec, "result": str(work / f"{name}.result.json")}
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    out_log, err_log = work / f"{name}.stdout", work / f"{name}.stderr"
    start = time.perf_counter()
    with open(out_log, "w") as out, open(err_log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", module, str(spec_path)], cwd=REPO,
                                env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return {"status": "timeout", "error": f"killed after {timeout:.0f} s",
                    "wall_s": time.perf_counter() - start}
        except BaseException:  # Ctrl-C: do not leave the child running
            _kill_group(proc)
            raise
    wall = time.perf_counter() - start
    result_path = Path(spec["result"])
    if result_path.exists():
        return {**json.loads(result_path.read_text()), "wall_s": wall}
    detail = _tail(err_log) or "(no output)"
    return {"status": "error", "error": f"process exited with code {code}: {detail}",
            "wall_s": wall}


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def probe_bandwidth(args: argparse.Namespace, work: Path, name: str) -> dict[str, Any]:
    """Measures memory bandwidth in a fresh process with the benchmark's thread count."""
    spec = {"threads": args.threads, "mib": args.bandwidth_mib, "reps": 10}
    return run_process("afxbench.probe", spec, work, name, min(args.timeout, 600.0),
                       _child_env(args.threads, None))


# --- the run ------------------------------------------------------------------------------------

def _clock(seconds: float) -> str:
    return str(dt.timedelta(seconds=int(seconds)))


def _describe(result: dict[str, Any]) -> str:
    if result.get("status") != "ok":
        text = f"{result.get('status')}: {result.get('error')}".replace("\n", " | ")
        return text if len(text) < 160 else text[:159] + "…"
    times = sorted(result["step_ms"])
    median = times[len(times) // 2] if len(times) % 2 else sum(
        times[len(times) // 2 - 1: len(times) // 2 + 1]) / 2
    cache = "cold" if result["round"] == 0 else "warm"
    return (f"median {median:.4g} ms ({len(times)} steps)  first {result['first_step_s']:.3g} s "
            f"({cache})  state {result['state_bytes'] / result['numel']:.3f} B/param  "
            f"peak +{result['peak_extra_bytes'] / 2**20:.1f} MiB  "
            f"recompiles {result['recompiles']}")


class Run:
    """State of one benchmark run: measurements so far and how to report them."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.started = time.perf_counter()
        self.date = dt.datetime.now(dt.timezone.utc)
        self.machine = machine_info(args.threads)
        self.bandwidth: dict[str, dict[str, Any]] = {}
        self.rounds: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.unavailable: dict[str, str] = {}
        for key in args.optimizers:
            missing = [m for m in REGISTRY[key].requires if importlib.util.find_spec(m) is None]
            if missing:
                self.unavailable[key] = f"{', '.join(missing)} not installed"
        stamp = self.date.strftime("%Y%m%d-%H%M%S")
        self.json_path = args.out / f"afxbench-{stamp}.json"
        self.md_path = args.out / f"afxbench-{stamp}.md"

    def steps_for(self, size: str) -> int:
        """Timed steps per round at ``size`` (``--steps`` or the per-size default)."""
        return self.args.steps or DEFAULT_STEPS[size]

    def bandwidth_gbps(self) -> float | None:
        """The roofline's bandwidth: the best of the probes that succeeded, GB/s."""
        rates = [b["best_gbps"] for b in self.bandwidth.values() if b.get("status") == "ok"]
        return max(rates) if rates else None

    def measure(self) -> None:
        """Runs every (optimizer, size, round) process and prints a line for each."""
        args = self.args
        runnable = [k for k in args.optimizers if k not in self.unavailable]
        total = len(args.sizes) * args.reps * len(runnable)
        done = 0
        for key, why in self.unavailable.items():
            print(f"skip {key}: {why}")
        for size in args.sizes:
            durations: list[float] = []
            remaining = args.reps * len(runnable)
            for rnd in range(args.reps):
                shift = rnd % max(1, len(runnable))
                for key in runnable[shift:] + runnable[:shift]:
                    remaining -= 1
                    history = self.rounds.setdefault((key, size), [])
                    if history and history[0].get("status") != "ok":
                        # Round 1 failed: the same process would fail again; spend no time on it.
                        total -= 1
                        continue
                    done += 1
                    print(f"[{done:>3}/{total}  {_clock(time.perf_counter() - self.started)}] "
                          f"{size:>4}  round {rnd + 1}/{args.reps}  {key:<26}",
                          end="", flush=True)
                    result = self.run_one(key, size, rnd)
                    history.append(result)
                    durations.append(result.get("wall_s", 0.0))
                    eta = remaining * sum(durations) / len(durations)
                    print(f"{_describe(result)}  [{result.get('wall_s', 0):.0f} s; "
                          f"{size} left ~{_clock(eta)}]", flush=True)
                    self.write()

    def run_one(self, key: str, size: str, rnd: int) -> dict[str, Any]:
        """One worker process; round 0 gets a fresh Inductor cache dir, later rounds reuse it."""
        cache = self.work / "inductor" / f"{size}-{key}"
        if rnd == 0:
            shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True, exist_ok=True)
        spec = {"optimizer": key, "size": size, "round": rnd, "steps": self.steps_for(size),
                "warmup": self.args.warmup, "memory_steps": 1, "threads": self.args.threads,
                "seed": self.args.seed}
        result = run_process("afxbench.worker", spec, self.work / "logs",
                             f"{size}-{key}-r{rnd}", self.args.timeout,
                             _child_env(self.args.threads, cache))
        return {"optimizer": key, "size": size, "round": rnd, **result}

    def rows(self) -> list[dict[str, Any]]:
        """Summaries in report order: sizes as given, optimizers in registry order."""
        bw = self.bandwidth_gbps()
        rows = []
        for size in self.args.sizes:
            for key in REGISTRY:
                if key not in self.args.optimizers:
                    continue
                if key in self.unavailable:
                    rows.append(report.summarize(key, size, [], bw, "not installed",
                                                 self.unavailable[key]))
                elif (key, size) in self.rounds:
                    rows.append(report.summarize(key, size, self.rounds[key, size], bw))
        report.add_ratios(rows)
        return rows

    def document(self, complete: bool) -> tuple[dict[str, Any], str]:
        """The JSON document and the markdown report of everything measured so far."""
        args, rows = self.args, self.rows()
        measured = [s for s in args.sizes if any(r["size"] == s for r in rows)]
        target_size = "124M" if "124M" in measured else (measured[-1] if measured else None)
        targets = report.evaluate_targets(rows, target_size) if target_size else []
        command = shlex.join(["python", *sys.argv])
        machine = {**self.machine, "loadavg_now": _loadavg()}
        doc = {
            "command": command,
            "date_utc": self.date.isoformat(timespec="seconds"),
            "complete": complete,
            "wall_s": time.perf_counter() - self.started,
            "machine": machine,
            "settings": {"sizes": args.sizes, "optimizers": args.optimizers, "reps": args.reps,
                         "steps": {s: self.steps_for(s) for s in args.sizes},
                         "warmup": args.warmup, "threads": args.threads,
                         "timeout_s": args.timeout, "seed": args.seed,
                         "bandwidth_array_mib": args.bandwidth_mib},
            "bandwidth": {**self.bandwidth, "used_gbps": self.bandwidth_gbps()},
            "sizes": {s: {"params": SIZES[s].numel(), "tensors": len(SIZES[s].tensors()),
                          "shape": vars(SIZES[s])} for s in args.sizes},
            "results": rows,
            "targets": targets,
        }
        return doc, self.markdown(doc, rows, measured, target_size, targets)

    def markdown(self, doc: dict[str, Any], rows: list[dict[str, Any]], measured: list[str],
                 target_size: str | None, targets: list[dict[str, Any]]) -> str:
        """Human-readable report: machine, bandwidth, one table per size, ratios, scaling."""
        m = doc["machine"]
        bw = doc["bandwidth"]
        bw_text = ", ".join(f"{k} {v['best_gbps']:.2f} GB/s (median {v['median_gbps']:.2f})"
                            if v.get("status") == "ok" else f"{k} {v.get('error')}"
                            for k, v in bw.items() if k != "used_gbps")
        parts = [
            f"# afx benchmark, {doc['date_utc']}{'' if doc['complete'] else ' (incomplete)'}\n",
            f"Command: `{doc['command']}`\n",
            f"Machine: {m['cpu_model']} ({m.get('simd') or 'SIMD unknown'}), "
            f"{m['cpus_available']} CPUs available "
            f"({m['logical_cpus']} logical), L3 {m['l3_cache']}, "
            f"{_fmt_gib(m['memory_gib'])} RAM; {doc['settings']['threads']} thread(s); "
            f"torch {m['versions']['torch']}, transformers {m['versions']['transformers']}, "
            f"adafactor8bit {m['versions']['adafactor8bit']}, "
            f"torchao {m['versions']['torchao']}; "
            f"afx {(m['afx_commit'] or '?')[:10]}"
            f"{' + uncommitted changes' if m['afx_uncommitted_changes'] else ''}; "
            f"load average at start {m['loadavg_start']}, at end {m['loadavg_now']}.\n",
            f"Memory bandwidth (fp32 triad, {doc['settings']['bandwidth_array_mib']} MiB "
            f"arrays): {bw_text or 'not measured'}; the roofline uses "
            f"{_fmt_gbps(bw['used_gbps'])}.\n",
            f"Per optimizer and size: {doc['settings']['reps']} process(es) interleaved, "
            f"first step + {doc['settings']['warmup']} warm-up + timed steps "
            f"({', '.join(f'{k}: {v}' for k, v in doc['settings']['steps'].items())}); "
            "medians pool the timed steps of all rounds. Methods: benchmarks/README.md.\n",
        ]
        for size in measured:
            size_rows = [r for r in rows if r["size"] == size]
            info = doc["sizes"][size]
            parts.append(f"## {size}: {info['params']:,} parameters in {info['tensors']} "
                         "tensors\n")
            parts.append(report.size_table(size_rows))
            parts.append(self._cache_note(size))
            ratios = report.ratio_table(size_rows)
            if ratios:
                parts.append("Median step time of each afx optimizer divided by each anchor's "
                             "(bold: the optimizer it replaces):\n")
                parts.append(ratios)
        if len(measured) > 1:
            parts.append("## Scaling\n")
            parts.append(report.scaling_table(rows, measured))
        if targets:
            note = "" if target_size == "124M" else (
                f" (measured at {target_size}; the targets are defined for 124M)")
            parts.append(f"## Issue 5 targets at {target_size}{note}\n")
            parts.append(report.targets_table(targets))
        return "\n".join(parts)

    def _cache_note(self, size: str) -> str:
        """Parameters + gradients against the L3 size, to read roofline % above 100."""
        data = SIZES[size].numel() * 8
        l3 = _l3_bytes(self.machine["l3_cache"])
        text = f"fp32 parameters + gradients: {data / 2**20:,.0f} MiB"
        if l3 is None:
            return text + ".\n"
        text += f"; L3 cache {l3 / 2**20:,.0f} MiB"
        if data < 2 * l3:
            text += (" — much of the data can stay in cache between steps, so roofline % "
                     "(a DRAM bound) can exceed 100 here")
        return text + ".\n"

    def write(self, complete: bool = False) -> str:
        """Writes JSON and markdown (after every measurement, so an interrupted run keeps data)."""
        doc, md = self.document(complete)
        self.args.out.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        self.md_path.write_text(md)
        return md


def _l3_bytes(text: str | None) -> int | None:
    # sysfs writes sizes like "266240K" or "32M".
    if not text:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    try:
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except ValueError:
        return None


def _fmt_gib(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f} GiB"


def _fmt_gbps(value: float | None) -> str:
    return "nothing (no bandwidth measured)" if value is None else f"{value:.2f} GB/s"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark described by the command line; returns the exit status."""
    args = parse_args(argv)
    if args.list:
        for spec in REGISTRY.values():
            groups = [g for g, keys in GROUPS.items() if spec.key in keys]
            print(f"{spec.key:<26} {spec.label:<40} {', '.join(groups)}")
        return 0
    args.out = args.out.resolve()
    work = Path(tempfile.mkdtemp(prefix="afxbench-"))
    (work / "logs").mkdir()
    run = Run(args, work)
    print(f"afxbench: sizes {','.join(args.sizes)}; {len(args.optimizers)} optimizers; "
          f"{args.reps} round(s); {args.threads} thread(s); work dir {work}", flush=True)
    try:
        return _run(run, args, work)
    finally:
        if args.keep_work:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(run: Run, args: argparse.Namespace, work: Path) -> int:
    """Bandwidth, all measurements, bandwidth again, report; Ctrl-C reports what was done."""
    status = 0
    try:
        print("bandwidth ... ", end="", flush=True)
        run.bandwidth["start"] = probe_bandwidth(args, work / "logs", "bandwidth-start")
        print(_fmt_gbps(run.bandwidth_gbps()), flush=True)
        run.measure()
        print("bandwidth ... ", end="", flush=True)
        run.bandwidth["end"] = probe_bandwidth(args, work / "logs", "bandwidth-end")
        end = run.bandwidth["end"]
        print(f"{end['best_gbps']:.2f} GB/s" if end.get("status") == "ok"
              else end.get("error"), flush=True)
        md = run.write(complete=True)
    except KeyboardInterrupt:
        print("\ninterrupted: reporting what was measured", flush=True)
        md = run.write(complete=False)
        status = 130
    print()
    print(md)
    print(f"wrote {run.json_path}\nwrote {run.md_path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
