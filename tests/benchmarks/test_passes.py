"""benchmarks/afxbench/passes.py: counting passes over memory in Inductor's C++ output."""

# ruff: noqa: E501  (the kernels below keep Inductor's own long lines)

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from afxbench.passes import analyse


def _module(kernel: str, wrapper: str = "") -> str:
    """An Inductor-shaped output module holding one kernel."""
    return ("cpp_fused_0 = async_compile.cpp_pybinding(['const float*'], r'''\n"
            f"{kernel}\n''')\n{wrapper}")


_TWO_D = '''extern "C"  void  kernel(const float* in_ptr0,
                       const uint8_t* in_ptr1,
                       const float* in_ptr2,
                       const float* in_ptr3,
                       const float* in_ptr4,
                       float* in_out_ptr0,
                       float* out_ptr0)
{
    {
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(64L); x0+=static_cast<int64_t>(1L))
        {
            for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(512L); x1+=static_cast<int64_t>(8L))
            {
                auto tmp0 = at::vec::Vectorized<float>::loadu(in_ptr0 + static_cast<int64_t>(x1 + 512L*x0), static_cast<int64_t>(8));
                auto tmp1 = at::vec::Vectorized<uint8_t>::loadu(in_ptr1 + static_cast<int64_t>(x1 + 512L*x0), static_cast<int64_t>(8));
                auto tmp2 = in_ptr2[static_cast<int64_t>(x0)];
                auto tmp3 = at::vec::Vectorized<float>::loadu(in_ptr3 + static_cast<int64_t>(x1), static_cast<int64_t>(8));
                auto tmp4 = in_ptr4[static_cast<int64_t>(2L*x0 + (c10::div_floor_integer(static_cast<int64_t>(x1), static_cast<int64_t>(256L))))];
                auto tmp5 = at::vec::Vectorized<float>::loadu(in_out_ptr0 + static_cast<int64_t>(x1 + 512L*x0), static_cast<int64_t>(8));
                tmp5.store(in_out_ptr0 + static_cast<int64_t>(x1 + 512L*x0));
            }
        }
    }
    {
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(64L); x0+=static_cast<int64_t>(8L))
        {
            auto tmp0 = at::vec::Vectorized<float>::loadu(in_ptr2 + static_cast<int64_t>(x0), static_cast<int64_t>(8));
            tmp0.store(out_ptr0 + static_cast<int64_t>(x0));
        }
    }
}'''


def test_full_size_accesses_are_counted_and_broadcasts_are_not():
    # Of the 2-D nest's seven accesses, only the fp32 gradient, the uint8 codes and the
    # in-place buffer (read and written) follow both loop variables outside a division; the
    # row factor, column factor and per-block scale are broadcasts. The 64-iteration nest
    # covers less than the parameter, so it is not a pass.
    found = analyse(_module(_TWO_D), numel=64 * 512)
    assert len(found.passes) == 1
    (only,) = found.passes
    assert (only.extent, only.reads, only.writes, only.code_loads) == (64 * 512, 4 + 1 + 4, 4, 1)
    assert found.bytes_per_element == 13 and found.code_loads == 1


def test_full_size_allocations_are_temporaries():
    # A buffer of at least numel elements counts at its dtype's size; smaller ones do not.
    wrapper = ("buf0 = empty_strided_cpu((64, 512), (512, 1), torch.float32)\n"
               "buf1 = empty_strided_cpu((64, ), (1, ), torch.float32)\n"
               "buf2 = empty_strided_cpu((128, 256), (256, 1), torch.uint8)\n")
    found = analyse(_module(_TWO_D, wrapper), numel=64 * 512)
    assert found.temporaries_bytes == 64 * 512 * 4 + 128 * 256


def test_a_compiled_update_is_read_as_one_pass():
    # Real Inductor output: p += 2·g on a 64×64 parameter is one loop reading p and g and
    # writing p (12 bytes per element), with no temporaries.
    from torch._inductor.utils import fresh_cache, run_and_get_code

    p, g = torch.zeros(64, 64), torch.ones(64, 64)
    with fresh_cache():
        _, sources = run_and_get_code(torch.compile(lambda p, g: p.add_(g * 2.0)), p, g)
    found = analyse(sources[0], p.numel())
    assert [(q.reads, q.writes, q.code_loads) for q in found.passes] == [(8, 4, 0)]
    assert found.temporaries_bytes == 0
    assert torch.equal(p, torch.full((64, 64), 2.0))


@pytest.mark.parametrize("words", [True, False])
def test_codes_read_as_words_or_bytes_count_one_byte_per_element(words):
    # Real Inductor output: the sum of 8-bit codes read through int64 words (read_words)
    # indexes each word by x // 8, which is eight codes; read as uint8 vectors, each code is
    # its own byte. Either way one byte per element and one 8-bit load; the float32 row factor
    # indexed by the row only stays a broadcast.
    from torch._inductor.utils import fresh_cache, run_and_get_code

    from afx.codecs.packing import read_words

    codes = torch.randint(0, 256, (64, 512), dtype=torch.uint8)
    rows, out = torch.rand(64, 1), torch.zeros(())
    read = read_words if words else (lambda c: c)

    def total(c, r, out):
        return out.copy_((read(c).float() * r).sum())

    with fresh_cache():
        _, sources = run_and_get_code(torch.compile(total), codes, rows, out)
    assert ("const int64_t* in_ptr" in sources[0]) is words
    found = analyse(sources[0], codes.numel())
    assert [(q.reads, q.writes, q.code_loads) for q in found.passes] == [(1, 0, 1)]
    assert torch.allclose(out, (codes.float() * rows).sum())


def test_a_column_factor_read_block_by_block_is_a_broadcast():
    # Real Inductor output: block sums of x·c over blocks of 32 of a 16×96 matrix (the layout
    # of afx.numerics.row_blocks) index c by x1 + 32·(x0 % 3), which takes 96 values: only x
    # is full-size, 4 bytes per element.
    from torch._inductor.utils import fresh_cache, run_and_get_code

    from afx.numerics import row_blocks

    x, c = torch.randn(16, 96), torch.rand(1, 96)
    with fresh_cache():
        _, sources = run_and_get_code(
            torch.compile(lambda x, c: row_blocks(x * c, 32).sum(-1)), x, c)
    assert "% static_cast<int64_t>(3L)" in sources[0]
    found = analyse(sources[0], x.numel())
    assert [(q.reads, q.writes, q.code_loads) for q in found.passes] == [(4, 0, 0)]
