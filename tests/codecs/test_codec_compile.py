"""Compiled codecs equal eager codecs.

One ``torch.compile(fullgraph=True, dynamic=False)`` function round-trips a small tensor through
every codec at once (a compile costs tens of seconds here, so there is exactly one).

Bitwise equality holds for everything built from IEEE arithmetic, rounding, comparisons,
searches and integer casts: fp32, bf16, uf8, uf4, s4, d8, d4, and the codes and statistics of
the log codes. It cannot be promised for log2 and 2^y, which the log codes need: eager ATen
evaluates them with SLEEF vector kernels (and scalar libm for loop tails, and a pow kernel for
2^y), while Inductor emits std::exp2/std::log2 or SLEEF depending on whether it vectorises the
fused loop; each is within about 1 ulp of the exact result but they differ in the last bit. For
log8/al8/al16 the test therefore requires decoded values within 4 ulps and codes/statistics within
what a 1-ulp log2 difference can cause (a code one level off at an exact rounding boundary,
statistics a few ulps off), and reports how many values matched exactly.
"""

from __future__ import annotations

import torch
from afx_testing import buffer_sizes

from afx.codecs import CODECS, get_codec
from afx.codecs.base import to_blocks

BLOCK = 8
LOG = ("log8", "al8", "al16")
_CODECS = tuple(get_codec(name) for name in CODECS)


def _roundtrip_all(x: torch.Tensor) -> dict[str, tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    out = {}
    for codec in _CODECS:
        encoded = codec.encode(x if codec.signed else x.abs(), BLOCK)
        out[codec.name] = (tuple(encoded), codec.decode(encoded, x.shape))
    return out


def _sample() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    magnitudes = torch.exp2(torch.randint(-30, 30, (7, 11), generator=g).to(torch.float32))
    x = torch.randn(7, 11, generator=g) * magnitudes
    x[0, :3] = 0.0  # exact zeros (and the padded tail of the last block)
    return x


def test_compiled_roundtrip_of_every_codec_matches_eager() -> None:
    """One fullgraph compile of encode+decode for all codecs equals eager (see module docstring)."""
    x = _sample()
    compiled = torch.compile(_roundtrip_all, fullgraph=True, dynamic=False)(x)
    eager = _roundtrip_all(x)
    exact_decoded = {}
    for name in CODECS:
        (enc_c, dec_c), (enc_e, dec_e) = compiled[name], eager[name]
        assert dec_c.shape == x.shape and dec_c.dtype == torch.float32
        assert all(a.dtype == b.dtype and a.shape == b.shape for a, b in zip(enc_c, enc_e))
        if name not in LOG:
            assert all(torch.equal(a, b) for a, b in zip(enc_c, enc_e)), name
            assert torch.equal(dec_c, dec_e), name
            continue
        codes_c, codes_e = (c.to(torch.int64) & 0xFFFF for c in (enc_c[0], enc_e[0]))
        same_code = codes_c == codes_e
        assert (codes_c - codes_e).abs().max().item() <= 1, name
        assert (~same_code).float().mean().item() <= 0.05, name
        for stat_c, stat_e in zip(enc_c[1:], enc_e[1:]):
            torch.testing.assert_close(stat_c, stat_e, rtol=2.0**-21, atol=2.0**-21)
        blocks_c, blocks_e = to_blocks(dec_c, BLOCK), to_blocks(dec_e, BLOCK)
        torch.testing.assert_close(blocks_c[same_code], blocks_e[same_code],
                                   rtol=2.0**-21, atol=0.0)
        exact_decoded[name] = (dec_c == dec_e).sum().item()
    print(f"log codecs, decoded values equal bitwise out of {x.numel()}: {exact_decoded}")


def _neighbours(stride: int) -> torch.Tensor:
    """Pairs of adjacent positive floats, one pair every ``stride`` bit patterns from the
    smallest subnormal to the largest finite float: shape ``(n, 2)``."""
    bits = torch.arange(1, 0x7F7FFFFF, stride, dtype=torch.int32)
    return torch.stack([bits, bits + 1], dim=1).view(torch.float32)


def test_log2_never_decreases_from_a_float_to_the_next_eager_or_compiled() -> None:
    """float32 log2 is monotone, eager and compiled, on 2.1M pairs of adjacent floats spread
    over every binade: the log code encoders rely on it when they take a block's statistics
    as log2 of its extreme value instead of the extreme of its logarithms."""
    pairs = _neighbours(1009)
    for log2 in (torch.log2, torch.compile(torch.log2, fullgraph=True, dynamic=False)):
        y = log2(pairs)
        assert bool((y[:, 1] >= y[:, 0]).all())


def test_compiled_log_encoders_store_no_float32_logarithm_of_the_state() -> None:
    """Compiled, al8's block statistics are log2 of each block's extremes (log8's too, by the
    same helper), so the logarithms have one reader (the codes) and Inductor allocates no
    float32 buffer of the state's size; taken as the extremes of the logarithms, they were
    stored whole first."""
    x = torch.rand(64, 2048) + 0.5
    x[3, :7] = 0.0
    encode = torch.compile(get_codec("al8").encode, fullgraph=True, dynamic=False)
    sizes = buffer_sizes(encode, x, 2048, dtype=torch.float32)
    assert max(sizes) < x.numel(), sizes
