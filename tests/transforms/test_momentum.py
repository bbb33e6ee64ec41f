"""ema: the recursion m_t = β m_{t−1} + (1 − β) u_t with m_0 = 0."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afx import transforms as T


@settings(max_examples=40, deadline=None)
@given(st.floats(0.0, 0.999), st.lists(st.floats(-100, 100, width=32), min_size=1, max_size=12))
def test_matches_the_recursion(beta: float, xs: list[float]) -> None:
    """Each output equals the float64 recursion within float32 rounding."""
    tx = T.ema(0.5)
    state = tx.init(torch.zeros(1))
    m = 0.0
    for x in xs:
        out, state = tx.update(torch.tensor([x]), state, None, {"beta1": torch.tensor(beta)})
        m = beta * m + (1 - beta) * x
        np.testing.assert_allclose(out.item(), m, rtol=1e-5, atol=1e-4)
    assert torch.equal(out, state.m)
