"""The on-disk cache of precompiled bucket functions (afx.optim.precompiled)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import precompiled_train
import pytest
import torch
from precompiled_train import SHAPE, fresh_weight, train, train_8bit
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
    """The first compiled optimizers trace, compile and save their buckets (afx.Adafactor on a
    weight; Adafactor8Bit with 8-bit states, a skip counter and a float32 bias); a second
    Adafactor in the same process and both in a new process load them without tracing a
    graph, and every run ends with the same parameters, the eager chain's up to rounding."""
    first = fresh_weight()
    assert _graphs_while(lambda: train(first)) == 1
    assert len(list(cache.glob("*.pt2"))) == 1
    torch.testing.assert_close(first.detach(), eager_weight, rtol=1e-6, atol=1e-7)
    quantized = train_8bit()
    assert len(list(cache.glob("*.pt2"))) == 3
    for got, want in zip(quantized, train_8bit(compile=False)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)

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
    for got, want in zip(result["params"], [first.detach(), *quantized]):
        assert torch.equal(torch.tensor(got).view(want.shape), want)


def test_apollo_buckets_are_precompiled_once_and_loaded(cache: Path) -> None:
    """APOLLO's state is a named tuple whose fields depend on the options. Its class must be
    one module-level object, found by name when a saved function's guards are loaded; a class
    made per call made every guard check fail (a second compile per bucket, no loads)."""
    def run() -> torch.Tensor:
        weight = fresh_weight()
        opt = afx.Adafactor8Bit([weight], apollo_rank=4, min_8bit_size=1024, block_size=128)
        for step in range(2):
            weight.grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(step))
            opt.step()
        (fn,) = opt._buckets.values()
        assert fn._fallback is None
        return weight.detach()

    graphs = counters["stats"]["unique_graphs"]
    first = run()
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert _graphs_while(lambda: torch.equal(run(), first)) == 0
    assert torch.equal(run(), first)


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
    transposed = fresh_weight(lambda: torch.randn(SHAPE[::-1], generator=torch.Generator()
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
    # torch.compile pops the guard filter out of the options it is given: each of the two
    # compiles must have had its own copy.
    assert fn.options["options"]["guard_filter_fn"] is compiled.traced_once_guards
    for got, want in zip((contiguous, transposed), expected):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-7)


def test_a_failed_precompile_falls_back_to_torch_compile(
        cache: Path, eager_weight: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    """If precompiling fails (a graph this torch cannot serialize), the bucket runs through
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


def test_disabled_cache_gives_plain_compiled_functions(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """AFX_PRECOMPILED_DIR=0, Inductor's force_disable_caches or a torch without the
    precompile API turn the cache off: buckets get plain compiled functions."""
    def key(options):
        return precompiled.bucket_key(afx.Adafactor, BUCKET, options, torch.device("cpu"))

    monkeypatch.setenv(precompiled.ENV, "0")
    assert precompiled.cache_dir() is None
    assert not isinstance(compiled.bucket_function("x", True, "cpu", key),
                          precompiled.PrecompiledFunction)
    monkeypatch.setenv(precompiled.ENV, str(tmp_path))
    assert isinstance(compiled.bucket_function("y", True, "cpu", key),
                      precompiled.PrecompiledFunction)
    with monkeypatch.context() as patch:
        patch.setattr(precompiled, "available", lambda: False)
        assert not isinstance(compiled.bucket_function("z", True, "cpu", key),
                              precompiled.PrecompiledFunction)
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)
    assert precompiled.cache_dir() is None


def test_compile_stances_are_obeyed(cache: Path, eager_weight: torch.Tensor) -> None:
    """Under set_stance("force_eager") nothing is compiled, loaded or saved and the result is
    the eager chain's, bit for bit; under "fail_on_recompile" a bucket that would need a
    compile raises (before any parameter is written) instead of being precompiled."""
    weight = fresh_weight()
    with torch.compiler.set_stance("force_eager"):
        assert _graphs_while(lambda: train(weight)) == 0
    assert torch.equal(weight.detach(), eager_weight) and not list(cache.glob("*.pt2"))

    weight = fresh_weight()
    weight.grad = torch.ones(SHAPE)
    opt = afx.Adafactor([weight], lr=1e-2, relative_step=False)
    with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(RuntimeError,
                                                                       match="recompile"):
        opt.step()
    assert torch.equal(weight.detach(), fresh_weight().detach()) and not opt.state


def test_bucket_key_changes_with_its_inputs_and_is_withheld_where_afx_cannot_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The key is stable for equal inputs and changes with the optimizer class, the bucket
    (here its shape), the compile options, the thread count and compiler settings. It is
    withheld from afx.optim.Optimizer (the chain is the user's), from subclasses that do not
    opt in themselves, from sharded parameters, other backends, custom Inductor passes and
    options without a stable text form."""
    cpu = torch.device("cpu")
    key = precompiled.bucket_key(afx.Adafactor, BUCKET, OPTIONS, cpu)
    assert key is not None and key == precompiled.bucket_key(afx.Adafactor, BUCKET, OPTIONS, cpu)
    other_shape = (*BUCKET[:3], SHAPE[::-1], *BUCKET[4:])
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
    with monkeypatch.context() as patch:
        patch.setattr(torch._inductor.config, "realize_opcount_threshold", 7)
        variants.append(precompiled.bucket_key(afx.Adafactor, BUCKET, OPTIONS, cpu))
    with monkeypatch.context() as patch:
        patch.setattr(torch._dynamo.config, "cache_size_limit", 3)
        variants.append(precompiled.bucket_key(afx.Adafactor, BUCKET, OPTIONS, cpu))
    assert None not in variants and len({key, *variants}) == len(variants) + 1

    class Subclass(afx.Adafactor):  # inherits precompile = True, but its chain may differ
        pass

    sharded = (*BUCKET[:-1], "rows 0:4 of 8")
    for owner, bucket, options in [
            (afx.optim.Optimizer, BUCKET, OPTIONS), (Subclass, BUCKET, OPTIONS),
            (afx.Adafactor, sharded, OPTIONS), (afx.Adafactor, BUCKET, {"backend": "eager"}),
            (afx.Adafactor, BUCKET, {"options": {"guard_filter_fn": lambda e: e}})]:
        assert precompiled.bucket_key(owner, bucket, options, cpu) is None
    monkeypatch.setattr(torch._inductor.config, "post_grad_custom_post_pass", lambda g: None)
    assert precompiled.bucket_key(afx.Adafactor, BUCKET, OPTIONS, cpu) is None
