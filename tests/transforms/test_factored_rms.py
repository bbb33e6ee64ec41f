"""scale_by_factored_rms against a float64 NumPy statement of Adafactor's second moment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _reference import factored_rms_steps

import afx
from afx import transforms as T


def run(tx: afx.GradientTransformation, grads: list[torch.Tensor], hyper: dict | None = None):
    tx = afx.count_steps(tx)
    state = tx.init(grads[0])
    outs = []
    for g in grads:
        u, state = tx.update(g, state, g, hyper or {})
        outs.append(u)
    return outs, state


@pytest.mark.parametrize("shape", [(), (5,), (4, 6), (3, 4, 6), (2, 3, 4, 5)])
@pytest.mark.parametrize("factored", [True, False])
def test_matches_reference_over_steps(shape: tuple, factored: bool) -> None:
    """Row/column (or full) EMAs with the t^c schedule give the reference update, ≤ 1e-5."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen) * (1 + i) for i in range(6)]
    outs, state = run(T.scale_by_factored_rms(factored=factored), grads,
                      {"decay_rate": torch.tensor(-0.7)})
    expected = factored_rms_steps([g.double().numpy() for g in grads], decay_rate=-0.7,
                                  factored=factored)
    for got, want in zip(outs, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    if factored and len(shape) >= 2:
        assert state.inner.v_row.shape == shape[:-1]
        assert state.inner.v_col.shape == shape[:-2] + shape[-1:]
    else:
        assert state.inner.v.shape == shape


def test_fixed_beta2_with_bias_correction() -> None:
    """With beta2 and bias correction, the estimate of a constant g² is exactly g² from step 1."""
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    outs, _ = run(T.scale_by_factored_rms(beta2=0.999, bias_correction=True, factored=False),
                  [g, g, g])
    for u in outs:
        torch.testing.assert_close(u, torch.ones_like(g))


def test_state_is_float32_for_bf16_gradients() -> None:
    """States are float32 whatever the gradient's dtype."""
    g = torch.randn(4, 3).bfloat16()
    _, state = run(T.scale_by_factored_rms(), [g])
    assert state.inner.v_row.dtype == torch.float32


def test_update_does_not_mutate_its_arguments() -> None:
    """update is pure: the state and gradient passed in are unchanged."""
    tx = afx.count_steps(T.scale_by_factored_rms())
    g = torch.randn(4, 3)
    state = tx.init(g)
    _, state = tx.update(g, state, g, {})
    snapshot = [t.clone() for t in (g, state.step, *state.inner)]
    tx.update(g, state, g, {})
    for before, after in zip(snapshot, (g, state.step, *state.inner)):
        assert torch.equal(before, after)


def test_bias_correction_needs_fixed_beta2() -> None:
    """bias_correction without beta2 is rejected with a message naming both."""
    with pytest.raises(ValueError, match="beta2"):
        T.scale_by_factored_rms(bias_correction=True)
