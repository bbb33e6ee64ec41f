"""afx/optim/compiled.py: the compile options of a bucket's update function and its guards."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils._pytree import tree_map

import afx
from afx import transforms as T
from afx.optim import compiled


@pytest.fixture
def compile_calls(monkeypatch):
    """Records the keyword arguments of every torch.compile call instead of compiling."""
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


OURS = {"guard_filter_fn": compiled.traced_once_guards}


def test_cpu_buckets_get_afx_options_under_the_callers_own(compile_calls):
    # afx's options apply by default; a key the caller sets in `options` wins, and the
    # caller's other keys are kept.
    own = {"realize_opcount_threshold": 7, "trace.enabled": False}
    compiled.bucket_function("a", True, "cpu")
    compiled.bucket_function("b", {"options": dict(own)}, "cpu")
    compiled.bucket_function("b2", {"options": {"guard_filter_fn": None}}, "cpu")
    assert compile_calls[0]["options"] == {**OURS, **compiled.CPU_INDUCTOR_OPTIONS}
    assert compile_calls[1]["options"] == {**OURS, **own}
    assert compile_calls[2]["options"]["guard_filter_fn"] is None
    assert all(c["fullgraph"] is True and c["dynamic"] is False for c in compile_calls)


@pytest.mark.parametrize("device_type, extra", [
    ("cuda", {}),                       # measured on CPU only: other devices keep Inductor's
    ("cpu", {"backend": "aot_eager"}),  # the options are Inductor's
])
def test_inductor_options_only_for_cpu_inductor_guards_filtered_everywhere(
        compile_calls, device_type, extra):
    compiled.bucket_function("c", dict(extra) or True, device_type)
    assert compile_calls[0]["options"] == OURS


def test_a_mode_gets_no_options_at_all(compile_calls):
    # torch.compile refuses mode together with options (guard_filter_fn travels in options).
    compiled.bucket_function("m", {"mode": "max-autotune"}, "cpu")
    assert "options" not in compile_calls[0]


def test_eager_buckets_are_not_compiled(compile_calls):
    assert compiled.bucket_function("d", False) is compiled.apply_update
    assert compile_calls == []


def _bucket_args(shape: tuple[int, ...], lr: float) -> list:
    tx = afx.count_steps(afx.chain(T.scale_by_factored_rms(), T.clip_by_rms(1.0),
                                   T.scale_by_learning_rate(lr)))
    g = torch.Generator().manual_seed(sum(shape))
    param = torch.nn.Parameter(torch.randn(shape, generator=g))
    grad = torch.randn(shape, generator=g)
    state = tx.init(param)
    hyper = {"lr": torch.full((1,), lr, dtype=torch.float64)}
    return [tx, param, grad, state, hyper]


def _run_eager(tx, param, grad, state, hyper, sr_seed=None, skipped=None):
    """The parameter after one eager apply_update on copies of the arguments."""
    expected = param.detach().clone()
    compiled.apply_update(tx, expected, grad.clone(), tree_map(torch.clone, state), hyper,
                          sr_seed, None if skipped is None else skipped.clone())
    return expected


def _assert_as_eager(param: torch.Tensor, expected: torch.Tensor) -> None:
    # Equal to rounding, not bitwise: traced, numerics.rms sums a matrix row by row first.
    # Results for lr 0.1 and 0.05 differ by up to 0.13 here, far outside the tolerance.
    torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_a_bucket_is_traced_once_yet_still_guards_its_tensors_and_arguments():
    # No guard on the transformation is re-checked, so a second transformation built the
    # same way reuses the graph (traced once). The guards on tensors, on the state and on the
    # optional arguments stay, and so do the global-state guards: a call the graph was not
    # traced for (another shape, a skip counter where the trace had None) gets a graph of its
    # own instead of a wrong result.
    kept: list = []

    def recording(entries):
        flags = compiled.traced_once_guards(entries)
        kept.extend(e for e, keep in zip(entries, flags) if keep)
        return flags

    fn = torch.compile(compiled._private_copy(compiled.apply_update, "guards"),
                       backend="eager", fullgraph=True, dynamic=False,
                       options={"guard_filter_fn": recording})
    counters.clear()
    first = _bucket_args((6, 5), 0.1)
    expected = _run_eager(*first)
    fn(*first)
    _assert_as_eager(first[1], expected)
    assert counters["stats"]["unique_graphs"] == 1
    kept_types = {e.guard_type for e in kept}
    assert {"TENSOR_MATCH", "GRAD_MODE", "GLOBAL_STATE"} <= kept_types
    assert not kept_types & compiled.IDENTITY_GUARDS  # the state's named-tuple classes
    roots = {e.name.split(".")[0].split("[")[0] for e in kept if e.name}
    assert {"param", "grad", "state", "hyper", "sr_seed", "skipped"} <= roots
    assert "tx" not in roots

    second = _bucket_args((6, 5), 0.05)  # a new transformation object, another lr
    assert second[0] is not first[0]
    expected = _run_eager(*second)
    fn(*second)
    _assert_as_eager(second[1], expected)
    assert counters["stats"]["unique_graphs"] == 1

    counted = (*_bucket_args((6, 5), 0.1), None, torch.zeros((), dtype=torch.int64))
    expected = _run_eager(*counted)
    fn(*counted)
    _assert_as_eager(counted[1], expected)
    assert counters["stats"]["unique_graphs"] == 2

    fn(*_bucket_args((4, 3), 0.1))
    assert counters["stats"]["unique_graphs"] == 3

    # The identity guards on the state's named-tuple classes are dropped, but the classes
    # stay pinned (by the type check of the tuples' length guards): a state of another class
    # with the same fields (here a subclass, which the transform treats alike) gets a graph
    # of its own.
    args = _bucket_args((6, 5), 0.1)
    rms = args[3].inner[0]
    twin = type(type(rms).__name__, (type(rms),), {"__slots__": ()})(*rms)
    args[3] = args[3]._replace(inner=(twin, *args[3].inner[1:]))
    expected = _run_eager(*args)
    fn(*args)
    _assert_as_eager(args[1], expected)
    assert counters["stats"]["unique_graphs"] == 4
