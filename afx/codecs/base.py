"""The codec type and the block layout every quantized format shares.

A codec turns an fp32 state into a NamedTuple of plain tensors (codes plus per-block statistics) and
back. Every format here cuts the state the same way: flatten row-major, zero-pad the tail up to a
multiple of the block size, and view the result as ``(nblocks, block_size)``. The shapes of the
encoded tensors therefore depend only on ``(numel, block_size)``, which lets a compiled step write
them back into persistent buffers in place.

All functions here and in the format modules are pure tensor programs with static Python options, so
they trace under ``torch.compile(fullgraph=True, dynamic=False)`` without graph breaks.

References:
    Dettmers, Lewis, Shleifer and Zettlemoyer, 2022. "8-bit Optimizers via Block-wise
    Quantization" (ICLR 2022): per-block statistics bound the damage an outlier can do to a state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

Tensor = torch.Tensor
Shape = Sequence[int]


class Codec(NamedTuple):
    """A storage format for one optimizer state tensor.

    Attributes:
        name: registry name, e.g. ``"al8"``.
        signed: ``True`` if the format accepts negative values (momentum codes), ``False`` for
            formats that are only defined on non-negative states (second moments).
        encode: ``encode(x, block_size)`` maps an fp32 tensor of any shape to a NamedTuple of
            tensors whose shapes depend only on ``(x.numel(), block_size)``.
        decode: ``decode(encoded, shape)`` returns an fp32 tensor of ``shape``.
        nbytes: ``nbytes(numel, block_size)`` is the storage size of the encoded form in bytes.

    References:
        Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022: optimizer states
        stored as block-wise quantized codes.

    Example:
        >>> import torch
        >>> from afx.codecs import get_codec
        >>> codec = get_codec("uf8")
        >>> enc = codec.encode(torch.tensor([1.0, -2.0, 0.5]), 4)
        >>> codec.decode(enc, (3,))
        tensor([ 1.0000, -2.0000,  0.5000])
        >>> codec.nbytes(3, 4)
        8
    """

    name: str
    signed: bool
    encode: Callable[[Tensor, int], Any]
    decode: Callable[[Any, Shape], Tensor]
    nbytes: Callable[[int, int], int]


def check_block_size(block_size: int, *, even: bool = False) -> int:
    """Validates a block size option and returns it.

    Args:
        block_size: number of elements that share one set of statistics.
        even: require an even size (4-bit formats pack two codes per byte inside a block).

    Returns:
        ``block_size`` unchanged.

    Raises:
        ValueError: if ``block_size`` is not a positive integer (or not even when required).

    Example:
        >>> from afx.codecs.base import check_block_size
        >>> check_block_size(256, even=True)
        256
    """
    # bool is an int subclass; True as a block size is always a caller mistake.
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if even and block_size % 2:
        raise ValueError(
            f"block_size must be even for 4-bit codes (two per byte), got {block_size!r}")
    return block_size


def num_blocks(numel: int, block_size: int) -> int:
    """Number of blocks needed for ``numel`` elements (the last one zero-padded).

    Example:
        >>> from afx.codecs.base import num_blocks
        >>> num_blocks(10, 4)
        3
    """
    return -(-numel // block_size)


def blockwise_nbytes(
    numel: int, block_size: int, *, code_bits: int, stat_bytes: int, even: bool = False
) -> int:
    """Bytes of a block-wise encoding: padded codes plus per-block statistics.

    Args:
        numel: number of elements of the state.
        block_size: elements per block (validated like :func:`check_block_size`).
        code_bits: bits per code (4, 8 or 16).
        stat_bytes: bytes of statistics per block.
        even: require an even block size.

    Returns:
        ``nblocks * block_size * code_bits / 8 + nblocks * stat_bytes``.

    Example:
        >>> from afx.codecs.base import blockwise_nbytes
        >>> blockwise_nbytes(1000, 256, code_bits=4, stat_bytes=4, even=True)
        528
    """
    nblocks = num_blocks(numel, check_block_size(block_size, even=even))
    return nblocks * block_size * code_bits // 8 + nblocks * stat_bytes


def shape_numel(shape: Shape) -> int:
    """Number of elements of a tensor of ``shape`` (1 for the 0-d shape ``()``)."""
    return math.prod(shape)


def to_blocks(x: Tensor, block_size: int) -> Tensor:
    """Flattens ``x`` row-major, zero-pads it and views it as ``(nblocks, block_size)`` fp32.

    Args:
        x: tensor of any shape and floating dtype.
        block_size: validated block size.

    Returns:
        An fp32 tensor of shape ``(num_blocks(x.numel(), block_size), block_size)``.

    Example:
        >>> import torch
        >>> from afx.codecs.base import to_blocks
        >>> to_blocks(torch.arange(5.0), 2)
        tensor([[0., 1.],
                [2., 3.],
                [4., 0.]])
    """
    nblocks = num_blocks(x.numel(), block_size)
    pad = nblocks * block_size - x.numel()
    if not pad and x.dim() and x.shape[-1] % block_size == 0:
        # Blocks tile each row: split the last dimension rather than flatten (see from_blocks).
        rows = x.to(torch.float32).reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
        return rows.reshape(nblocks, block_size)
    flat = torch.nn.functional.pad(x.reshape(-1).to(torch.float32), (0, pad))
    return flat.view(nblocks, block_size)


def from_blocks(blocks: Tensor, shape: Shape) -> Tensor:
    """Inverse of :func:`to_blocks`: drops the padding and restores ``shape``.

    Example:
        >>> import torch
        >>> from afx.codecs.base import from_blocks
        >>> from_blocks(torch.arange(6.0).view(3, 2), (5,))
        tensor([0., 1., 2., 3., 4.])
    """
    numel = shape_numel(shape)
    shape = tuple(shape)
    if shape and blocks.numel() == numel and shape[-1] % blocks.shape[-1] == 0:
        # Blocks tile each row: split the last dimension instead of flattening, so the compiled
        # encode(decode(...)) indexes codes linearly and vectorises.
        block = blocks.shape[-1]
        return blocks.reshape(*shape[:-1], shape[-1] // block, block).reshape(shape)
    return blocks.reshape(-1)[:numel].reshape(tuple(shape))
