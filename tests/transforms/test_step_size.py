"""Step sizes: relative step, parameter scale, learning rate, and their products."""

from __future__ import annotations

import math

import pytest
import torch

import afx
from afx import transforms as T


@pytest.mark.parametrize("warmup_init", [False, True])
@pytest.mark.parametrize("t", [1, 2, 7, 100, 10_000, 1_000_000])
def test_relative_step_formula(t: int, warmup_init: bool) -> None:
    """ρ_t = min(1e-2, 1/√t), or min(1e-6·t, 1/√t) with warmup_init."""
    got = T.relative_step(warmup_init).fn(None, {"step": torch.tensor(float(t))})
    cap = 1e-6 * t if warmup_init else 1e-2
    assert got.item() == pytest.approx(min(cap, 1 / math.sqrt(t)), rel=1e-6)


def test_param_rms_has_a_floor() -> None:
    """max(eps2, RMS(p)) for a large and a tiny parameter."""
    fn = T.param_rms(1e-3).fn
    assert fn(torch.full((3, 3), 2.0), {}).item() == pytest.approx(2.0)
    assert fn(torch.full((3,), 1e-6), {}).item() == pytest.approx(1e-3)
    assert fn(torch.full((3,), 1e-6), {"eps2": 0.0}).item() == pytest.approx(1e-6)


def test_product_multiplies_and_merges_hyperparameters() -> None:
    """(lr · param_rms)(p) = lr · RMS(p), declaring both hyperparameters."""
    alpha = T.learning_rate(0.1) * T.param_rms(1e-3)
    assert set(alpha.hyperparams) == {"lr", "eps2"}
    assert alpha.fn(torch.full((2,), 3.0), {"lr": 0.5}).item() == pytest.approx(1.5)


def test_scale_by_learning_rate_flips_sign_by_default() -> None:
    """optax convention: adding -lr·u descends."""
    u = torch.tensor([1.0, -2.0])
    down, _ = T.scale_by_learning_rate(0.1).update(u, None, None, {})
    up, _ = T.scale_by_learning_rate(0.1, flip_sign=False).update(u, None, None, {})
    torch.testing.assert_close(down, -0.1 * u)
    torch.testing.assert_close(up, 0.1 * u)


def test_relative_step_needs_the_step_count() -> None:
    """Without count_steps or hyper['step'], the error says how to provide it."""
    with pytest.raises(KeyError, match="count_steps"):
        T.scale_by_relative_step().update(torch.ones(1), None, None, {})
    tx = afx.count_steps(T.scale_by_relative_step())
    u, _ = tx.update(torch.ones(1), tx.init(torch.ones(1)), None, {})
    assert u.item() == pytest.approx(1e-2)
