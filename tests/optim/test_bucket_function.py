"""afx/optim/compiled.py: the compile options of a bucket's update function."""

from __future__ import annotations

import pytest
import torch

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


def test_cpu_buckets_get_afx_inductor_options_under_the_callers_own(compile_calls):
    # afx's CPU options apply by default; a key the caller sets in `options` wins, and the
    # caller's other keys are kept.
    own = {"realize_opcount_threshold": 7, "trace.enabled": False}
    compiled.bucket_function("a", True, "cpu")
    compiled.bucket_function("b", {"options": dict(own)}, "cpu")
    assert compile_calls[0]["options"] == compiled.CPU_INDUCTOR_OPTIONS
    assert compile_calls[1]["options"] == own
    assert all(c["fullgraph"] is True and c["dynamic"] is False for c in compile_calls)


@pytest.mark.parametrize("device_type, extra", [
    ("cuda", {}),                       # measured on CPU only: other devices keep Inductor's
    ("cpu", {"mode": "max-autotune"}),  # torch.compile refuses mode together with options
    ("cpu", {"backend": "aot_eager"}),  # the options are Inductor's
])
def test_options_are_left_alone_off_cpu_with_a_mode_or_another_backend(compile_calls,
                                                                        device_type, extra):
    compiled.bucket_function("c", dict(extra) or True, device_type)
    assert "options" not in compile_calls[0]


def test_eager_buckets_are_not_compiled(compile_calls):
    assert compiled.bucket_function("d", False) is compiled.apply_update
    assert compile_calls == []
