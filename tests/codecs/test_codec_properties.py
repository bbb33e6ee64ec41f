"""Properties of every codec: error bounds, zeros, signs, re-encoding, layout and byte counts.

Bounds are derived per format from its definition (see each codec module's docstring) and checked
in float64 against the stored statistics, with explicit slack for fp32 rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afx.codecs import CODECS, Codec, get_codec
from afx.codecs.base import from_blocks, to_blocks
from afx.codecs.dynamic import dynamic_codebook
from afx.codecs.log_space import AdaptiveLogEncoded
from afx.codecs.packing import pack_nibbles, unpack_nibbles

SIGNED = tuple(n for n in CODECS if get_codec(n).signed)
UNSIGNED = tuple(n for n in CODECS if not get_codec(n).signed)
LOG = ("log8", "al8", "al16")
FOUR_BIT = ("uf4", "s4", "d4")
PROPERTY = settings(max_examples=30, deadline=None)

# Slack, in log2 units, for the fp32 rounding of a log-space round trip: log2 (1 ulp), the
# affine code maps on both sides (a few ulps of the block's log2 magnitudes) and pow (1 ulp).
# 2^-21 per unit of |lo| + |hi| + 2 covers that sum with a factor ~4 of margin.
_LOG_SLACK_PER_UNIT = 2.0**-21


@st.composite
def shapes(draw: st.DrawFn) -> tuple[int, ...]:
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 9))
    return draw(st.sampled_from([(), (rows * cols,), (rows, cols)]))


@st.composite
def signed_tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(shapes())
    n = math.prod(shape)
    values = draw(st.lists(st.floats(-(2.0**60), 2.0**60, width=32), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


@st.composite
def nonneg_tensors(draw: st.DrawFn) -> torch.Tensor:
    """Zeros and normal positive floats up to 2^127 (log2 of larger values rounds to 128)."""
    shape = draw(shapes())
    n = math.prod(shape)
    element = st.one_of(st.just(0.0), st.floats(2.0**-126, 2.0**127, width=32))
    values = draw(st.lists(element, min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def block_sizes(name: str) -> st.SearchStrategy[int]:
    sizes = [2, 4, 6, 8, 16, 64] if name in FOUR_BIT else [1, 2, 3, 5, 8, 16, 64]
    return st.sampled_from(sizes)


def roundtrip(codec: Codec, x: torch.Tensor, block_size: int) -> tuple[object, torch.Tensor]:
    encoded = codec.encode(x, block_size)
    return encoded, codec.decode(encoded, x.shape)


def code_values(name: str, codes: torch.Tensor) -> torch.Tensor:
    """Unpacked integer code of every element, as int64 (uint16 value for al16)."""
    if name in FOUR_BIT:
        codes = unpack_nibbles(codes)
    codes = codes.to(torch.int64)
    return codes & 0xFFFF if name == "al16" else codes


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


# ---------------------------------------------------------------------------------------------
# Round-trip error bounds


@pytest.mark.parametrize("name", LOG)
@PROPERTY
@given(data=st.data())
def test_log_codes_relative_error_within_half_a_level(name: str, data: st.DataObject) -> None:
    """|x̂/x − 1| ≤ 2^(S/(2·steps) + slack) − 1 per block: half a log2 level, S = block span.

    steps = 255 for log8 (S = log2 max + 126) and L − 2 for al8/al16 (S = stored scale).
    """
    x = data.draw(nonneg_tensors())
    block_size = data.draw(block_sizes(name))
    enc, y = roundtrip(get_codec(name), x, block_size)
    scale = f64(enc.scale)
    if name == "log8":
        lo, steps = np.full_like(scale, -126.0), 255
    else:
        lo, steps = f64(enc.min_log), (256 if name == "al8" else 65536) - 2
    hi = lo + scale
    bound = 2.0 ** (scale / (2 * steps) + _LOG_SLACK_PER_UNIT * (abs(lo) + abs(hi) + 2)) - 1
    xb, yb = f64(to_blocks(x, block_size)), f64(to_blocks(y, block_size))
    positive = xb > 0
    rel = np.abs(yb - xb) / np.where(positive, xb, 1.0)
    assert np.all(rel[positive] <= np.broadcast_to(bound[:, None], xb.shape)[positive])


@pytest.mark.parametrize("name", ["uf8", "uf4", "s4", "s8"])
@PROPERTY
@given(data=st.data())
def test_linear_codes_error_within_half_a_level(name: str, data: st.DataObject) -> None:
    """|x̂ − clamp(x, lowest, highest)| ≤ half a level, and the stored statistic is the absmax.

    uf (K = 128 or 8): levels absmax/K, representable range [−absmax, (K−1)/K·absmax].
    s4 / s8 (T = 7 or 127): levels scale = absmax·fl(1/T), range [−T·scale, T·scale].
    """
    x = data.draw(signed_tensors())
    block_size = data.draw(block_sizes(name))
    enc, y = roundtrip(get_codec(name), x, block_size)
    blocks = to_blocks(x, block_size)
    absmax = blocks.abs().amax(dim=1).clamp(min=1e-12)
    xb, yb = f64(blocks), f64(to_blocks(y, block_size))
    if name in ("s4", "s8"):
        top = 7 if name == "s4" else 127
        assert torch.equal(enc.scale, absmax * (1.0 / top))
        step = f64(enc.scale)[:, None]
        lowest, highest = -top * step, top * step
    else:
        assert torch.equal(enc.absmax, absmax)
        k = 128 if name == "uf8" else 8
        step = f64(enc.absmax)[:, None] / k
        lowest, highest = -k * step, (k - 1) * step
    err = np.abs(yb - np.clip(xb, lowest, highest))
    assert np.all(err <= step / 2 + step * 2.0**-18)


@pytest.mark.parametrize("name", ["d8", "d4"])
@PROPERTY
@given(data=st.data())
def test_dynamic_codes_error_within_codebook_bound(name: str, data: st.DataObject) -> None:
    """With v = x/absmax between entries c_k ≤ v ≤ c_{k+1}: |x̂ − x| ≤ absmax·(c_{k+1} − c_k)/2.

    Exceptions from the format's definition: next to 0 the sign rule forbids rounding to 0, so
    the bound is the full gap; below the most negative entry it is the distance to that entry.
    """
    x = data.draw(signed_tensors())
    block_size = data.draw(block_sizes(name))
    enc, y = roundtrip(get_codec(name), x, block_size)
    book = f64(dynamic_codebook(8 if name == "d8" else 4))
    a = f64(enc.absmax)[:, None]
    xb, yb = f64(to_blocks(x, block_size)), f64(to_blocks(y, block_size))
    v = xb / a
    k = np.clip(np.searchsorted(book, v, side="right") - 1, 0, len(book) - 2)
    left, right = book[k], book[k + 1]
    bound = np.where((left == 0) | (right == 0), right - left, (right - left) / 2)
    bound = np.where(v < book[0], book[0] - v, bound)
    assert np.all(np.abs(yb - xb) <= a * (bound + 2.0**-20))


@PROPERTY
@given(x=signed_tensors())
def test_passthrough_codecs_fp32_exact_and_bf16_within_half_ulp(x: torch.Tensor) -> None:
    """fp32 round-trips exactly; bf16 equals round-to-nearest-even and is within 2^-8 relative."""
    assert torch.equal(roundtrip(get_codec("fp32"), x, 4)[1], x)
    y = roundtrip(get_codec("bf16"), x, 4)[1]
    assert torch.equal(y, x.to(torch.bfloat16).to(torch.float32))
    normal = x.abs() >= 2.0**-126
    assert torch.all((y - x).abs()[normal] <= 2.0**-8 * x.abs()[normal])


# ---------------------------------------------------------------------------------------------
# Zeros and signs


@pytest.mark.parametrize("name", [n for n in CODECS if n != "log8"])
@PROPERTY
@given(data=st.data())
def test_exact_zero_preserved(name: str, data: st.DataObject) -> None:
    """x = 0 decodes to exactly 0 in every codec but log8; al8/al16 also never decode x > 0 to 0."""
    codec = get_codec(name)
    x = data.draw(signed_tensors() if codec.signed else nonneg_tensors())
    y = roundtrip(codec, x, data.draw(block_sizes(name)))[1]
    assert torch.all(y[x == 0] == 0)
    if not codec.signed:
        assert torch.all(y[x > 0] > 0)


def test_log8_zero_decodes_to_smallest_normal() -> None:
    """log8 has no zero code by definition (spec §3.1): 0 decodes as 2^-126."""
    codec = get_codec("log8")
    y = codec.decode(codec.encode(torch.tensor([0.0, 1.0, 0.0]), 2), (3,))
    assert y[0].item() == 2.0**-126 and y[2].item() == 2.0**-126


@pytest.mark.parametrize("name", SIGNED)
@PROPERTY
@given(data=st.data())
def test_signed_codes_never_flip_signs(name: str, data: st.DataObject) -> None:
    """sign(x̂) ∈ {sign(x), 0}; d8/d4 never map a non-zero value to 0 either (sign rule).

    The uniform codes may round small values to 0: that is their definition, not a flip.
    """
    x = data.draw(signed_tensors())
    block_size = data.draw(block_sizes(name))
    enc, y = roundtrip(get_codec(name), x, block_size)
    assert torch.all(torch.sign(y) * torch.sign(x) >= 0)
    if name in ("d8", "d4"):
        v = to_blocks(x, block_size) / enc.absmax[:, None]
        resolvable = from_blocks(v.abs() >= 2.0**-126, x.shape)
        assert torch.all(torch.sign(y)[resolvable] == torch.sign(x)[resolvable])


def test_uniform_codes_clip_the_positive_extreme() -> None:
    """uf8/uf4 are asymmetric (spec §3.4): +absmax decodes to (K−1)/K·absmax, −absmax exactly."""
    x = torch.tensor([2.0, -1.0, -2.0, 1.0])
    for name, k in (("uf8", 128), ("uf4", 8)):
        codec = get_codec(name)
        y = codec.decode(codec.encode(x, 2), (4,))
        assert y.tolist() == [2.0 * (k - 1) / k, -1.0, -2.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Re-encoding a decoded state


@pytest.mark.parametrize("name", ["fp32", "bf16"])
@PROPERTY
@given(x=signed_tensors())
def test_reencode_is_exact_for_passthrough(name: str, x: torch.Tensor) -> None:
    """decode(encode(decode(encode(x)))) == decode(encode(x)) bitwise."""
    codec = get_codec(name)
    y = roundtrip(codec, x, 4)[1]
    assert torch.equal(roundtrip(codec, y, 4)[1], y)


@pytest.mark.parametrize("name", ["uf8", "uf4", "d8", "d4"])
@PROPERTY
@given(data=st.data())
def test_reencode_is_exact_when_the_block_extreme_is_representable(
        name: str, data: st.DataObject) -> None:
    """Re-encoding is a bitwise fixed point when each block's absmax is attained on the exact side.

    uf codes represent −absmax exactly, d codes +absmax exactly; the decoded block then has the
    same absmax, and every other decoded value sits on a level, so it maps to the same code.
    """
    block_size = data.draw(block_sizes(name))
    x = data.draw(signed_tensors())
    blocks = to_blocks(x, block_size)
    # Put the exact side's extreme into every block.
    exact_sign = -1.0 if name.startswith("uf") else 1.0
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    blocks = torch.where(blocks.abs() == absmax, exact_sign * absmax, blocks)
    x = blocks.reshape(-1)
    codec = get_codec(name)
    enc1, y = roundtrip(codec, x, block_size)
    enc2, z = roundtrip(codec, y, block_size)
    assert all(torch.equal(a, b) for a, b in zip(enc1, enc2))
    assert torch.equal(z, y)


@pytest.mark.parametrize(("name", "x", "shrink"), [
    ("uf8", [1.0, -0.5], 127 / 128), ("uf4", [1.0, -0.5], 7 / 8),
    ("d8", [-1.0, 0.5], None), ("d4", [-1.0, 0.5], 0.8875)])
def test_reencode_drifts_when_the_extreme_sits_on_the_clipped_side(
        name: str, x: list[float], shrink: float | None) -> None:
    """The clipped extreme (+absmax for uf, −absmax for d) shrinks the block absmax on every
    re-encode, so these four codes are not idempotent in general (spec §8 item 5)."""
    codec = get_codec(name)
    enc1, y = roundtrip(codec, torch.tensor(x), 2)
    enc2, _ = roundtrip(codec, y, 2)
    expected = float(-dynamic_codebook(8)[0]) if shrink is None else shrink
    assert enc1.absmax.item() == 1.0
    assert enc2.absmax.item() == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("name", [*LOG, "s4"])
@PROPERTY
@given(data=st.data())
def test_reencode_moves_values_only_by_fp32_rounding(name: str, data: st.DataObject) -> None:
    """log8/al8/al16/s4 re-encode to the same values up to fp32 rounding, never by a level.

    They are not bitwise idempotent: the statistics are recomputed from decoded values (log2 of
    a pow, or 7·scale·fl(1/7)) and come back a few ulps off. Codes are stable while the level
    spacing is far above fp32 resolution (always for s4; S/steps ≥ 2^-10 for the log codes). A
    finer spacing can put two adjacent codes on one float (see the al16 test below).
    """
    codec = get_codec(name)
    block_size = data.draw(block_sizes(name))
    x = data.draw(signed_tensors() if codec.signed else nonneg_tensors())
    enc1, y = roundtrip(codec, x, block_size)
    enc2, z = roundtrip(codec, y, block_size)
    if name == "s4":
        assert torch.equal(enc1.codes, enc2.codes)
        assert torch.allclose(z, y, rtol=2.0**-21, atol=0.0)
        return
    positive = y > 0
    assert torch.equal(z > 0, positive)
    drift = (torch.log2(z[positive]) - torch.log2(y[positive])).abs()
    assert torch.all(drift <= 2.0**-14)  # 4 ulps of a log2 value of magnitude up to 128
    steps = 255 if name == "log8" else (256 if name == "al8" else 65536) - 2
    coarse = (enc1.scale / steps >= 2.0**-10)[:, None]
    same = code_values(name, enc1.codes) == code_values(name, enc2.codes)
    assert torch.all(same | ~coarse)


def test_al16_adjacent_codes_can_decode_to_the_same_float() -> None:
    """Why al16 codes are not always a fixed point: with log2 values near 100 (ulp 7.6e-6) and a
    half-octave span, the level spacing (7.6e-6) equals the fp32 resolution, so neighbouring codes
    collide and re-encoding may pick the other code of a pair without changing the value."""
    codes = torch.arange(1, 65536, dtype=torch.int32).to(torch.int16)[None, :]
    block = AdaptiveLogEncoded(codes, torch.tensor([0.5]), torch.tensor([100.0]))
    values = get_codec("al16").decode(block, (65535,))
    assert (values[1:] == values[:-1]).sum().item() > 0


# ---------------------------------------------------------------------------------------------
# Layout, bytes, zero state


def expected_layout(name: str, numel: int, block_size: int) -> dict[str, tuple]:
    nblocks = -(-numel // block_size)
    codes_width = block_size // 2 if name in FOUR_BIT else block_size
    code_dtype = torch.int16 if name == "al16" else torch.uint8
    if name in ("fp32", "bf16"):
        return {"value": ((numel,), torch.float32 if name == "fp32" else torch.bfloat16)}
    stats = {"log8": ("scale",), "al8": ("scale", "min_log"), "al16": ("scale", "min_log"),
             "s4": ("scale",), "s8": ("scale",)}.get(name, ("absmax",))
    layout = {"codes": ((nblocks, codes_width), code_dtype)}
    layout.update({s: ((nblocks,), torch.float32) for s in stats})
    return layout


@pytest.mark.parametrize("name", CODECS)
@PROPERTY
@given(data=st.data())
def test_layout_depends_only_on_numel_and_block_size(name: str, data: st.DataObject) -> None:
    """Field names, shapes and dtypes of the encoding are fixed by (numel, block_size); decode
    returns an fp32 tensor of the requested shape; nbytes equals the encoded tensors' bytes."""
    codec = get_codec(name)
    x = data.draw(signed_tensors() if codec.signed else nonneg_tensors())
    block_size = data.draw(block_sizes(name))
    enc, y = roundtrip(codec, x, block_size)
    layout = expected_layout(name, x.numel(), block_size)
    assert enc._fields == tuple(layout)
    assert {f: (tuple(t.shape), t.dtype) for f, t in zip(enc._fields, enc)} == layout
    assert y.shape == x.shape and y.dtype == torch.float32
    assert codec.nbytes(x.numel(), block_size) == sum(t.numel() * t.element_size() for t in enc)


@pytest.mark.parametrize("name", CODECS)
def test_empty_and_zero_dim_states(name: str) -> None:
    """A 0-element state encodes to 0-block tensors; a 0-d state keeps its shape."""
    codec = get_codec(name)
    block = 4
    enc = codec.encode(torch.zeros(0, 3), block)
    assert codec.decode(enc, (0, 3)).shape == (0, 3)
    assert codec.nbytes(0, block) == 0 == sum(t.numel() for t in enc)
    assert codec.decode(codec.encode(torch.tensor(0.5), block), ()).shape == ()


def test_nbytes_reproduces_the_spec_measurements() -> None:
    """The byte formulas give the package's measured state sizes for a 1024×4096 weight
    (spec §4.3): factored AL8 V (rows + cols, B = 2048) plus optional momentum over 4 Mi values."""
    rows, cols, n = 1024, 4096, 1024 * 4096

    def nb(name: str, numel: int, block_size: int) -> int:
        return get_codec(name).nbytes(numel, block_size)

    factored_al8 = nb("al8", rows, 2048) + nb("al8", cols, 2048)
    assert factored_al8 == 6_168
    assert nb("al16", rows, 2048) + nb("al16", cols, 2048) == 12_312
    assert factored_al8 + nb("uf4", n, 256) == 2_168_856 == factored_al8 + nb("d4", n, 256)
    assert factored_al8 + nb("uf8", n, 256) == 4_266_008 == factored_al8 + nb("d8", n, 256)
    assert nb("al8", n, 2048) + nb("uf8", n, 256) == 8_470_528
    assert nb("al16", n, 2048) + nb("uf8", n, 256) == 12_664_832
    factored_log8 = nb("log8", rows, 2048) + nb("log8", cols, 2048)
    assert factored_log8 == 6_156
    assert factored_log8 + nb("s4", n, 128) == 2_234_380
    assert nb("log8", n, 2048) + nb("s4", n, 128) == 6_430_720
    assert nb("fp32", rows, 2048) + nb("fp32", cols, 2048) == 20_480


@pytest.mark.parametrize(("name", "zero_code"), [
    ("al8", 0), ("al16", 0), ("uf8", 128), ("uf4", 0x88), ("s4", 0x88), ("d8", 127),
    ("d4", 0x77)])
def test_zero_state_codes(name: str, zero_code: int) -> None:
    """encode(zeros) gives the package's zero codes (spec §3.2–3.4) and decodes to zeros."""
    codec = get_codec(name)
    enc = codec.encode(torch.zeros(3, 5), 4)
    assert torch.all(enc.codes == zero_code)
    assert torch.equal(codec.decode(enc, (3, 5)), torch.zeros(3, 5))


# ---------------------------------------------------------------------------------------------
# Codebooks, packing, validation


def test_dynamic_codebooks_match_the_spec_values() -> None:
    """D4 is the spec's 16-value list; D8 has 256 sorted entries, 0 at 127, ends −0.99297 and 1."""
    d4 = [-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055, 0.0,
          0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875, 1.0]
    assert dynamic_codebook(4).tolist() == pytest.approx(d4, abs=1e-7)
    d8 = dynamic_codebook(8)
    assert d8.shape == (256,) and torch.all(d8[1:] > d8[:-1])
    assert d8[127].item() == 0.0 and d8[-1].item() == 1.0
    assert d8[0].item() == pytest.approx(-0.99297, abs=1e-5)


@PROPERTY
@given(st.lists(st.integers(0, 15), min_size=2, max_size=40).filter(lambda v: len(v) % 2 == 0))
def test_nibble_packing_round_trips_with_even_element_high(codes: list[int]) -> None:
    """pack puts element 2k in the high nibble of byte k; unpack inverts it."""
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_nibbles(t)
    assert packed.tolist() == [16 * a + b for a, b in zip(codes[0::2], codes[1::2])]
    assert torch.equal(unpack_nibbles(packed), t)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("bad", [0, -4, 2.0, True, None])
def test_invalid_block_size_is_rejected(name: str, bad: object) -> None:
    """encode and nbytes reject non-positive or non-integer block sizes, naming the option."""
    codec = get_codec(name)
    with pytest.raises(ValueError, match=r"block_size.*" + repr(bad).replace(".", r"\.")):
        codec.encode(torch.ones(4), bad)
    with pytest.raises(ValueError, match="block_size"):
        codec.nbytes(4, bad)


@pytest.mark.parametrize("name", FOUR_BIT)
def test_odd_block_size_is_rejected_for_4bit_codes(name: str) -> None:
    """Two codes share a byte inside a block, so 4-bit codes need an even block size."""
    with pytest.raises(ValueError, match=r"block_size must be even.*3"):
        get_codec(name).encode(torch.ones(4), 3)


def test_get_codec_errors_name_the_bad_value() -> None:
    """Unknown names list the valid ones; unknown or invalid options are reported by name."""
    with pytest.raises(ValueError, match=r"unknown codec 'q8'; valid names: fp32, bf16, log8"):
        get_codec("q8")
    with pytest.raises(TypeError, match=r"'uf8' got unexpected option\(s\) floor_log2"):
        get_codec("uf8", floor_log2=-10.0)
    for bad in (float("nan"), float("inf"), "low", True):
        with pytest.raises(ValueError, match="floor_log2"):
            get_codec("al8", floor_log2=bad)


def test_get_codec_returns_one_object_per_configuration() -> None:
    """Identical requests share a Codec, so compiled graphs see the same functions."""
    assert get_codec("al8") is get_codec("al8")
    assert get_codec("al8", floor_log2=-20.0) is get_codec("al8", floor_log2=-20.0)
    assert get_codec("al8", floor_log2=-20.0) is not get_codec("al8")


def test_adaptive_log_floor_raises_small_values_to_the_floor() -> None:
    """floor_log2 bounds min_log from below: values under 2^floor decode as exactly 2^min_log."""
    codec = get_codec("al8", floor_log2=-20.0)
    x = torch.tensor([2.0**-30, 2.0**-25, 0.0, 1.0])
    enc = codec.encode(x, 4)
    assert enc.min_log.item() == -20.0
    y = codec.decode(enc, (4,))
    assert y[:2].tolist() == [2.0**-20, 2.0**-20] and y[2].item() == 0.0 and y[3].item() == 1.0


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 5), st.integers(1, 4), st.sampled_from([1, 2, 4, 8]), st.integers(0, 1))
def test_blocks_are_the_row_major_padded_layout(rows: int, blocks_per_row: int, block: int,
                                                ragged: int) -> None:
    """to_blocks is the flattened, zero-padded, row-major layout whatever path it takes (rows
    tiled by whole blocks, ragged rows, no rows at all), and from_blocks inverts it."""
    cols = blocks_per_row * block + ragged
    x = torch.arange(rows * cols, dtype=torch.float32).reshape(rows, cols) + 1.0
    blocks = to_blocks(x, block)
    flat = x.reshape(-1)
    pad = -flat.numel() % block
    reference = torch.cat([flat, torch.zeros(pad)]).reshape(-1, block)
    assert blocks.shape == (reference.shape[0], block)
    assert torch.equal(blocks, reference)
    assert torch.equal(from_blocks(blocks, x.shape), x)
