"""afx.numerics: the finiteness test of skip_nonfinite, the column mean of a tall matrix, the
root mean square, norms (of a whole matrix and of its rows or columns), the factored
preconditioner's parts and mean square, and the block views of a block-encoded momentum.

Each compiled test is traced once (one shape), however many examples hypothesis draws.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor.utils import fresh_cache, run_and_get_code

from afx.numerics import (
    all_finite,
    blockwise_mean_square,
    channel_norms,
    factored_mean_square,
    factored_rsqrt,
    factored_rsqrt_parts,
    full_mean,
    norm,
    rms,
    row_blocks,
)

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


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 80), st.integers(1, 9), st.booleans())
def test_column_mean_is_the_mean_over_rows(batch: int, rows: int, cols: int,
                                           cheap: bool) -> None:
    """full_mean(x, -2) is x.mean(-2) for any row count (below, at and between multiples of
    the 16-row groups) and leading batch dims, whether the leftover rows are padded or
    summed apart."""
    x = torch.randn(batch, rows, cols, generator=torch.Generator().manual_seed(rows))
    torch.testing.assert_close(full_mean(x, -2, cheap=cheap), x.mean(-2), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("cheap", [False, True])
def test_cheap_column_mean_compiles_without_masked_loads(cheap: bool) -> None:
    """On 45 rows (two groups of 16 and 13 left over), compiled: a cheap x sums the leftover
    rows in a loop of their own, so the grouped loop loads plain vectors (padding them puts a
    masked load on every element); both give x.mean(-2)."""
    x = torch.randn(45, 24)
    f = torch.compile(lambda g: full_mean(g * g + 1e-30, -2, cheap=cheap), fullgraph=True,
                      dynamic=False)
    with fresh_cache():  # a cache hit would return no source
        out, (source,) = run_and_get_code(f, x)
    torch.testing.assert_close(out, (x * x + 1e-30).mean(-2))
    assert ("VecMask<float,1>::from" in source) is not cheap


_compiled_rms = torch.compile(rms, fullgraph=True, dynamic=False)


@pytest.mark.parametrize("shape", [(0, 5), (7,), (7, 300), (2, 3, 33), (1, 1)])
def test_compiled_rms_is_the_rms(shape: tuple[int, ...]) -> None:
    """Compiled, rms sums a tensor of two or more dims row by row first; it is still the root
    mean square of all elements (to float32 rounding), and NaN for an empty tensor."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 3.0
    expected = x.double().square().mean().sqrt().float()
    torch.testing.assert_close(_compiled_rms(x), expected, rtol=1e-6, atol=0.0, equal_nan=True)
    torch.testing.assert_close(rms(x), expected, rtol=1e-6, atol=0.0, equal_nan=True)


def test_compiled_rms_of_a_matrix_has_no_loop_over_every_element() -> None:
    """The point of the row-first sum: Inductor's C++ for rms of a 64×96 matrix reduces each
    row in a loop over its 96 columns and then the 64 row totals, never in one loop over all
    6,144 elements (a cascade sum, whose bookkeeping on every vector costs more)."""
    f = torch.compile(lambda x: rms(x), fullgraph=True, dynamic=False)
    with fresh_cache():
        _, (source,) = run_and_get_code(f, torch.randn(64, 96))
    assert "static_cast<int64_t>(6144L)" not in source
    assert "static_cast<int64_t>(96L)" in source


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 70), st.integers(1, 9), st.floats(1e-3, 1e3))
def test_factored_parts_multiply_to_factored_rsqrt(batch: int, rows: int, cols: int,
                                                   scale: float) -> None:
    """The row and column parts multiply to factored_rsqrt bit for bit, and
    factored_mean_square(x, r, c) is the mean square of x·r·c (to float32 rounding) for any
    row count (below, at and between the 16-row groups of the column sums) and batch dims."""
    gen = torch.Generator().manual_seed(rows * 10 + cols)
    x = torch.randn(batch, rows, cols, generator=gen) * scale
    row = torch.rand(batch, rows, generator=gen) + 0.1
    col = torch.rand(batch, cols, generator=gen) + 0.1
    r, c = factored_rsqrt_parts(row, col, 1e-30)
    assert torch.equal(r * c, factored_rsqrt(row, col, 1e-30))
    expected = (x.double() * r.double() * c.double()).square().mean().float()
    torch.testing.assert_close(factored_mean_square(x, r, c), expected, rtol=2e-6, atol=0.0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 5), st.sampled_from([1, 2, 4, 32]),
       st.floats(1e-3, 1e3))
def test_row_blocks_are_the_codec_blocks(rows: int, per_row: int, block: int,
                                         scale: float) -> None:
    """row_blocks(x, B) is x.reshape(-1, B), the layout afx.codecs encodes, for any matrix
    whose row length B divides; blockwise_mean_square and full_mean(x, -1, block=B) are the
    mean square and the row means (to float32 rounding)."""
    gen = torch.Generator().manual_seed(rows * 100 + per_row * 10 + block)
    x = torch.randn(rows, per_row * block, generator=gen) * scale
    assert torch.equal(row_blocks(x, block), x.reshape(-1, block))
    torch.testing.assert_close(blockwise_mean_square(x, block),
                               x.double().square().mean().float(), rtol=2e-6, atol=0.0)
    torch.testing.assert_close(full_mean(x, -1, block=block), x.double().mean(-1).float(),
                               rtol=2e-6, atol=1e-6 * scale)


def test_row_blocks_refuse_a_block_that_does_not_divide_the_row() -> None:
    """A block length that does not divide the row length is an error naming both."""
    with pytest.raises(ValueError, match="block 5 does not divide the 12 columns"):
        row_blocks(torch.zeros(3, 12), 5)


def test_compiled_block_sums_read_a_column_factor_as_vectors() -> None:
    """The point of going through (R, C/B, B): compiled, the block sums of x·c for a column
    factor c load c as plain vectors (no element-by-element gather), and are the sums."""
    x, c = torch.randn(16, 96), torch.rand(1, 96) + 0.5
    f = torch.compile(lambda x, c: blockwise_mean_square(x * c, 32), fullgraph=True,
                      dynamic=False)
    with fresh_cache():
        out, (source,) = run_and_get_code(f, x, c)
    torch.testing.assert_close(out, (x * c).square().mean(), rtol=2e-6, atol=0.0)
    assert "tmpbuf" not in source


_compiled_norm = torch.compile(norm, fullgraph=True, dynamic=False)


@pytest.mark.parametrize("shape", [(0, 5), (7,), (7, 300), (2, 3, 33)])
def test_compiled_norm_is_the_norm(shape: tuple[int, ...]) -> None:
    """Compiled, norm sums a tensor of two or more dims row by row first; it is still the
    Euclidean norm of all elements to float32 rounding (0 for an empty tensor)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape))) * 3.0
    expected = x.double().square().sum().sqrt().float()
    torch.testing.assert_close(_compiled_norm(x), expected, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=0.0)


def test_compiled_norm_shares_the_loop_of_the_row_maxima() -> None:
    """The point of the row-first sum: compiled together, the norm of g·s and all_finite(g) of a
    64×96 matrix are taken in one loop over g (its 96-column rows read once), not two."""
    f = torch.compile(lambda g, s: (norm(g * s), all_finite(g)), fullgraph=True, dynamic=False)
    g, s = torch.randn(64, 96), torch.rand(96)
    with fresh_cache():
        (n, finite), (source,) = run_and_get_code(f, g, s)
    torch.testing.assert_close(n, torch.linalg.vector_norm(g * s), rtol=1e-6, atol=0.0)
    assert bool(finite)
    assert source.count("x1<static_cast<int64_t>(96L)") == 1


@pytest.mark.parametrize("shape", [(45, 24), (1, 7)])
@pytest.mark.parametrize("dim", [-1, -2])
def test_channel_norms_are_vector_norms(shape: tuple[int, int], dim: int) -> None:
    """channel_norms(x, dim) is torch.linalg.vector_norm(x, dim=dim, keepdim=True): exactly
    eager, to float32 rounding compiled (where column norms sum groups of 16 rows first; 45
    rows leave 13 over)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])) * 5.0
    expected = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    assert torch.equal(channel_norms(x, dim), expected)
    f = torch.compile(lambda t: channel_norms(t, dim), fullgraph=True, dynamic=False)
    torch.testing.assert_close(f(x), expected, rtol=1e-6, atol=0.0)
