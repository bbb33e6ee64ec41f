"""benchmarks/run.py: what the report says about the machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from torch._inductor.cpu_vec_isa import VecAVX2, VecAVX512, pick_vec_isa

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from run import _simd, simd_from_flags


@pytest.mark.parametrize(("flags", "expected"), [
    ("fpu sse2 avx avx2 fma avx512f avx512bw", "AVX-512"),
    ("avx512f avx2", "AVX-512"),
    ("avx512bw avx2", "AVX2"),
    ("fpu sse2 avx avx2 fma", "AVX2"),
    ("fp asimd evtstrm aes sve", "SVE"),
    ("fp asimd evtstrm aes", "NEON"),
    ("fpu sse2 avx", None),
    ("", None),
])
def test_the_widest_vector_extension_is_reported(flags: str, expected: str | None) -> None:
    """The report names the widest extension among the CPU's flags, in any order; a flag that
    merely starts like one (``avx512bw`` without ``avx512f``) does not count."""
    assert simd_from_flags(flags) == expected


def test_the_reported_extension_is_the_one_inductor_compiles_for() -> None:
    """On this machine, the flags the report reads agree with Inductor's own choice of vector
    ISA, which is what decides how afx reads 8-bit codes."""
    isa = pick_vec_isa()
    if isinstance(isa, VecAVX512):
        assert _simd() == "AVX-512"
    elif isinstance(isa, VecAVX2):
        assert _simd() == "AVX2"
    else:
        pytest.skip(f"Inductor vectorises with {isa!s} here")
