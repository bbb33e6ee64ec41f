"""Hyperparam validation and count_steps."""

from __future__ import annotations

import math

import pytest
import torch

import afx


@pytest.mark.parametrize("value", [-0.1, 1.0, math.nan, "0.5", True])
def test_hyperparam_rejects_values_outside_its_interval(value) -> None:
    """Errors name the option and the value."""
    spec = afx.Hyperparam(0.9, 0.0, 1.0, high_inclusive=False)
    with pytest.raises(ValueError, match="beta1") as info:
        spec.check("beta1", value)
    assert repr(value) in str(info.value)


def test_hyperparam_accepts_one_element_tensors_only() -> None:
    """Tensor values are checked by shape (reading them would synchronise)."""
    spec = afx.Hyperparam(1e-3, 0.0)
    spec.check("lr", torch.tensor([[0.1]]))
    with pytest.raises(ValueError, match="one element"):
        spec.check("lr", torch.ones(2))


def test_count_steps_counts_from_one() -> None:
    """hyper['step'] is 1 on the first update and the state counts completed steps."""
    seen = []

    def record(u, p, hyper):
        seen.append(int(hyper["step"]))
        return u

    tx = afx.count_steps(afx.stateless(record))
    state = tx.init(torch.zeros(1))
    for _ in range(3):
        _, state = tx.update(torch.zeros(1), state, None, {})
    assert seen == [1, 2, 3] and int(state.step) == 3
