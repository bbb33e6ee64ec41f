"""Logarithmic codes for non-negative states (second moments, CAME confidences).

Three formats, each bit-compatible with the CPU path of the adafactor8bit package:

* ``log8`` (package 0.2.2, spec §3.1): 256 levels evenly spaced in log2 between the fixed bottom
  2^-126 and the block maximum. One fp32 statistic per block, ``scale`` = log2(block max) + 126.
  Zero is not representable: it decodes as 2^-126. The relative error grows with the distance
  between the block maximum and 2^-126, not with the spread of the block itself.
* ``al8`` / ``al16`` (package 0.4.6, spec §3.3): code 0 is an exact zero, and the remaining
  ``L - 1`` codes (L = 256 or 65536) are evenly spaced in log2 over the block's own non-zero range
  ``[min_log, min_log + scale]``. ``min_log`` is floored at ``floor_log2`` (values below the floor
  decode as 2^min_log). A block holding a single distinct non-zero value gets a one-octave range
  ending at that value.

Relative round-trip error of a non-zero value inside the range (before fp32 rounding of the
logarithms) is at most 2^(S / (2·(L - 2))) - 1 for the adaptive codes and 2^(S / 510) - 1 for
``log8``, where S is the block's ``scale``: half of one level spacing in log2, exponentiated.

``al16`` codes are stored as int16 whose bits are the uint16 code (code 40000 is stored as -25536),
like the package. torch's uint16 has only a few kernels (in torch 2.13 on CPU, ``add``, ``clamp``
and ``max`` raise NotImplementedError for it), while int16 works with every op, backend and
checkpoint path, and keeps the codes interchangeable with the package's ``*_q`` tensors.

Values within about 2.6e-6 (relative) of the largest fp32 number have a log2 that rounds to 128,
so a block maximum that large decodes to inf, as in the package. Optimizer states never get there.

References:
    Shazeer and Stern, 2018. "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost"
    (ICML 2018): the second-moment statistics these codes store.
    Dettmers, Lewis, Shleifer and Zettlemoyer, 2022. "8-bit Optimizers via Block-wise
    Quantization" (ICLR 2022): block-wise statistics.
    adafactor8bit specification, §3.1 (log8) and §3.3 (AL8/AL16), used as the behaviour reference
    for codes and statistics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from afx.codecs.base import Codec, Shape, blockwise_nbytes, check_block_size, from_blocks, to_blocks

Tensor = torch.Tensor

# log2 of the smallest normal fp32 number; log8 measures every block from this fixed bottom.
_LOG8_BOTTOM = -126.0
# log8 reads zeros and subnormals as the smallest normal number.
_LOG8_TINY = 2.0**-126
# The adaptive codes take log2 of zeros (and subnormals) at this subnormal value. Zeros are
# excluded from the block minimum but not from the block maximum, so the constant decides the
# statistics of an all-zero block; it is the package's, to keep those statistics identical.
_AL_TINY = 1e-38
# Lower clamp of the log2 span, so a degenerate block never divides by zero.
_MIN_SPAN = 1e-12


class Log8Encoded(NamedTuple):
    """A ``log8`` state.

    Attributes:
        codes: uint8, ``(nblocks, block_size)``.
        scale: fp32, ``(nblocks,)``: log2(block max) + 126, at least 1e-12.
    """

    codes: Tensor
    scale: Tensor


class AdaptiveLogEncoded(NamedTuple):
    """An ``al8`` or ``al16`` state.

    Attributes:
        codes: ``(nblocks, block_size)``, uint8 for ``al8``; int16 holding uint16 bits for ``al16``.
        scale: fp32, ``(nblocks,)``: log2 span of the block's non-zero range, at least 1e-12.
        min_log: fp32, ``(nblocks,)``: log2 of the value code 1 decodes to.

    References:
        Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022 (per-block
        statistics); the log-space code is adafactor8bit 0.4.6's, the behaviour reference.

    Example:
        >>> import torch
        >>> from afx.codecs import get_codec
        >>> enc = get_codec("al8").encode(torch.tensor([0.0, 0.25, 4.0]), 4)
        >>> enc.scale, enc.min_log
        (tensor([4.]), tensor([-2.]))
        >>> get_codec("al8").decode(enc, (3,))
        tensor([0.0000, 0.2500, 4.0000])
    """

    codes: Tensor
    scale: Tensor
    min_log: Tensor


def _block_log2(blocks: Tensor, extreme: Callable[..., Tensor]) -> Tensor:
    """``extreme(log2(blocks), dim=1)``: each block's largest or smallest logarithm.

    Eager, it is computed as written, bitwise like the package (whose statistics and codes
    come from one log2 kernel). Compiled, it is the log2 of each block's extreme value: the
    same number wherever one log2 kernel evaluates both, since float32 log2 is monotone (eager
    and compiled, torch 2.13: checked once on every positive finite float; the tests check
    2.1M neighbouring pairs), and at most the last-bit difference between two kernels. Then
    log2 has a single reader, the codes, and Inductor computes it inside the encoding loop.
    Read by the statistics as well, it would be stored: a float32 copy of the whole state,
    147 MiB for GPT-2's embedding in the AdamW-like preset.
    """
    if torch.compiler.is_compiling():
        return torch.log2(extreme(blocks, dim=1))
    return extreme(torch.log2(blocks), dim=1)


def _encode_log8(x: Tensor, block_size: int) -> Log8Encoded:
    blocks = to_blocks(x, check_block_size(block_size)).clamp(min=_LOG8_TINY)
    log_x = torch.log2(blocks)
    scale = (_block_log2(blocks, torch.amax) - _LOG8_BOTTOM).clamp(min=_MIN_SPAN)
    q = torch.round((log_x - _LOG8_BOTTOM) / scale[:, None] * 255.0).clamp(0, 255)
    return Log8Encoded(q.to(torch.uint8), scale)


def _decode_log8(encoded: Log8Encoded, shape: Shape) -> Tensor:
    # Multiplying by the fp32 reciprocal of 255 (not dividing) reproduces the package's decoder
    # bit for bit.
    log_x = encoded.codes.to(torch.float32) * encoded.scale[:, None] * (1.0 / 255.0)
    # pow(2, .) rather than exp2 for the same reason: the two CPU kernels differ in the last bit.
    return from_blocks(torch.pow(2.0, log_x + _LOG8_BOTTOM), shape)


def _nbytes_log8(numel: int, block_size: int) -> int:
    return blockwise_nbytes(numel, block_size, code_bits=8, stat_bytes=4)


def _encode_adaptive(
    x: Tensor, block_size: int, *, levels: int, floor_log2: float
) -> AdaptiveLogEncoded:
    blocks = to_blocks(x, check_block_size(block_size))
    is_zero = blocks == 0
    clamped = blocks.clamp(min=_AL_TINY)
    log_x = torch.log2(clamped)
    hi = _block_log2(clamped, torch.amax)
    lo = _block_log2(clamped.masked_fill(is_zero, math.inf), torch.amin).clamp(min=floor_log2)
    # One distinct value (or nothing above the floor): give the block a one-octave range below
    # its maximum so the span stays positive and the maximum keeps the top code.
    lo = torch.where(lo >= hi, hi - 1.0, lo)
    scale = (hi - lo).clamp(min=_MIN_SPAN)
    steps = float(levels - 2)
    q = torch.round((log_x - lo[:, None]) / scale[:, None] * steps) + 1.0
    q = q.clamp(1, levels - 1).masked_fill(is_zero, 0)
    if levels == 256:
        codes = q.to(torch.uint8)
    else:
        # float -> int16 is undefined above 32767; going through int32 makes the wrap explicit.
        codes = q.to(torch.int32).to(torch.int16)
    return AdaptiveLogEncoded(codes, scale, lo)


def _decode_adaptive(encoded: AdaptiveLogEncoded, shape: Shape, *, levels: int) -> Tensor:
    q = encoded.codes.to(torch.int32)
    if levels != 256:
        q = q & 0xFFFF  # int16 storage holds uint16 codes
    log_x = ((q.to(torch.float32) - 1.0) * encoded.scale[:, None] / float(levels - 2)
             + encoded.min_log[:, None])
    # pow(2, .) matches the package's CPU decoder bit for bit in eager mode.
    x = torch.pow(2.0, log_x).masked_fill(q == 0, 0.0)
    return from_blocks(x, shape)


def _nbytes_adaptive(numel: int, block_size: int, *, levels: int) -> int:
    # Two fp32 statistics per block: scale and min_log.
    return blockwise_nbytes(numel, block_size, code_bits=8 if levels == 256 else 16, stat_bytes=8)


def make_log8() -> Codec:
    """Returns the ``log8`` codec (adafactor8bit 0.2.2 second-moment format).

    Returns:
        An unsigned :class:`~afx.codecs.base.Codec` encoding to :class:`Log8Encoded`.

    References:
        adafactor8bit specification §3.1; the decoder maps zero to 2^-126 by design of the format.

    Example:
        >>> import torch
        >>> from afx.codecs import get_codec
        >>> codec = get_codec("log8")
        >>> enc = codec.encode(torch.tensor([4.0, 0.25, 0.0]), 4)
        >>> enc.scale
        tensor([128.])
        >>> codec.decode(enc, (3,))
        tensor([4.0000e+00, 2.4730e-01, 1.1755e-38])
    """
    return Codec("log8", False, _encode_log8, _decode_log8, _nbytes_log8)


def make_adaptive_log(bits: int = 8, *, floor_log2: float = -126.0) -> Codec:
    """Returns the ``al8`` or ``al16`` codec (adafactor8bit 0.4.6 adaptive log space).

    Args:
        bits: 8 (``al8``, uint8 codes) or 16 (``al16``, int16 storage of uint16 codes).
        floor_log2: lowest log2 value the per-block range may start at. -126 reproduces the
            package's CPU path; the package's CUDA path floors second moments at
            log2(max(eps1², 2^-126)), which this option can reproduce.

    Returns:
        An unsigned :class:`~afx.codecs.base.Codec` encoding to :class:`AdaptiveLogEncoded`.

    Raises:
        ValueError: if ``bits`` is not 8 or 16, or ``floor_log2`` is not a finite Python number.

    References:
        adafactor8bit specification §3.3 for the code layout and the degenerate-block rule.

    Example:
        >>> import torch
        >>> from afx.codecs import get_codec
        >>> codec = get_codec("al8")
        >>> enc = codec.encode(torch.tensor([0.0, 0.5, 2.0, 8.0]), 4)
        >>> enc.codes
        tensor([[  0,   1, 128, 255]], dtype=torch.uint8)
        >>> codec.decode(enc, (4,))
        tensor([0.0000, 0.5000, 2.0000, 8.0000])
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits!r}")
    if (isinstance(floor_log2, bool) or not isinstance(floor_log2, (int, float))
            or not math.isfinite(floor_log2)):
        raise ValueError(f"floor_log2 must be a finite Python number, got {floor_log2!r}")
    levels = 1 << bits
    floor = float(floor_log2)
    return Codec(
        f"al{bits}",
        False,
        functools.partial(_encode_adaptive, levels=levels, floor_log2=floor),
        functools.partial(_decode_adaptive, levels=levels),
        functools.partial(_nbytes_adaptive, levels=levels),
    )
