"""afx codecs against the adafactor8bit package's own CPU quantizers, bit for bit.

al8, al16, uf8, uf4, d8 and d4 are compared with adafactor8bit 0.4.6 (installed), log8 and s4
with 0.2.2 (fixture in conftest.py). For each input the codes, the per-block statistics and the
decoded values must be identical. afx evaluates the same fp32 operations in the same order as the
package, so rounding ties resolve identically too (half-to-even for the level codes, upper entry
for the codebooks); the tie tests below construct exact ties and check both sides agree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afx.codecs import get_codec
from afx.codecs.dynamic import dynamic_codebook

PROPERTY = settings(max_examples=25, deadline=None)
FLT_MAX = torch.finfo(torch.float32).max

Reference = Callable[[torch.Tensor, int], tuple[torch.Tensor, tuple[torch.Tensor, ...],
                                                 torch.Tensor]]


def reference(name: str, a8_046: ModuleType | None, a8_022: ModuleType | None,
              floor_log2: float = -126.0) -> Reference:
    """The package's (codes, statistics, decoded) for codec ``name`` as a function of (x, B)."""

    def al(x: torch.Tensor, block: int) -> tuple:
        levels = 256 if name == "al8" else 65536
        q, scale, min_log, shape, pad = a8_046._log_quantize_nonneg(
            x, block, min_log_floor=floor_log2, n_levels=levels)
        return q, (scale, min_log), a8_046._log_dequantize_nonneg(
            q, scale, min_log, shape, pad, n_levels=levels)

    def momentum(x: torch.Tensor, block: int) -> tuple:
        q, absmax = a8_046._m_quantize(x, name, block)
        return q, (absmax,), a8_046._m_dequantize(
            q, absmax, x.numel(), x.shape, block, x.device, name, use_cuda=False)

    def log8(x: torch.Tensor, block: int) -> tuple:
        q, scale, shape, pad = a8_022._log_quantize_nonneg(x, block)
        return q, (scale,), a8_022._log_dequantize_nonneg(q, scale, shape, pad)

    def s4(x: torch.Tensor, block: int) -> tuple:
        q, scale = a8_022._quantize_4bit_pytorch(x, block)
        return q, (scale,), a8_022._dequantize_4bit(q, scale, x.numel(), x.shape, block, x.device)

    return {"al8": al, "al16": al, "log8": log8, "s4": s4}.get(name, momentum)


def compare(name: str, ref: Reference, x: torch.Tensor, block: int,
            **options: float) -> tuple[int, int]:
    """Asserts afx == package for one input; returns (equal codes, total codes)."""
    codec = get_codec(name, **options)
    enc = codec.encode(x, block)
    dec = codec.decode(enc, x.shape)
    ref_codes, ref_stats, ref_dec = ref(x, block)
    codes, want = enc.codes.reshape(-1), ref_codes.reshape(-1)
    assert codes.dtype == want.dtype and codes.shape == want.shape
    n_equal = int((codes == want).sum())
    assert n_equal == codes.numel(), f"{name} B={block}: {codes.numel() - n_equal} codes differ"
    for mine, theirs in zip(enc[1:], ref_stats):
        assert torch.equal(mine, theirs), f"{name} B={block}: statistics differ"
    assert torch.equal(dec, ref_dec), f"{name} B={block}: decoded values differ"
    return n_equal, codes.numel()


def compare_cases(name: str, ref: Reference, make, seed: int) -> None:
    """Runs :func:`compare` over every (size, block) case and reports the counts."""
    g = torch.Generator().manual_seed(seed)
    equal = total = 0
    for n, block in CASES:
        e, t = compare(name, ref, make(n, g), block)
        equal, total = equal + e, total + t
    print(f"{name}: {equal}/{total} stored code units equal (bytes for 4-bit codes)")


# ---------------------------------------------------------------------------------------------
# Inputs


def momentum_like(n: int, g: torch.Generator) -> torch.Tensor:
    """Signed values over 60 octaves, ~5 % exact zeros, one all-zero and one sub-1e-12 stretch."""
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    x[torch.rand(n, generator=g) < 0.05] = 0.0
    x[: n // 8] = 0.0
    x[n // 8: n // 4] *= 1e-20
    return x


def second_moment_like(n: int, g: torch.Generator) -> torch.Tensor:
    """Non-negative values over the whole normal range, zeros, subnormals, isolated values."""
    x = torch.exp2(torch.rand(n, generator=g) * 253.0 - 126.0)
    x[torch.rand(n, generator=g) < 0.1] = 0.0
    x[: n // 8] = 0.0
    x[n // 8] = 3.0  # a lone non-zero value in a zero region (one-octave rule)
    if n >= 16:
        x[n // 4: n // 4 + 5] = torch.tensor([1e-40, 1e-39, 2.0**-127, 2.0**-126, 1e-45])
    x[n // 2: n // 2 + 3] = 0.25  # repeated equal values
    return x


CASES = [(n, block) for block in (2, 6, 32, 256, 2048) for n in (1, 7, 1000, 5003)]


@pytest.mark.parametrize("name", ["al8", "al16", "uf8", "uf4", "d8", "d4"])
def test_codes_statistics_and_values_equal_adafactor8bit_046(
        name: str, a8_046: ModuleType) -> None:
    """afx matches 0.4.6's CPU quantize/dequantize bitwise on structured random inputs."""
    ref = reference(name, a8_046, None)
    make = second_moment_like if name.startswith("al") else momentum_like
    compare_cases(name, ref, make, seed=7)


@pytest.mark.parametrize("name", ["log8", "s4"])
def test_codes_statistics_and_values_equal_adafactor8bit_022(
        name: str, a8_022: ModuleType) -> None:
    """afx matches 0.2.2's CPU log8 and 4-bit quantizers bitwise on structured random inputs."""
    ref = reference(name, None, a8_022)
    make = second_moment_like if name == "log8" else momentum_like
    compare_cases(name, ref, make, seed=8)


@pytest.mark.parametrize("floor_log2", [-60.0, -20.0, 0.5])
@pytest.mark.parametrize("name", ["al8", "al16"])
def test_floor_option_equals_the_package_floor(
        name: str, floor_log2: float, a8_046: ModuleType) -> None:
    """floor_log2 behaves like 0.4.6's min_log_floor argument (its CUDA-path floor)."""
    ref = reference(name, a8_046, None, floor_log2=floor_log2)
    g = torch.Generator().manual_seed(9)
    for n, block in [(1000, 32), (5003, 256)]:
        compare(name, ref, second_moment_like(n, g), block, floor_log2=floor_log2)


@st.composite
def inputs(draw: st.DrawFn, signed: bool, even: bool) -> tuple[torch.Tensor, int]:
    block = draw(st.sampled_from([2, 4, 8, 16] if even else [1, 2, 3, 5, 8, 16]))
    n = draw(st.integers(1, 3 * block + 1))
    element = (st.floats(-(2.0**100), 2.0**100, width=32) if signed
               else st.one_of(st.just(0.0), st.floats(0.0, 2.0**127, width=32)))
    return torch.tensor(draw(st.lists(element, min_size=n, max_size=n))), block


@pytest.mark.parametrize("name", ["al8", "al16", "uf8", "uf4", "d8", "d4"])
@PROPERTY
@given(data=st.data())
def test_arbitrary_inputs_equal_adafactor8bit_046(
        name: str, a8_046: ModuleType, data: st.DataObject) -> None:
    """Hypothesis inputs (subnormals, signed zeros, extreme magnitudes) match 0.4.6 bitwise."""
    x, block = data.draw(inputs(signed=not name.startswith("al"), even=name.endswith("4")))
    compare(name, reference(name, a8_046, None), x, block)


@pytest.mark.parametrize("name", ["log8", "s4"])
@PROPERTY
@given(data=st.data())
def test_arbitrary_inputs_equal_adafactor8bit_022(
        name: str, a8_022: ModuleType, data: st.DataObject) -> None:
    """Hypothesis inputs match 0.2.2 bitwise."""
    x, block = data.draw(inputs(signed=name == "s4", even=name == "s4"))
    compare(name, reference(name, None, a8_022), x, block)


# ---------------------------------------------------------------------------------------------
# Rounding ties and edge behaviour


def unpacked(codes: torch.Tensor, four_bit: bool) -> list[int]:
    flat = codes.reshape(-1)
    if four_bit:
        flat = torch.stack((flat >> 4, flat & 0x0F), dim=-1).reshape(-1)
    return (flat.to(torch.int64) & 0xFFFF).tolist()


@pytest.mark.parametrize(("name", "x", "codes"), [
    # absmax 1: x·128 = ±0.5, 1.5, 2.5 exactly; half-to-even gives 0, 2, 2 levels.
    ("uf8", [-1.0, 0.5 / 128, 1.5 / 128, 2.5 / 128, -0.5 / 128, -1.5 / 128],
     [0, 128, 130, 130, 128, 126]),
    ("uf4", [-1.0, 0.5 / 8, 1.5 / 8, 2.5 / 8, -0.5 / 8, -1.5 / 8], [0, 8, 10, 10, 8, 6]),
    # absmax 7: scale = 7·fl(1/7) rounds to exactly 1.0, so x = k + 0.5 is a tie.
    ("s4", [7.0, 0.5, 1.5, 2.5, -0.5, -2.5], [15, 8, 10, 10, 8, 6]),
    # log2 = −1, 3, 0, 2: min −1, span 4, positions 0, 254, 63.5, 190.5 levels.
    ("al8", [0.5, 8.0, 1.0, 4.0], [1, 255, 65, 191]),
    ("al16", [0.5, 8.0, 1.0, 4.0], [1, 65535, 16385, 49151]),
])
def test_level_ties_round_half_to_even_like_the_package(
        name: str, x: list[float], codes: list[int], request: pytest.FixtureRequest) -> None:
    """Exact ties between two levels go to the even level in afx and in the package."""
    t = torch.tensor(x)
    enc = get_codec(name).encode(t, len(x))
    assert unpacked(enc.codes, name in ("uf4", "s4")) == codes
    package = request.getfixturevalue("a8_022" if name == "s4" else "a8_046")
    compare(name, reference(name, package, package), t, len(x))


def exact_codebook_ties(book: torch.Tensor) -> list[tuple[int, float]]:
    """(i, v) with v exactly halfway (in fp32 distances) between entries i and i + 1.

    Pairs touching the zero entry are left out: there the sign rule, not the tie, decides.
    """
    ties = []
    for i in range(len(book) - 1):
        lo, hi = book[i], book[i + 1]
        v = ((lo.double() + hi.double()) / 2).float()
        if lo != 0 and hi != 0 and (v - lo).abs() == (hi - v).abs() and lo < v < hi:
            ties.append((i, v.item()))
    return ties


@pytest.mark.parametrize("name", ["d8", "d4"])
def test_codebook_ties_pick_the_upper_entry_like_the_package(
        name: str, a8_046: ModuleType) -> None:
    """A value exactly halfway between two codebook entries takes the upper one, in both."""
    bits = 8 if name == "d8" else 4
    ties = exact_codebook_ties(dynamic_codebook(bits))
    assert len(ties) >= 3
    upper = torch.tensor([i + 1 for i, _ in ties])
    # The leading 1.0 fixes absmax = 1, so x / absmax is the tie value itself.
    x = torch.tensor([1.0] + [v for _, v in ties] + [0.0] * ((1 + len(ties)) % 2))
    enc = get_codec(name).encode(x, x.numel())
    codes = torch.tensor(unpacked(enc.codes, bits == 4))
    assert torch.equal(codes[1: len(ties) + 1], upper)
    compare(name, reference(name, a8_046, None), x, x.numel())


def test_values_next_to_float_max_overflow_like_the_package(a8_046: ModuleType) -> None:
    """Not in the spec: log2(FLT_MAX) rounds to 128 in fp32, so the block maximum decodes to
    2^128 = inf, in afx exactly as in the package (a state never gets that large in practice)."""
    x = torch.tensor([FLT_MAX, 1.0])
    codec = get_codec("al8")
    assert math.isinf(codec.decode(codec.encode(x, 2), (2,))[0].item())
    compare("al8", reference("al8", a8_046, None), x, 2)
