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
