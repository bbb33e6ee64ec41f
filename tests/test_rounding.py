"""Stochastic rounding: neighbours only, unbiased, deterministic everywhere, special values."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import afx
from afx.counter_rng import random_bits
from afx.rounding import stochastic_round

LOW = [torch.bfloat16, torch.float16]
SEED, STEP = torch.tensor(11), torch.tensor(4.0)


def neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two representable values of ``dtype`` around each x (float64 reference)."""
    near = x.to(dtype)
    step_up = torch.nextafter(near, torch.full_like(near, float("inf")))
    step_down = torch.nextafter(near, torch.full_like(near, float("-inf")))
    other = torch.where(x.double() > near.double(), step_up, step_down)
    return torch.minimum(near, other).double(), torch.maximum(near, other).double()


@pytest.mark.parametrize("dtype", LOW)
@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-6e4, 6e4, width=32), min_size=1, max_size=64))
def test_result_is_one_of_the_two_neighbours(dtype: torch.dtype, xs: list[float]) -> None:
    """Every output is the representable value just below or just above the input."""
    x = torch.tensor(xs)
    y = stochastic_round(x, dtype, SEED, STEP).double()
    lo, hi = neighbours(x, dtype)
    assert torch.all((y == lo) | (y == hi))


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("value", [1.0 + 2**-12, -3.3, 1e-3, 777.7])
def test_unbiased(dtype: torch.dtype, value: float) -> None:
    """The mean of 2^18 roundings of x is x within 5 standard errors of the two-point draw."""
    n = 1 << 18
    x = torch.full((n,), value)
    y = stochastic_round(x, dtype, SEED, STEP).double()
    lo, hi = (t[0].item() for t in neighbours(x[:1], dtype))
    p = (torch.tensor(value, dtype=torch.float32).item() - lo) / (hi - lo)
    standard_error = (hi - lo) * (p * (1 - p) / n) ** 0.5
    assert abs(y.mean().item() - torch.tensor(value).item()) <= 5 * standard_error + 1e-12


@pytest.mark.parametrize("dtype", LOW)
def test_special_values(dtype: torch.dtype) -> None:
    """Inf and NaN pass through, bf16 never rounds a finite value up to Inf, fp16 saturates."""
    big = torch.finfo(torch.bfloat16).max
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e6, -1e6, big * 1.0039])
    y = stochastic_round(x.expand(64, 6).contiguous(), dtype, SEED, STEP)
    assert y[:, 0].isposinf().all() and y[:, 1].isneginf().all() and y[:, 2].isnan().all()
    if dtype == torch.float16:
        assert (y[:, 3] == 65504).all() and (y[:, 4] == -65504).all()
    else:
        assert torch.isfinite(y[:, 5]).all()


def test_deterministic_from_seed_step_and_index() -> None:
    """Same counters give the same bits; another step or seed gives different bits."""
    cpu = torch.device("cpu")
    a = random_bits(SEED, STEP, 1000, cpu)
    assert torch.equal(a, random_bits(SEED, STEP, 1000, cpu))
    assert (a != random_bits(SEED, STEP + 1, 1000, cpu)).float().mean() > 0.99
    assert (a != random_bits(SEED + 1, STEP, 1000, cpu)).float().mean() > 0.99
    assert a.min() >= 0 and a.max() < 2**32


def test_same_bits_in_another_process() -> None:
    """A fresh interpreter draws exactly the same rounding (no hidden generator state)."""
    code = ("import torch; from afx.rounding import stochastic_round; "
            "x = torch.linspace(-3, 3, 4096); "
            "y = stochastic_round(x, torch.bfloat16, torch.tensor(11), torch.tensor(4.0)); "
            "print(y.view(torch.int16).long().sum().item())")
    here = stochastic_round(torch.linspace(-3, 3, 4096), torch.bfloat16, SEED, STEP)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == here.view(torch.int16).long().sum().item()


def test_compiled_equals_eager_bitwise() -> None:
    """One compiled function rounds to bf16 and fp16 exactly as eager does."""

    def both(x, seed, step):
        return (stochastic_round(x, torch.bfloat16, seed, step),
                stochastic_round(x, torch.float16, seed, step))

    x = torch.randn(5000) * 100
    eager = both(x, SEED, STEP)
    compiled = torch.compile(both, fullgraph=True, dynamic=False)(x, SEED, STEP)
    for e, c in zip(eager, compiled):
        assert torch.equal(e.view(torch.int16), c.view(torch.int16))


def test_optimizer_rounds_bf16_parameters_stochastically() -> None:
    """With stochastic_round_writeback, tiny updates survive on average in bf16 (round to
    nearest loses every one) and seeds are saved in the state. Compiled and eager draw the same
    bits; the float32 value being rounded may differ by an ulp (fused multiply-add), which can
    flip a decision that sits exactly on the threshold: at most a few elements, by one ulp."""
    results = {}
    for mode, compile_ in (("nearest", False), ("eager", False), ("compiled", True)):
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = afx.Adafactor8Bit([p], lr=1e-4, relative_step=False, scale_parameter=False,
                                beta2=None, beta2_decay=None, factored=False, d=0.0,
                                stochastic_round_writeback=mode != "nearest", compile=compile_)
        for _ in range(20):
            p.grad = torch.ones_like(p)   # each step subtracts 1e-4, a quarter of a bf16 ulp
            opt.step()
        results[mode] = p.detach().clone()
        if mode != "nearest":
            assert int(opt.state[p]["sr_seed"]) == 1
    assert torch.equal(results["nearest"], torch.ones(4096, dtype=torch.bfloat16))
    assert abs(results["eager"].float().mean().item() - (1 - 20e-4)) < 2e-4
    differ = results["eager"] != results["compiled"]
    assert differ.float().mean() <= 1e-3
    gap = (results["eager"].float() - results["compiled"].float()).abs()[differ]
    assert torch.all(gap <= 2**-8)  # one bf16 step just below 1


def test_resume_with_stochastic_rounding_is_bit_identical() -> None:
    """A checkpoint keeps each parameter's seed, so a resumed run draws the same bits."""
    import io

    def make(p):
        return afx.Adafactor8Bit([p], lr=1e-3, relative_step=False, beta1=0.9,
                                 stochastic_round_writeback=True, compile=False)

    grads = [torch.randn(64, 64, generator=torch.Generator().manual_seed(i)).bfloat16()
             for i in range(10)]
    whole = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    opt = make(whole)
    for g in grads:
        whole.grad = g
        opt.step()
    first = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    opt1 = make(first)
    for g in grads[:5]:
        first.grad = g
        opt1.step()
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    second = torch.nn.Parameter(first.detach().clone())
    opt2 = make(second)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.state[second]["sr_seed"].dtype == torch.int64
    for g in grads[5:]:
        second.grad = g
        opt2.step()
    assert torch.equal(second.view(torch.int16), whole.view(torch.int16))
