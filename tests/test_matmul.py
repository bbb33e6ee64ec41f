"""afx.matmul: compiled float32 CPU products go to oneDNN (``afx::cpu_mm``) and equal ``a @ b``
to float32 rounding; eager products are ``a @ b`` itself."""

from __future__ import annotations

import pytest
import torch
from afx_testing import compiled_sources
from hypothesis import given, settings
from hypothesis import strategies as st

import afx.matmul
from afx.matmul import cpu_mm, matmul

needs_onednn = pytest.mark.skipif(afx.matmul._LINEAR is None,
                                  reason="this torch build has no oneDNN")


def _close(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    expected = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert bool(((out.double() - expected).abs() <= 1e-6 * scale + 1e-30).all())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 40), st.integers(1, 40), st.integers(0, 40), st.booleans(), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_cpu_mm_is_the_product(m: int, k: int, n: int, a_t: bool, b_t: bool, seed: int) -> None:
    """For any shapes (empty ones included) and either layout of each operand, cpu_mm(a, b)
    is a @ b to float32 rounding: each entry within 1e-6 of Σ|a||b| of the exact product."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k, m, generator=gen).t() if a_t else torch.randn(m, k, generator=gen)
    b = torch.randn(n, k, generator=gen).t() if b_t else torch.randn(k, n, generator=gen)
    _close(cpu_mm(a, b), a, b)


def test_eager_matmul_is_the_operator_bit_for_bit() -> None:
    """Outside a compiled graph matmul is a @ b exactly: eager afx keeps the numbers of the
    implementations it is compared with."""
    a, b = torch.randn(33, 70), torch.randn(70, 9)
    assert torch.equal(matmul(a, b), a @ b)


@needs_onednn
def test_compiled_float32_product_calls_onednn() -> None:
    """Compiled, a float32 CPU product becomes a call of afx::cpu_mm (the generated code names
    it) and still equals a @ b to float32 rounding, whichever operand is a transposed view."""
    a, b = torch.randn(48, 40), torch.randn(24, 40).t()
    f = torch.compile(lambda x, y: matmul(x * 2.0, y), fullgraph=True, dynamic=False)
    (source,) = compiled_sources(f, a, b)
    assert "torch.ops.afx.cpu_mm" in source
    _close(f(a, b), a * 2.0, b)


def test_compiled_float64_product_stays_with_the_operator() -> None:
    """Only float32 goes to oneDNN; a float64 product compiles to Inductor's own mm."""
    a, b = torch.randn(8, 5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    f = torch.compile(matmul, fullgraph=True, dynamic=False)
    (source,) = compiled_sources(f, a, b)
    assert "cpu_mm" not in source
    torch.testing.assert_close(f(a, b), a @ b)


def test_without_onednn_cpu_mm_is_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch build without oneDNN computes cpu_mm with a @ b (exactly)."""
    monkeypatch.setattr(afx.matmul, "_LINEAR", None)
    a, b = torch.randn(6, 4), torch.randn(4, 5)
    assert torch.equal(cpu_mm(a, b), a @ b)
