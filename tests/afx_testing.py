"""Shared test helpers: a tiny model with 0-d, 1-D, 2-D and 4-D parameters, training loops,
and what a compiled step allocates."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from unittest import mock

import torch
from torch._inductor.utils import fresh_cache, run_and_get_code

torch.set_num_threads(max(1, torch.get_num_threads()))


class Tiny(torch.nn.Module):
    """A model whose parameters cover the shapes Adafactor treats differently."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.scalar = torch.nn.Parameter(torch.randn((), generator=g, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.randn(7, generator=g).to(dtype))
        self.weight = torch.nn.Parameter(torch.randn(6, 5, generator=g).to(dtype))
        self.kernel = torch.nn.Parameter(0.5 * torch.randn(3, 2, 4, 5, generator=g).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        return ((self.scalar * x).sum() + (self.bias * x[:7]).sum()
                + (self.weight @ x[:5]).square().sum() + (self.kernel * x[:5]).pow(3).mean())


def batches(steps: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, generator=g) for _ in range(steps)]


def train(models: list[torch.nn.Module], opt: torch.optim.Optimizer, data: list[torch.Tensor],
          on_step: Callable[[int], None] | None = None) -> None:
    """Trains every model in ``models`` (all in ``opt``) on the same batches."""
    for i, x in enumerate(data):
        opt.zero_grad()
        for m in models:
            m(x).float().backward()
        opt.step()
        if on_step is not None:
            on_step(i)


def max_rel_diff(a: torch.nn.Module | list, b: torch.nn.Module | list) -> float:
    """Max over tensors of max|a − b| / max|b| (relative to each tensor's scale)."""
    ta = list(a.parameters()) if isinstance(a, torch.nn.Module) else list(a)
    tb = list(b.parameters()) if isinstance(b, torch.nn.Module) else list(b)
    assert len(ta) == len(tb)
    return max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()
               for x, y in zip(ta, tb))


def replicas(n: int, dtype: torch.dtype = torch.float32) -> list[Tiny]:
    base = Tiny(dtype)
    return [copy.deepcopy(base) for _ in range(n)]


_ALLOC = re.compile(r"empty_strided_cpu\(\(([\d, ]*)\), \([\d, ]*\), torch\.(\w+)\)")


def buffer_sizes(fn: Callable, *args: object, dtype: torch.dtype | None = None) -> list[int]:
    """Runs ``fn(*args)`` (which compiles) from a fresh Inductor cache and returns the element
    count of every CPU buffer (of ``dtype``, if given) Inductor's generated code allocates."""
    return _allocated(compiled_sources(fn, *args), dtype)


def compiled_sources(fn: Callable, *args: object) -> list[str]:
    """Runs ``fn(*args)`` (which compiles) from a fresh Inductor cache and returns the code
    Inductor generates (a cache hit would return none)."""
    with fresh_cache():
        _, sources = run_and_get_code(fn, *args)
    return sources


def _allocated(sources: list[str], dtype: torch.dtype | None) -> list[int]:
    return [torch.Size(int(d) for d in dims.split(",") if d.strip()).numel()
            for source in sources for dims, kind in _ALLOC.findall(source)
            if dtype is None or getattr(torch, kind) == dtype]


def step_sources(opt: torch.optim.Optimizer) -> list[str]:
    """The code Inductor generates for ``opt.step()`` from a fresh cache, with precompiled
    functions off (a loaded one shows no source)."""
    from afx.optim import precompiled

    with mock.patch.dict(os.environ, {precompiled.ENV: "0"}):
        return compiled_sources(opt.step)


def step_buffer_sizes(opt: torch.optim.Optimizer, dtype: torch.dtype | None = None) -> list[int]:
    """:func:`buffer_sizes` of ``opt.step()``: the element count of every CPU buffer (of
    ``dtype``, if given) its generated code allocates."""
    return _allocated(step_sources(opt), dtype)
