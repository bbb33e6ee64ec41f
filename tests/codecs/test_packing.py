"""afx.codecs.packing: nibble packing and the word-wise read of 8-bit codes.

The compiled reads are traced once per input shape, however many examples hypothesis draws.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor import config as inductor_config
from torch._inductor.cpu_vec_isa import VecAVX2, VecAVX512, valid_vec_isa_list
from torch._inductor.utils import run_and_get_code

from afx.codecs import get_codec, packing
from afx.codecs.packing import (
    pack_nibbles,
    read_bytes,
    read_words,
    unpack_nibbles,
    words_are_faster,
)

_BYTES = st.lists(st.integers(0, 255), min_size=96, max_size=96)


def _as_codes(values: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8).reshape(shape)


_read = torch.compile(lambda c: read_bytes(c).to(torch.int32), fullgraph=True, dynamic=False)
_read_words = torch.compile(lambda c: read_words(c).to(torch.int32), fullgraph=True,
                            dynamic=False)


def _isa_available(isa: type) -> bool:
    return any(isinstance(v, isa) for v in valid_vec_isa_list())


def _words(value: bool):
    """Patches read_bytes's choice, as traced: the word read or the plain one on any CPU."""
    return mock.patch.object(packing, "words_are_faster",
                             torch.compiler.assume_constant_result(lambda: value))


@settings(max_examples=30, deadline=None)
@given(_BYTES)
def test_compiled_word_read_gives_every_byte_in_order(values: list[int]) -> None:
    """Compiled for CPU, read_words of a (6, 16) uint8 tensor holds exactly the codes, element
    by element, including bytes ≥ 128 in the top byte of a word (a negative int64)."""
    codes = _as_codes(values, (6, 16))
    assert torch.equal(_read_words(codes), codes.to(torch.int32))


@settings(max_examples=10, deadline=None)
@given(_BYTES)
def test_compiled_read_of_a_shape_words_cannot_cover_is_the_codes(values: list[int]) -> None:
    """95 bytes are not a whole number of int64 words: the compiled read falls back to the
    bytes themselves and still gives the codes, whichever read this CPU prefers."""
    codes = _as_codes(values[:95], (5, 19))
    assert torch.equal(_read(codes), codes.to(torch.int32))


def test_eager_and_non_uint8_reads_return_the_tensor_itself() -> None:
    """Outside a compiled graph, and for any dtype but uint8, read_bytes changes nothing:
    eager mode keeps its one-kernel decode."""
    codes = torch.arange(16, dtype=torch.uint8)
    assert read_bytes(codes) is codes
    wide = torch.arange(16, dtype=torch.int16)
    assert torch.compile(lambda t: read_bytes(t) is t, fullgraph=True)(wide)


@pytest.mark.parametrize(("simdlen", "isa", "expected"), [(256, VecAVX2, True),
                                                          (512, VecAVX512, False)])
def test_words_are_read_only_where_inductor_vectorises_with_avx2(simdlen, isa, expected) -> None:
    """The word read is chosen by the vector ISA Inductor compiles for: AVX2 (no byte-masked
    load) reads words, AVX-512 plain bytes, and so does a build without vectorisation."""
    if not _isa_available(isa):
        pytest.skip(f"this CPU has no {isa.__name__[3:]}")
    with inductor_config.patch({"cpp.simdlen": simdlen}):
        assert words_are_faster() is expected
    with inductor_config.patch({"cpp.simdlen": 1}):
        assert words_are_faster() is False


@pytest.mark.parametrize("words", [True, False])
def test_compiled_uf8_decode_loads_codes_the_chosen_way(words: bool) -> None:
    """Where words are faster, Inductor's C++ for a compiled uf8 decode reads the codes as int64
    words and never assembles a uint8 vector (``Vectorized<uint8_t>::loadu``); elsewhere it
    loads the uint8 vectors directly. Either way the decoded values equal eager's."""
    codec = get_codec("uf8")
    encoded = codec.encode(torch.randn(64, 256), 256)
    decode = torch.compile(lambda e: codec.decode(e, (64, 256)), fullgraph=True, dynamic=False)
    with _words(words):
        out, sources = run_and_get_code(decode, encoded)
    source = "\n".join(sources)
    assert ("Vectorized<uint8_t>::loadu" in source) is not words
    assert ("const int64_t* in_ptr" in source) is words
    assert torch.equal(out, codec.decode(encoded, (64, 256)))


def test_nibbles_round_trip_through_the_package_layout() -> None:
    """pack_nibbles puts the even element in the high nibble; unpack_nibbles inverts it."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(2)
    packed = pack_nibbles(codes)
    assert packed[0].item() == (0 << 4) | 1
    assert torch.equal(unpack_nibbles(packed), codes)
