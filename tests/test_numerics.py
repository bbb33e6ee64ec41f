"""afx.numerics: the finiteness test of skip_nonfinite.

The compiled test is traced once (one shape), however many examples hypothesis draws.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afx.numerics import all_finite

_SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf, 3.0e38, -3.0e38, 0.0, -0.0, 1e-45])
_VALUES = st.lists(st.one_of(st.floats(-1e3, 1e3, width=32), _SPECIAL), min_size=24,
                   max_size=24)

_compiled = torch.compile(all_finite, fullgraph=True, dynamic=False)


@settings(max_examples=60, deadline=None)
@given(_VALUES)
def test_all_finite_is_isfinite_all(values: list[float]) -> None:
    """all_finite(x) is torch.isfinite(x).all(), eager and compiled, for any mix of NaN, ±inf,
    the largest finite magnitudes, signed zeros and subnormals."""
    x = torch.tensor(values, dtype=torch.float32).reshape(4, 6)
    expected = bool(torch.isfinite(x).all())
    assert bool(all_finite(x)) is expected
    assert bool(_compiled(x)) is expected


def test_empty_and_zero_dimensional_tensors() -> None:
    """An empty tensor (an empty shard) holds nothing non-finite; a 0-d one is tested as a
    value."""
    assert bool(all_finite(torch.zeros(0, 5)))
    assert bool(all_finite(torch.tensor(2.0))) and not bool(all_finite(torch.tensor(math.nan)))
