"""The on-disk cache of precompiled bucket functions (afx.optim.precompiled)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import precompiled_train
import pytest
import torch
from precompiled_train import SHAPE, fresh_weight, train
from torch._dynamo.utils import counters

import afx
from afx.optim import compiled, precompiled

pytestmark = pytest.mark.skipif(not precompiled.available(),
                                reason="this torch has no precompile API")

BUCKET = ((), "spec", (), SHAPE, torch.float32, torch.device("cpu"), None)
OPTIONS = {"fullgraph": True, "options": {"guard_filter_fn": compiled.traced_once_guards}}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(precompiled.ENV, str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def eager_weight() -> torch.Tensor:
    weight = fresh_weight()
    train(weight, compile=False)
    return weight.detach()


def _graphs_while(fn) -> int:
    before = counters["stats"]["unique_graphs"]
    fn()
    return counters["stats"]["unique_graphs"] - before


def test_second_optimizer_and_second_process_load_the_saved_function(
        cache: Path, eager_weight: torch.Tensor) -> None:
    """The first compiled optimizer traces, compiles and saves its bucket; a second one in the
    same process and one in a new process load it without tracing a graph, and all three end
    with the same weight, the eager chain's up to rounding."""
    first = fresh_weight()
    assert _graphs_while(lambda: train(first)) == 1
    assert len(list(cache.glob("*.pt2"))) == 1
    torch.testing.assert_close(first.detach(), eager_weight, rtol=1e-6, atol=1e-7)

    second = fresh_weight()
    opt = None

    def run() -> None:
        nonlocal opt
        opt = train(second)

    assert _graphs_while(run) == 0
    assert isinstance(next(iter(opt._buckets.values())), precompiled.PrecompiledFunction)
    assert torch.equal(second.detach(), first.detach())

    out = subprocess.run([sys.executable, precompiled_train.__file__,
                          str(torch.get_num_threads())],
                         capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["graphs"] == 0
    assert torch.equal(torch.tensor(result["weight"]).view(SHAPE), first.detach())


def test_a_corrupt_entry_is_compiled_anew_and_replaced(cache: Path,
                                                       eager_weight: torch.Tensor) -> None:
    """A truncated or foreign file under an entry's name costs a recompile, not an error, and
    is overwritten by a loadable entry."""
    train(fresh_weight())
    (entry,) = cache.glob("*.pt2")
    entry.write_bytes(b"not a compiled function")
    weight = fresh_weight()
    assert _graphs_while(lambda: train(weight)) == 1
    torch.testing.assert_close(weight.detach(), eager_weight, rtol=1e-6, atol=1e-7)
    assert entry.read_bytes() != b"not a compiled function"
    assert _graphs_while(lambda: train(fresh_weight())) == 0


def test_a_call_its_guards_reject_runs_through_torch_compile(cache: Path) -> None:
    """Two weights share a bucket (same shape) but not strides: the second's call fails the
    loaded function's tensor guards and runs through an ordinary compiled copy, matching the
    eager chain."""
    contiguous = fresh_weight()
    transposed = fresh_weight(lambda: torch.randn(6, 8, generator=torch.Generator()
                                                  .manual_seed(4)).t())
    expected = [p.detach().clone().requires_grad_() for p in (contiguous, transposed)]

    def run(params, compile):
        opt = afx.Adafactor(params, lr=1e-2, relative_step=False, compile=compile)
        for step in range(2):
            for i, p in enumerate(params):
                p.grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(step + i))
            opt.step()
        return opt

    opt = run([contiguous, transposed], True)
    run(expected, False)
    (fn,) = opt._buckets.values()
    assert isinstance(fn, precompiled.PrecompiledFunction) and fn._fallback is not None
    for got, want in zip((contiguous, transposed), expected):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-7)


def test_without_the_precompile_api_the_bucket_uses_torch_compile(
        cache: Path, eager_weight: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """If precompiling fails (a torch that cannot serialize the graph), the bucket runs through
    torch.compile, nothing is saved, and the result is unchanged."""
    import torch._dynamo.aot_compile as aot

    def unsupported(*args, **kwargs):
        raise torch._dynamo.exc.PackageError("injected: cannot be serialized")

    monkeypatch.setattr(aot, "aot_compile_fullgraph", unsupported)
    weight = fresh_weight()
    opt = train(weight)
    (fn,) = opt._buckets.values()
    assert fn._fallback is not None and not list(cache.glob("*.pt2"))
    torch.testing.assert_close(weight.detach(), eager_weight, rtol=1e-6, atol=1e-7)


def test_disabled_cache_gives_plain_compiled_functions(monkeypatch: pytest.MonkeyPatch) -> None:
    """AFX_PRECOMPILED_DIR=0 (or Inductor's force_disable_caches) turns the cache off."""
    def key(options):
        return precompiled.bucket_key(afx.Adafactor, BUCKET, options, torch.device("cpu"))

    monkeypatch.setenv(precompiled.ENV, "0")
    assert precompiled.cache_dir() is None
    assert not isinstance(compiled.bucket_function("x", True, "cpu", key),
                          precompiled.PrecompiledFunction)
    monkeypatch.setenv(precompiled.ENV, "/tmp/afx-precompiled-test")
    assert isinstance(compiled.bucket_function("y", True, "cpu", key),
                      precompiled.PrecompiledFunction)
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)
    assert precompiled.cache_dir() is None


def test_bucket_key_names_every_input_of_the_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key is stable for equal inputs and changes with the optimizer class, the bucket,
    the compile options and the thread count; buckets afx cannot key get none."""
    cpu = torch.device("cpu")
    key = precompiled.bucket_key(afx.Adafactor, BUCKET, OPTIONS, cpu)
    assert key is not None and key == precompiled.bucket_key(afx.Adafactor, BUCKET, OPTIONS, cpu)
    other_shape = (*BUCKET[:3], (6, 8), *BUCKET[4:])
    variants = [
        precompiled.bucket_key(afx.Adafactor8Bit, BUCKET, OPTIONS, cpu),
        precompiled.bucket_key(afx.Adafactor, other_shape, OPTIONS, cpu),
        precompiled.bucket_key(afx.Adafactor, BUCKET, {**OPTIONS, "dynamic": True}, cpu),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        variants.append(precompiled.bucket_key(afx.Adafactor, BUCKET, OPTIONS, cpu))
    finally:
        torch.set_num_threads(threads)
    assert None not in variants and len({key, *variants}) == 5

    class Custom(afx.optim.Optimizer):  # defined outside afx: its chain is not keyed
        pass

    sharded = (*BUCKET[:-1], "rows 0:4 of 8")
    assert precompiled.bucket_key(Custom, BUCKET, OPTIONS, cpu) is None
    assert precompiled.bucket_key(afx.Adafactor, sharded, OPTIONS, cpu) is None
    assert precompiled.bucket_key(afx.Adafactor, BUCKET, {"backend": "eager"}, cpu) is None
    assert precompiled.bucket_key(afx.Adafactor, BUCKET,
                                  {"options": {"guard_filter_fn": lambda e: e}}, cpu) is None
