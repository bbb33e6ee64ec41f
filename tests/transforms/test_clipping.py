"""clip_by_rms: properties of u / max(1, RMS(u)/d)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afx import transforms as T

values = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(values, st.one_of(st.just(0.0), st.floats(1e-6, 10.0)))  # fp32-representable d
def test_clipped_rms_is_at_most_threshold_and_direction_kept(xs: list[float], d: float) -> None:
    """RMS(out) ≤ d (d > 0), out is a non-negative multiple of u, unclipped if RMS(u) ≤ d."""
    u = torch.tensor(xs)
    tx = T.clip_by_rms(d)
    out, _ = tx.update(u, tx.init(u), None, {})
    rms_u = math.sqrt(sum(x * x for x in xs) / len(xs))
    if d == 0.0 or rms_u <= d:
        torch.testing.assert_close(out, u)
        return
    rms_out = out.double().square().mean().sqrt().item()
    assert rms_out <= d * (1 + 1e-5)
    torch.testing.assert_close(out * (rms_u / d), u, rtol=1e-5, atol=1e-4)


def test_threshold_comes_from_hyper() -> None:
    """The hyperparameter 'clip_threshold' overrides the constructor's default."""
    tx = T.clip_by_rms(100.0)
    out, _ = tx.update(torch.tensor([3.0, 4.0]), tx.init(torch.zeros(2)), None,
                       {"clip_threshold": torch.tensor(0.5)})
    assert abs(out.square().mean().sqrt().item() - 0.5) < 1e-6
