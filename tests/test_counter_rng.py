"""afx/counter_rng.py: normal samples are Box–Muller on the counter stream, compiled or not."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afx.counter_rng import normal, random_bits

CPU = torch.device("cpu")


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**40), st.integers(0, 2**20), st.integers(1, 300))
def test_normal_is_box_muller_on_consecutive_pairs_of_the_stream(seed: int, counter: int,
                                                                 numel: int) -> None:
    """Sample i is √(−2 ln u₁)·cos(2π u₂) with u₁, u₂ from bits 2i and 2i+1 of random_bits's
    draw for the same counters (float64 reference), so the projection APOLLO draws depends on
    the counters alone, not on how the bits are computed."""
    s, c = torch.tensor(seed), torch.tensor(float(counter))
    bits = random_bits(s, c, 2 * numel, CPU).reshape(numel, 2) >> 8
    u1 = (bits[:, 0] + 1).double() * 2.0 ** -24
    u2 = bits[:, 1].double() * 2.0 ** -24
    expected = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    torch.testing.assert_close(normal(s, c, (numel,), CPU).double(), expected,
                               rtol=1e-5, atol=1e-5)


def test_compiled_normal_matches_eager() -> None:
    """Compiled (one vectorised loop), the samples equal eager's up to the last bits of
    the vectorised log and cos."""
    s, c = torch.tensor(3), torch.tensor(5.0)
    compiled = torch.compile(lambda s, c: normal(s, c, (300, 7), CPU), fullgraph=True)
    torch.testing.assert_close(compiled(s, c), normal(s, c, (300, 7), CPU),
                               rtol=1e-5, atol=1e-6)
