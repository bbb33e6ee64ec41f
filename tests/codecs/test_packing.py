"""afx.codecs.packing: nibble packing and the word-wise read of 8-bit codes.

The compiled read is traced once per input shape (two shapes), however many examples
hypothesis draws.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code

from afx.codecs import get_codec
from afx.codecs.packing import pack_nibbles, read_bytes, unpack_nibbles

_BYTES = st.lists(st.integers(0, 255), min_size=96, max_size=96)


def _as_codes(values: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8).reshape(shape)


_read = torch.compile(lambda c: read_bytes(c).to(torch.int32), fullgraph=True, dynamic=False)


@settings(max_examples=30, deadline=None)
@given(_BYTES)
def test_compiled_word_read_gives_every_byte_in_order(values: list[int]) -> None:
    """Compiled for CPU, read_bytes of a (6, 16) uint8 tensor (numel a multiple of 8, so read
    through int64 words) holds exactly the codes, element by element, including bytes ≥ 128
    in the top byte of a word (a negative int64)."""
    codes = _as_codes(values, (6, 16))
    assert torch.equal(_read(codes), codes.to(torch.int32))


@settings(max_examples=10, deadline=None)
@given(_BYTES)
def test_compiled_read_of_a_shape_words_cannot_cover_is_the_codes(values: list[int]) -> None:
    """95 bytes are not a whole number of int64 words: the compiled read falls back to the
    bytes themselves and still gives the codes."""
    codes = _as_codes(values[:95], (5, 19))
    assert torch.equal(_read(codes), codes.to(torch.int32))


def test_eager_and_non_uint8_reads_return_the_tensor_itself() -> None:
    """Outside a compiled graph, and for any dtype but uint8, read_bytes changes nothing:
    eager mode keeps its one-kernel decode."""
    codes = torch.arange(16, dtype=torch.uint8)
    assert read_bytes(codes) is codes
    wide = torch.arange(16, dtype=torch.int16)
    assert torch.compile(lambda t: read_bytes(t) is t, fullgraph=True)(wide)


def test_compiled_uf8_decode_loads_no_uint8_vectors() -> None:
    """The point of the word read: Inductor's C++ for a compiled uf8 decode never assembles a
    uint8 vector through a partial load (``Vectorized<uint8_t>::loadu``), and reads the codes as
    int64 words instead; the decoded values equal eager's."""
    codec = get_codec("uf8")
    encoded = codec.encode(torch.randn(64, 256), 256)
    decode = torch.compile(lambda e: codec.decode(e, (64, 256)), fullgraph=True, dynamic=False)
    out, sources = run_and_get_code(decode, encoded)
    source = "\n".join(sources)
    assert "Vectorized<uint8_t>::loadu" not in source
    assert "const int64_t* in_ptr" in source
    assert torch.equal(out, codec.decode(encoded, (64, 256)))


def test_nibbles_round_trip_through_the_package_layout() -> None:
    """pack_nibbles puts the even element in the high nibble; unpack_nibbles inverts it."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)
    packed = pack_nibbles(codes)
    assert packed[0].item() == (0 << 4) | 1
    assert torch.equal(unpack_nibbles(packed), codes)
