"""Unquantized storage: ``fp32`` (exact) and ``bf16`` (round to nearest even).

These are the fallbacks for states too small to be worth quantizing and for users who want a
narrower float instead of codes. The state is stored flat, without block padding: padding a short
vector to a full block is exactly the memory inflation block codes suffer from on small tensors
(spec §4.3 and §8 item 4). ``block_size`` is validated for a uniform error surface but otherwise
ignored.

``bf16`` keeps fp32's exponent range with an 8-bit significand, so its relative round-trip error is
at most 2^-8 for normal values; ``fp32`` round-trips exactly. The ``fp32`` encoding may share
storage with its input, as a functional transform's output may.

References:
    Kalamkar et al., 2019. "A Study of BFLOAT16 for Deep Learning Training": the bf16 format.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from afx.codecs.base import Codec, Shape, check_block_size

Tensor = torch.Tensor


class PlainEncoded(NamedTuple):
    """An ``fp32`` or ``bf16`` state.

    Attributes:
        value: ``(numel,)`` tensor in the storage dtype.
    """

    value: Tensor


def _encode_plain(x: Tensor, block_size: int, *, dtype: torch.dtype) -> PlainEncoded:
    check_block_size(block_size)
    return PlainEncoded(x.reshape(-1).to(dtype))


def _decode_plain(encoded: PlainEncoded, shape: Shape) -> Tensor:
    value = encoded.value
    if value.dtype == torch.bfloat16:
        # Widen through the bit pattern (bf16 is the top half of an fp32). Inductor drops a
        # fp32 -> bf16 -> fp32 cast pair when encode and decode fuse into one kernel, which would
        # skip the rounding; a bitcast cannot be elided. Multiplying by 2^16 is a shift that
        # cannot overflow int32, unlike << on negative values in some backends.
        bits = value.view(torch.int16).to(torch.int32) * 65536
        return bits.view(torch.float32).reshape(tuple(shape))
    return value.to(torch.float32).reshape(tuple(shape))


def _nbytes_plain(numel: int, block_size: int, *, itemsize: int) -> int:
    check_block_size(block_size)
    return numel * itemsize


def make_plain(dtype: torch.dtype = torch.float32) -> Codec:
    """Returns the ``fp32`` or ``bf16`` pass-through codec.

    Args:
        dtype: ``torch.float32`` or ``torch.bfloat16``.

    Returns:
        A signed :class:`~afx.codecs.base.Codec` encoding to :class:`PlainEncoded`.

    Raises:
        ValueError: for any other dtype.

    References:
        Kalamkar et al., 2019, "A Study of BFLOAT16 for Deep Learning Training".

    Example:
        >>> import torch
        >>> from afx.codecs import get_codec
        >>> codec = get_codec("bf16")
        >>> enc = codec.encode(torch.tensor([[1.0, 1.0 + 2**-9]]), 2048)
        >>> enc.value
        tensor([1., 1.], dtype=torch.bfloat16)
        >>> codec.nbytes(2, 2048)
        4
    """
    names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    if dtype not in names:
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype!r}")
    return Codec(
        names[dtype],
        True,
        functools.partial(_encode_plain, dtype=dtype),
        _decode_plain,
        functools.partial(_nbytes_plain, itemsize=torch.finfo(dtype).bits // 8),
    )
