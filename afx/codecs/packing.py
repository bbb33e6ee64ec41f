"""Two 4-bit codes per byte, and reading 8-bit codes fast in compiled CPU code.

The byte layout is the one the adafactor8bit package uses for its 4-bit momentum (spec §3.2 and
§3.4): along the last axis, the code of the even element goes to the high nibble and the code of
the following odd element to the low nibble. Keeping that layout means a packed state can be
compared with, or migrated from, the package byte for byte.

The uniform and dynamic decoders (``uf``, ``s``, ``d`` codes, 8- and 4-bit) read their uint8
codes through :func:`read_bytes`, which changes how a compiled CPU loop loads them (where
Inductor vectorises with AVX2), not what they hold. The log-space decoders do not: their decode
is dominated by 2^y, and the extra operations made Inductor store three more decoded fp32
tensors in the AdamW-like preset's graph.
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


@torch.compiler.assume_constant_result
def words_are_faster() -> bool:
    """Whether Inductor's C++ code for this CPU loads uint8 vectors slower than int64 words.

    It does where Inductor vectorises with AVX2, which has no byte-masked load: the uint8 values
    of one float32 vector (8 bytes of a 32-byte register) go through a stack buffer that is
    filled and then reloaded whole, and the reload waits for the stores to retire. With AVX-512
    the same partial load is one masked instruction, and reading words is the slow way (a
    16-lane vector spans two words and is filled lane by lane, see :func:`read_words`).
    ``benchmarks/floor.py``'s ``code_read`` and ``code_read_words`` measure both. On one Intel
    Xeon, one thread, 50257×768 codes, in ns per code (a /tmp script calling
    ``afxbench.primitives`` with Inductor's ``cpp.simdlen`` set to 256, then 512): AVX2 1.18
    plain against 0.61 through words, AVX-512 0.18 against 1.13. Other vector ISAs (NEON, SVE,
    VSX) are not measured and read plain bytes.

    Traced as a constant (``torch.compiler.assume_constant_result``): Inductor's choice of ISA
    is fixed for the process, and it is part of the key of afx's cache of compiled buckets.

    Returns:
        ``True`` when Inductor's vector ISA is AVX2.

    Example:
        >>> from afx.codecs.packing import words_are_faster
        >>> isinstance(words_are_faster(), bool)
        True
    """
    from torch._inductor.cpu_vec_isa import VecAVX2, pick_vec_isa

    return isinstance(pick_vec_isa(), VecAVX2)


def read_words(codes: Tensor) -> Tensor:
    """The values of a contiguous uint8 tensor, read through its bytes as int64 words.

    Each word holds eight values; shifting it by 0, 8, ..., 56 bits and masking gives them in
    order on a little-endian CPU. Compiled with 8-lane float32 vectors (AVX2), the word index is
    the same across a vector, so a vector costs one scalar load; a 16-lane vector (AVX-512)
    spans two words, and Inductor's C++ fills it lane by lane.

    Args:
        codes: a contiguous uint8 tensor whose number of elements is a multiple of 8 and whose
            storage offset is a multiple of 8 bytes (as for every state tensor afx allocates).

    Returns:
        int64 tensor of ``codes``'s shape and values.

    Example:
        >>> import torch
        >>> from afx.codecs.packing import read_words
        >>> read_words(torch.tensor([1, 2, 3, 4, 5, 6, 7, 255], dtype=torch.uint8))
        tensor([  1,   2,   3,   4,   5,   6,   7, 255])
    """
    words = codes.reshape(-1).view(torch.int64)
    shifts = torch.arange(0, 64, 8, device=codes.device)
    return ((words[:, None] >> shifts) & 0xFF).view(codes.shape)


def read_bytes(codes: Tensor) -> Tensor:
    """The values of a uint8 tensor, read the faster way for compiled code on this CPU.

    Compiled for a CPU where Inductor vectorises with AVX2 (:func:`words_are_faster`), the
    bytes are read as int64 words (:func:`read_words`). Everywhere else (eager mode, other
    devices and vector ISAs, little-endian words unavailable, shapes the word view cannot
    cover) the tensor is returned as it is.

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
            or not codes.is_contiguous() or not words_are_faster()):
        return codes
    return read_words(codes)
