"""Uniform (linear) block-wise codes for signed states such as momentum.

* ``uf8`` / ``uf4`` (adafactor8bit 0.4.6, spec §3.4): per block ``absmax`` (at least 1e-12) is
  stored; the code is round(x / absmax · K) clamped to ``[-K, K - 1]`` and offset by K, with K = 128
  (8 bits) or 8 (4 bits). Levels are absmax/K apart. The code range is asymmetric: -absmax is
  exact, but +absmax lands on the clamp and decodes to (K - 1)/K · absmax (-0.8 % for ``uf8``,
  -12.5 % for ``uf4``).
* ``s4`` (adafactor8bit 0.2.2, spec §3.2): symmetric 4-bit code with 15 used levels. Per block
  ``scale`` = absmax · fl32(1/7) is stored; the code is round(x / scale) clamped to ``[-8, 7]``
  plus 8. Because |x / scale| never exceeds 7 (up to fp32 rounding), code 0 is never produced and
  both ±absmax are represented (to fp32 rounding).

4-bit codes are packed two per byte, even element in the high nibble (see
:mod:`afx.codecs.packing`). Rounding is half-to-even (``torch.round``), as in the package's CPU
path.

For a value inside the representable range ``[-absmax, (K - 1)/K · absmax]`` (``uf``) or
``[-7·scale, 7·scale]`` (``s4``), the absolute round-trip error is at most half a level: absmax/(2K)
or scale/2, up to fp32 rounding. Values beyond the positive clamp decode to the top level.

References:
    Dettmers, Lewis, Shleifer and Zettlemoyer, 2022. "8-bit Optimizers via Block-wise
    Quantization" (ICLR 2022): block-wise absmax normalisation.
    adafactor8bit specification, §3.2 (0.2.2 4-bit momentum) and §3.4 (UF8/UF4), used as the
    behaviour reference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from afx.codecs.base import Codec, Shape, blockwise_nbytes, check_block_size, from_blocks, to_blocks
from afx.codecs.packing import pack_nibbles, read_bytes, unpack_nibbles

Tensor = torch.Tensor

# Lower clamp of the block absmax, so an all-zero block still has a finite, positive scale.
_MIN_ABSMAX = 1e-12


class AbsmaxEncoded(NamedTuple):
    """A ``uf8``, ``uf4``, ``d8`` or ``d4`` state.

    Attributes:
        codes: uint8, ``(nblocks, block_size)`` for 8-bit codes or ``(nblocks, block_size // 2)``
            for packed 4-bit codes.
        absmax: fp32, ``(nblocks,)``: the block's largest magnitude, at least 1e-12.

    References:
        Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022: block-wise absmax
        normalisation.

    Example:
        >>> import torch
        >>> from afx.codecs import get_codec
        >>> get_codec("uf8").encode(torch.tensor([1.0, -2.0, 0.5]), 4)
        AbsmaxEncoded(codes=tensor([[192,   0, 160, 128]], dtype=torch.uint8), absmax=tensor([2.]))
    """

    codes: Tensor
    absmax: Tensor


class ScaledEncoded(NamedTuple):
    """An ``s4`` state.

    Attributes:
        codes: uint8, ``(nblocks, block_size // 2)``, packed 4-bit codes.
        scale: fp32, ``(nblocks,)``: level spacing, absmax · fl32(1/7).
    """

    codes: Tensor
    scale: Tensor


def block_absmax(blocks: Tensor) -> Tensor:
    """Per-row largest magnitude of ``(nblocks, block_size)`` blocks, clamped at 1e-12.

    Example:
        >>> import torch
        >>> from afx.codecs.linear import block_absmax
        >>> block_absmax(torch.tensor([[1.0, -3.0], [0.0, 0.0]]))
        tensor([3.0000e+00, 1.0000e-12])
    """
    return blocks.abs().amax(dim=1).clamp(min=_MIN_ABSMAX)


def _encode_uniform(x: Tensor, block_size: int, *, bits: int) -> AbsmaxEncoded:
    half = 1 << (bits - 1)
    blocks = to_blocks(x, check_block_size(block_size, even=bits == 4))
    absmax = block_absmax(blocks)
    # Divide first, then scale by K: the package's operation order, so ties round identically.
    q = torch.round(blocks / absmax[:, None] * float(half)).clamp(-half, half - 1) + half
    codes = q.to(torch.uint8)
    return AbsmaxEncoded(pack_nibbles(codes) if bits == 4 else codes, absmax)


def _decode_uniform(encoded: AbsmaxEncoded, shape: Shape, *, bits: int) -> Tensor:
    half = 1 << (bits - 1)
    codes = unpack_nibbles(encoded.codes) if bits == 4 else read_bytes(encoded.codes)
    step = encoded.absmax / float(half)
    return from_blocks((codes.to(torch.float32) - float(half)) * step[:, None], shape)


def _nbytes_absmax(numel: int, block_size: int, *, bits: int) -> int:
    return blockwise_nbytes(numel, block_size, code_bits=bits, stat_bytes=4, even=bits == 4)


def _encode_symmetric(x: Tensor, block_size: int, *, bits: int) -> ScaledEncoded:
    top = 2 ** (bits - 1) - 1  # ±top levels: ±absmax are both exact
    blocks = to_blocks(x, check_block_size(block_size, even=bits == 4))
    # Multiplying by the fp32 reciprocal (not dividing) reproduces 0.2.2's stored s4 scale.
    scale = block_absmax(blocks) * (1.0 / top)
    q = (torch.round(blocks / scale[:, None]).clamp(-top - 1, top) + top + 1).to(torch.uint8)
    return ScaledEncoded(pack_nibbles(q) if bits == 4 else q, scale)


def _decode_symmetric(encoded: ScaledEncoded, shape: Shape, *, bits: int) -> Tensor:
    codes = unpack_nibbles(encoded.codes) if bits == 4 else read_bytes(encoded.codes)
    levels = codes.to(torch.float32) - float(2 ** (bits - 1))
    return from_blocks(levels * encoded.scale[:, None], shape)


def make_uniform(bits: int = 8) -> Codec:
    """Returns the ``uf8`` or ``uf4`` codec (adafactor8bit 0.4.6 momentum codes).

    Args:
        bits: 8 or 4. 4-bit codes need an even block size.

    Returns:
        A signed :class:`~afx.codecs.base.Codec` encoding to :class:`AbsmaxEncoded`.

    Raises:
        ValueError: if ``bits`` is not 8 or 4.

    References:
        Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization"; adafactor8bit
        specification §3.4 for the asymmetric clamp.

    Example:
        >>> import torch
        >>> from afx.codecs import get_codec
        >>> codec = get_codec("uf4")
        >>> enc = codec.encode(torch.tensor([-1.0, 1.0, 0.5, 0.0]), 4)
        >>> enc.codes, enc.absmax
        (tensor([[ 15, 200]], dtype=torch.uint8), tensor([1.]))
        >>> codec.decode(enc, (4,))
        tensor([-1.0000,  0.8750,  0.5000,  0.0000])
    """
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return Codec(
        f"uf{bits}",
        True,
        functools.partial(_encode_uniform, bits=bits),
        functools.partial(_decode_uniform, bits=bits),
        functools.partial(_nbytes_absmax, bits=bits),
    )


def make_symmetric(bits: int = 4) -> Codec:
    """Returns ``s4`` (adafactor8bit 0.2.2 symmetric 4-bit momentum) or ``s8``.

    Levels are ``absmax/(2^(bits−1) − 1)`` apart, so both ``+absmax`` and ``−absmax`` are exact
    (unlike ``uf8``/``uf4``, which clip the positive extreme) and re-encoding a decoded block is
    stable. ``s8`` is afx's 8-bit member of the family (not a format of the package).

    Args:
        bits: 4 or 8.

    Returns:
        A signed :class:`~afx.codecs.base.Codec` encoding to :class:`ScaledEncoded`.

    References:
        Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization"; adafactor8bit
        specification §3.2.

    Example:
        >>> import torch
        >>> from afx.codecs import get_codec
        >>> codec = get_codec("s4")
        >>> enc = codec.encode(torch.tensor([-7.0, 7.0, 3.0, 0.0]), 4)
        >>> enc.codes
        tensor([[ 31, 184]], dtype=torch.uint8)
        >>> codec.decode(enc, (4,))
        tensor([-7.,  7.,  3.,  0.])
    """
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return Codec(f"s{bits}", True, functools.partial(_encode_symmetric, bits=bits),
                 functools.partial(_decode_symmetric, bits=bits),
                 functools.partial(_nbytes_absmax, bits=bits))
