"""fira_limit: P_t = min(n_t, (1+m)(P_{t−1}+1e-8)), with the reset and non-finite rules."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afx import transforms as T


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=10), st.floats(0.0, 0.5))
def test_norm_follows_the_growth_rule(norms: list[float], margin: float) -> None:
    """Each output norm equals the scalar recursion computed in float64."""
    tx = T.fira_limit(margin)
    state = tx.init(torch.zeros(4))
    prev = 0.0
    for n in norms:
        u = torch.full((4,), n / 2.0)  # norm n
        out, state = tx.update(u, state, None, {})
        expected = n if prev < 1e-6 else min(n, (1 + margin) * (prev + 1e-8))
        prev = expected
        assert math.isclose(out.norm().item(), expected, rel_tol=1e-5)
        assert math.isclose(state.prev_norm.item(), expected, rel_tol=1e-5)


def test_non_finite_update_is_zeroed_and_resets() -> None:
    """An Inf/NaN update becomes 0 and the reference norm drops to 0 (next step resets)."""
    tx = T.fira_limit(0.01)
    state = tx.init(torch.zeros(2))
    _, state = tx.update(torch.ones(2), state, None, {})
    out, state = tx.update(torch.tensor([float("inf"), 1.0]), state, None, {})
    assert torch.equal(out, torch.zeros(2)) and state.prev_norm.item() == 0.0
    out, _ = tx.update(torch.full((2,), 100.0), state, None, {})
    assert torch.equal(out, torch.full((2,), 100.0))


def test_clip_uses_the_unlimited_norm() -> None:
    """With clip_threshold, D = max(1, n/(√N d)) from the norm before limiting."""
    tx = T.fira_limit(0.0, clip_threshold=1.0)
    state = tx.init(torch.zeros(4))
    _, state = tx.update(torch.full((4,), 0.5), state, None, {})   # n = 1, RMS 0.5: no clip
    out, _ = tx.update(torch.full((4,), 4.0), state, None, {})     # n = 8 limited to 1, D = 4
    torch.testing.assert_close(out.norm(), torch.tensor(1.0 / 4.0))
