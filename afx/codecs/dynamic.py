"""Dynamic-codebook block-wise codes for signed states (``d8``, ``d4``).

The codebook is the signed "dynamic" map of Dettmers et al.: for each decade 10^-(E-1), ..., 10^0
(E exponent bits) it holds the midpoints of an even grid on [0.1, 1] scaled into that decade, with
twice as many points per decade as the previous one, mirrored to negative values, plus 0 and +1.
With (total, exponent) bits = (8, 7) that is 256 entries, with (4, 3) it is 16. Entries are sorted,
so the code of an entry is its rank; 0 sits at index 127 (``d8``) or 7 (``d4``).

Encoding (spec §3.4, CPU path of adafactor8bit 0.4.6): divide each block by its absmax (at least
1e-12), pick the nearest entry by fp32 distance, keep the upper entry on an exact tie, and if the
pick is the zero entry while the value is not zero, step one entry towards the value's sign. So a
non-zero input never decodes to zero or to the opposite sign. Decoding multiplies the entry by
the block absmax. The codebook is not symmetric at the ends: +1 is exact but the most negative
entry is -0.99297 (``d8``) or -0.8875 (``d4``), so -absmax comes back shrunk.

Round-trip error for x/absmax between two entries is at most half their gap times absmax, except
next to zero (up to the full gap to the smallest entry of x's sign, because of the sign rule) and
below the most negative entry (up to its distance to -1).

References:
    Dettmers, Lewis, Shleifer and Zettlemoyer, 2022. "8-bit Optimizers via Block-wise
    Quantization" (ICLR 2022): dynamic tree quantization and block-wise absmax.
    adafactor8bit specification §3.4 (D8/D4), used as the behaviour reference.
"""

from __future__ import annotations

import functools

import torch

from afx.codecs.base import Codec, Shape, blockwise_nbytes, check_block_size, from_blocks, to_blocks
from afx.codecs.linear import AbsmaxEncoded, block_absmax
from afx.codecs.packing import pack_nibbles, read_bytes, unpack_nibbles

Tensor = torch.Tensor

# (total bits, exponent bits) of each codebook, as in the package.
_LAYOUT = {8: (8, 7), 4: (4, 3)}


def _build_codebook(bits: int) -> tuple[float, ...]:
    total, exponent = _LAYOUT[bits]
    entries = [0.0, 1.0]
    for i in range(exponent):
        edges = torch.linspace(0.1, 1.0, 2 ** (i + total - 1 - exponent) + 1, dtype=torch.float32)
        # fp32 midpoints and an fp32 product with the decade factor, so every entry is the same
        # float the package's table holds.
        decade = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (i - exponent + 1)
        entries += decade.tolist() + (-decade).tolist()
    return tuple(sorted(entries))


_CODEBOOKS = {bits: _build_codebook(bits) for bits in _LAYOUT}


def dynamic_codebook(bits: int) -> Tensor:
    """Returns the sorted fp32 codebook of ``d8`` (``bits=8``) or ``d4`` (``bits=4``).

    Args:
        bits: 8 or 4.

    Returns:
        A 1-D fp32 tensor of ``2**bits`` ascending entries in [-1, 1].

    Raises:
        ValueError: if ``bits`` is not 8 or 4.

    References:
        Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization".

    Example:
        >>> from afx.codecs.dynamic import dynamic_codebook
        >>> dynamic_codebook(4)
        tensor([-0.8875, -0.6625, -0.4375, -0.2125, -0.0775, -0.0325, -0.0055,  0.0000,
                 0.0055,  0.0325,  0.0775,  0.2125,  0.4375,  0.6625,  0.8875,  1.0000])
    """
    if bits not in _LAYOUT:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return torch.tensor(_CODEBOOKS[bits], dtype=torch.float32)


def _encode_dynamic(x: Tensor, block_size: int, *, bits: int) -> AbsmaxEncoded:
    codebook = _CODEBOOKS[bits]
    last = len(codebook) - 1
    zero_code = codebook.index(0.0)
    blocks = to_blocks(x, check_block_size(block_size, even=bits == 4))
    absmax = block_absmax(blocks)
    # Built from Python constants inside the function so a compiled graph materialises the table
    # on the state's device instead of copying it there every step.
    table = torch.tensor(codebook, dtype=torch.float32, device=blocks.device)
    v = blocks / absmax[:, None]
    upper = torch.searchsorted(table, v).clamp(max=last)
    lower = (upper - 1).clamp(min=0)
    # Strict comparison: a value exactly halfway keeps the upper entry.
    idx = torch.where((v - table[lower]).abs() < (v - table[upper]).abs(), lower, upper)
    # 0 is the only entry that can disagree in sign with v (every other pick lies on v's side
    # of 0), so the sign rule reduces to stepping off the zero entry.
    on_zero = idx == zero_code
    idx = idx + (on_zero & (v > 0)).to(idx.dtype) - (on_zero & (v < 0)).to(idx.dtype)
    codes = idx.to(torch.uint8)
    return AbsmaxEncoded(pack_nibbles(codes) if bits == 4 else codes, absmax)


def _decode_dynamic(encoded: AbsmaxEncoded, shape: Shape, *, bits: int) -> Tensor:
    codes = unpack_nibbles(encoded.codes) if bits == 4 else read_bytes(encoded.codes)
    table = torch.tensor(_CODEBOOKS[bits], dtype=torch.float32, device=codes.device)
    return from_blocks(table[codes.to(torch.int64)] * encoded.absmax[:, None], shape)


def _nbytes_dynamic(numel: int, block_size: int, *, bits: int) -> int:
    return blockwise_nbytes(numel, block_size, code_bits=bits, stat_bytes=4, even=bits == 4)


def make_dynamic(bits: int = 8) -> Codec:
    """Returns the ``d8`` or ``d4`` codec (adafactor8bit 0.4.6 dynamic momentum codes).

    Args:
        bits: 8 or 4. 4-bit codes are packed two per byte and need an even block size.

    Returns:
        A signed :class:`~afx.codecs.base.Codec` encoding to
        :class:`~afx.codecs.linear.AbsmaxEncoded`.

    Raises:
        ValueError: if ``bits`` is not 8 or 4.

    References:
        Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization"; adafactor8bit
        specification §3.4.

    Example:
        >>> import torch
        >>> from afx.codecs import get_codec
        >>> codec = get_codec("d4")
        >>> enc = codec.encode(torch.tensor([1.0, -1.0, 1e-4, 0.0]), 4)
        >>> enc.codes
        tensor([[240, 135]], dtype=torch.uint8)
        >>> codec.decode(enc, (4,))
        tensor([ 1.0000, -0.8875,  0.0055,  0.0000])
    """
    if bits not in _LAYOUT:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return Codec(
        f"d{bits}",
        True,
        functools.partial(_encode_dynamic, bits=bits),
        functools.partial(_decode_dynamic, bits=bits),
        functools.partial(_nbytes_dynamic, bits=bits),
    )
