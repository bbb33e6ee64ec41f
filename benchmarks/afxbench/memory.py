"""Process memory measurements for the worker: RSS, its peak, and making the peak meaningful.

The quantity reported is *peak extra memory during a step*: how far the process's resident set
rises above what it held just before the step. Two things make this hard on Linux with glibc:

* The kernel keeps one lifetime peak (``VmHWM``); it can be reset to the current RSS by
  writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0). Where that is refused, a thread
  samples ``VmRSS`` instead, which can miss spikes shorter than its period.
* glibc keeps freed memory of earlier steps resident for reuse (its mmap threshold grows up to
  32 MiB after the first large free), so the RSS *before* a step already contains the previous
  step's temporaries and the step shows no rise at all. Before the measured step we therefore
  fix the mmap threshold at 64 KiB (every larger allocation is then mapped on allocation and
  unmapped on free, so RSS falls back after each temporary) and return free heap pages with
  ``malloc_trim``. That changes allocation speed, so it is done after the timed steps, for a
  separate, untimed measurement step.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE")
# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def rss_bytes() -> int:
    """Current resident set size (``/proc/self/statm``, cheap enough to sample in a loop)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def hwm_bytes() -> int:
    """The kernel's peak resident set size since start or the last reset (``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def reset_hwm() -> bool:
    """Resets ``VmHWM`` to the current RSS; ``False`` if the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def release_and_fix_malloc() -> bool:
    """Returns glibc's free heap pages to the kernel and stops it keeping large freed blocks.

    Returns ``False`` when the C library is not glibc (then the peak is measured as is).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    # Setting either threshold explicitly also switches off glibc's dynamic adjustment.
    ok = mallopt(_M_MMAP_THRESHOLD, 64 * 1024) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 128 * 1024) == 1 and ok
    malloc_trim(0)
    return ok


class _Sampler:
    """Samples RSS in a background thread (torch kernels release the GIL, so it runs)."""

    def __init__(self, period_s: float = 0.0005) -> None:
        self.period_s = period_s
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period_s)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def peak_during(fn: Callable[[], Any], repeat: int = 1) -> tuple[int, int, str]:
    """Runs ``fn`` ``repeat`` times; returns (RSS before, peak RSS during, method used)."""
    before = rss_bytes()
    if reset_hwm():
        for _ in range(repeat):
            fn()
        return before, max(hwm_bytes(), rss_bytes()), "VmHWM reset via clear_refs"
    with _Sampler() as sampler:
        for _ in range(repeat):
            fn()
    return before, sampler.peak, "VmRSS sampled every 0.5 ms"
