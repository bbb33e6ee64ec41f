"""Two 4-bit codes per byte.

The byte layout is the one the adafactor8bit package uses for its 4-bit momentum (spec §3.2 and
§3.4): along the last axis, the code of the even element goes to the high nibble and the code of
the following odd element to the low nibble. Keeping that layout means a packed state can be
compared with, or migrated from, the package byte for byte.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def pack_nibbles(codes: Tensor) -> Tensor:
    """Packs 4-bit codes, two per byte, even element in the high nibble.

    Args:
        codes: uint8 tensor of values in ``[0, 15]`` whose last dimension is even.

    Returns:
        uint8 tensor with the last dimension halved.

    Example:
        >>> import torch
        >>> from afx.codecs.packing import pack_nibbles
        >>> pack_nibbles(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8))
        tensor([[ 18, 240]], dtype=torch.uint8)
    """
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_nibbles`.

    Args:
        packed: uint8 tensor produced by :func:`pack_nibbles`.

    Returns:
        uint8 tensor of codes in ``[0, 15]`` with the last dimension doubled.

    Example:
        >>> import torch
        >>> from afx.codecs.packing import unpack_nibbles
        >>> unpack_nibbles(torch.tensor([[18, 240]], dtype=torch.uint8))
        tensor([[ 1,  2, 15,  0]], dtype=torch.uint8)
    """
    pairs = torch.stack((packed >> 4, packed & 0x0F), dim=-1)
    return pairs.flatten(-2)
