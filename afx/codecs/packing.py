"""Two 4-bit codes per byte, and reading 8-bit codes fast in compiled CPU code.

The byte layout is the one the adafactor8bit package uses for its 4-bit momentum (spec §3.2 and
§3.4): along the last axis, the code of the even element goes to the high nibble and the code of
the following odd element to the low nibble. Keeping that layout means a packed state can be
compared with, or migrated from, the package byte for byte.

The uniform and dynamic decoders (``uf``, ``s``, ``d`` codes, 8- and 4-bit) read their uint8
codes through :func:`read_bytes`, which changes how a compiled CPU loop loads them, not what they
hold. The log-space decoders do not: their decode is dominated by 2^y, and the extra operations
made Inductor store three more decoded fp32 tensors in the AdamW-like preset's graph.
"""

from __future__ import annotations

import sys

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
        integer tensor of codes in ``[0, 15]`` with the last dimension doubled (uint8, or
        int64 where :func:`read_bytes` reads words).

    Example:
        >>> import torch
        >>> from afx.codecs.packing import unpack_nibbles
        >>> unpack_nibbles(torch.tensor([[18, 240]], dtype=torch.uint8))
        tensor([[ 1,  2, 15,  0]], dtype=torch.uint8)
    """
    packed = read_bytes(packed)
    pairs = torch.stack((packed >> 4, packed & 0x0F), dim=-1)
    return pairs.flatten(-2)


def read_bytes(codes: Tensor) -> Tensor:
    """The values of a uint8 tensor, read eight at a time when compiled for CPU.

    Inductor's C++ code loads the eight uint8 values of one float32 vector through a stack
    buffer that it fills and then reloads whole, and the reload waits for the stores to retire
    (``code_read`` against ``code_read_words`` in ``benchmarks/floor.py``: the stall costs more
    than the rest of a decode). Reading the same bytes as int64 words costs one scalar load per
    vector; shifting each word by 0, 8, ..., 56 bits and masking gives the eight values in
    order (on a little-endian CPU). Elsewhere (eager mode, other devices, shapes the word view
    cannot cover) the tensor is returned as it is. The word view needs the tensor's storage
    offset to be a multiple of 8 bytes, as every state tensor afx allocates has.

    Args:
        codes: a uint8 tensor.

    Returns:
        The same values, as int64 when read through words, else ``codes`` itself.

    Example:
        >>> import torch
        >>> from afx.codecs.packing import read_bytes
        >>> read_bytes(torch.tensor([7, 255], dtype=torch.uint8))
        tensor([  7, 255], dtype=torch.uint8)
    """
    if (codes.dtype != torch.uint8 or codes.device.type != "cpu" or sys.byteorder != "little"
            or not torch.compiler.is_compiling() or codes.numel() % 8
            or not codes.is_contiguous()):
        return codes
    words = codes.reshape(-1).view(torch.int64)
    shifts = torch.arange(0, 64, 8, device=codes.device)
    return ((words[:, None] >> shifts) & 0xFF).view(codes.shape)
