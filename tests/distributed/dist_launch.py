"""Starts a function in N fresh processes joined by a gloo process group on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
SKIP_REASON = "this platform's torch has no torch.distributed with the gloo backend"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(module: str, target: str, rank: int, world_size: int, port: int, out: str,
           kwargs: dict[str, Any]) -> None:
    import importlib

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        getattr(importlib.import_module(module), target)(rank, world_size, Path(out), **kwargs)
        dist.barrier()
    except BaseException:
        Path(out, f"error-{target}-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def launch(module: str, target: str, world_size: int, out: Path, timeout: float = 400,
           **kwargs: Any) -> None:
    """Runs ``module.target(rank, world_size, out, **kwargs)`` on ``world_size`` processes.

    Raises ``RuntimeError`` with the failing ranks' tracebacks if any process fails or does
    not finish within ``timeout`` seconds (the others are then terminated).
    """
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(module, target, rank, world_size, port, str(out),
                                              kwargs)) for rank in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    failed = [rank for rank, p in enumerate(procs) if p.exitcode != 0]
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(10)
    if failed:
        errors = [f.read_text() for f in sorted(out.glob(f"error-{target}-*.txt"))]
        raise RuntimeError(f"{target}: ranks {failed} failed or timed out\n" + "\n".join(errors))
