"""afx.Adafactor against transformers' Adafactor: numbers, errors and checkpoints."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from afx_testing import Tiny, batches, max_rel_diff, replicas, train
from transformers.optimization import Adafactor as HFAdafactor

import afx

# Static options (they shape the graph) x numeric options (they are hyperparameter tensors).
STATIC = [dict(relative_step=True, warmup_init=w, scale_parameter=s, beta1=b)
          for w, s, b in itertools.product([False, True], [True, False], [None, 0.9])]
STATIC += [dict(relative_step=False, warmup_init=False, scale_parameter=s, beta1=b)
           for s, b in itertools.product([True, False], [None, 0.9])]
# Compiled, each combination costs a compile of four buckets (~20 s on the project machine):
# a subset in which every option takes each of its values and every pair of relative_step,
# scale_parameter and beta1 values appears. The first is also test_optimizer.py's resume
# test's, which then finds its graphs in Inductor's cache.
COMPILED_STATIC = [dict(relative_step=True, warmup_init=False, scale_parameter=True, beta1=0.9),
                   dict(relative_step=True, warmup_init=True, scale_parameter=False, beta1=None),
                   dict(relative_step=False, warmup_init=False, scale_parameter=True, beta1=None),
                   dict(relative_step=False, warmup_init=False, scale_parameter=False, beta1=0.9)]
assert all(s in STATIC for s in COMPILED_STATIC)
RUNS = [(s, False) for s in STATIC] + [(s, True) for s in COMPILED_STATIC]


def numeric(relative_step: bool) -> list[dict]:
    lrs = [None] if relative_step else [1e-3, 3e-2]
    return [dict(lr=lr, weight_decay=wd) for lr, wd in itertools.product(lrs, [0.0, 0.01])]


def run_pair(static: dict, compile: bool, steps: int = 200):
    combos = numeric(static["relative_step"])
    ours, ref = replicas(len(combos)), replicas(len(combos))
    hf = HFAdafactor([dict(params=m.parameters(), **c) for m, c in zip(ref, combos)],
                     **{k: v for k, v in static.items()})
    opt = afx.Adafactor([dict(params=m.parameters(), **c) for m, c in zip(ours, combos)],
                        compile=compile, **static)
    data = batches(steps)
    train(ref, hf, data)
    train(ours, opt, data)
    return ours, ref, opt, hf


@pytest.mark.parametrize("static, compile", RUNS, ids=[
    "-".join(f"{k}={v}" for k, v in s.items()) + ("-compiled" if c else "-eager")
    for s, c in RUNS])
def test_matches_transformers_for_200_steps(static: dict, compile: bool) -> None:
    """Every option combination eagerly, the covering subset compiled; 0-d/1-D/2-D/4-D params:
    max relative difference ≤ 1e-5."""
    ours, ref, _, _ = run_pair(static, compile)
    for m, r in zip(ours, ref):
        assert max_rel_diff(m, r) <= 1e-5
        assert max_rel_diff(m, Tiny()) > 1e-3  # the parameters did move


def test_state_uses_transformers_names_and_shapes() -> None:
    """Per-parameter state keys and shapes are transformers', so checkpoints interchange."""
    ours, ref, opt, hf = run_pair(dict(relative_step=False, warmup_init=False,
                                       scale_parameter=True, beta1=0.9), False, steps=2)
    for p, q in zip(ours[0].parameters(), ref[0].parameters()):
        theirs = {k: v for k, v in hf.state[q].items() if k != "RMS"}
        assert set(opt.state[p]) == set(theirs)
        for k, v in theirs.items():
            if k != "step":
                assert opt.state[p][k].shape == v.shape
                assert opt.state[p][k].dtype == torch.float32
        assert int(opt.state[p]["step"]) == theirs["step"]


@pytest.mark.parametrize("direction", ["transformers->afx", "afx->transformers"])
def test_checkpoint_interchange_continues_training(direction: str) -> None:
    """A checkpoint of one optimizer loads into the other and the next steps agree."""
    static = dict(relative_step=True, warmup_init=False, scale_parameter=True, beta1=0.9)
    data = batches(30)
    first, second = (HFAdafactor, afx.Adafactor)
    if direction == "afx->transformers":
        first, second = second, first
    kwargs = lambda cls: dict(compile=False) if cls is afx.Adafactor else {}  # noqa: E731
    a = Tiny()
    opt_a = first(a.parameters(), **static, **kwargs(first))
    train([a], opt_a, data[:15])
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    b = Tiny()
    b.load_state_dict(a.state_dict())
    opt_b = second(b.parameters(), **static, **kwargs(second))
    buf.seek(0)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    train([a], opt_a, data[15:])
    train([b], opt_b, data[15:])
    assert max_rel_diff(b, a) <= 1e-5


@pytest.mark.parametrize("kwargs", [dict(lr=1e-3, relative_step=True),
                                    dict(warmup_init=True, relative_step=False, lr=1e-3)])
def test_constructor_errors_match_transformers(kwargs: dict) -> None:
    """The option combinations transformers rejects are rejected with the same exception type."""
    with pytest.raises(ValueError):
        HFAdafactor(Tiny().parameters(), **kwargs)
    with pytest.raises(ValueError, match="relative_step"):
        afx.Adafactor(Tiny().parameters(), **kwargs)


@pytest.mark.parametrize("option, value", [("lr", -1e-3), ("weight_decay", -0.1),
                                           ("eps", (-1e-30, 1e-3)), ("eps", (1e-30, -1.0)),
                                           ("beta1", 1.0), ("clip_threshold", -1.0),
                                           ("decay_rate", 0.5), ("eps", 1e-3)])
def test_invalid_values_name_the_option(option: str, value) -> None:
    """Bad values raise a ValueError naming the option and the value, at construction."""
    kwargs = {"relative_step": False, "lr": 1e-3, option: value}
    with pytest.raises(ValueError, match=option) as info:
        afx.Adafactor(Tiny().parameters(), **kwargs)
    shown = value if not isinstance(value, tuple) else value[0] if value[0] < 0 else value[1]
    assert repr(shown) in str(info.value) or str(shown) in str(info.value)


def test_relative_step_without_lr_is_rejected_early() -> None:
    """transformers fails only at its first step on lr=None without relative step; afx at once."""
    with pytest.raises(ValueError, match="lr=None"):
        afx.Adafactor(Tiny().parameters(), relative_step=False)

