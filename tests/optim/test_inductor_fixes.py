"""afx/optim/inductor_fixes.py: the guard around Inductor's CPU loop split."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.codegen.cpp import CppScheduling
from torch._inductor.utils import fresh_cache

import afx
from afx.optim import inductor_fixes
from afx.optim.presets import PRESETS


def _dequantized_tail(out: torch.Tensor, p: torch.Tensor, codes: torch.Tensor,
                      scale: torch.Tensor) -> torch.Tensor:
    """A flat update reading block-scaled codes whose last block of 32 is padded, written into
    ``out``: the one division in the loop is ``x // 32`` over 48 elements, which 32 does not
    divide."""
    return out.copy_(p - (codes.float() * scale[:, None]).view(-1)[:48])


def _inputs() -> tuple[torch.Tensor, ...]:
    """A NaN-filled output (an element left unwritten stays NaN) and the update's inputs."""
    gen = torch.Generator().manual_seed(0)
    return (torch.full((48,), float("nan")), torch.randn(48, generator=gen),
            torch.randint(0, 255, (2, 32), dtype=torch.uint8, generator=gen),
            torch.rand(2, generator=gen))


def _compiled(fn) -> torch.Tensor:
    torch._dynamo.reset()
    with fresh_cache():  # a cached kernel would bypass the scheduler under test
        return torch.compile(fn, fullgraph=True, dynamic=False)(*_inputs())


def test_install_is_idempotent_and_tags_the_cache_key_once() -> None:
    """Installing twice wraps the split once and adds afx's tag to the cache key once, so
    Inductor cache entries written without the guard are not reused."""
    assert inductor_fixes.install() and inductor_fixes.install()
    wrapped = CppScheduling.try_loop_split
    assert not getattr(wrapped.__wrapped__, "__afx_loop_split_guard__", False)
    assert torch.compiler.config.cache_key_tag.count(inductor_fixes.CACHE_TAG) == 1


def test_guarded_split_computes_every_element() -> None:
    """With the guard, the compiled flat update writes all 48 elements, bitwise as eager."""
    inductor_fixes.install()
    assert torch.equal(_compiled(_dequantized_tail), _dequantized_tail(*_inputs()))


def test_stock_split_drops_the_tail(monkeypatch) -> None:
    """Why the guard exists: this torch's own loop split runs the loop over 48 // 32 blocks
    of 32 and never writes elements 32..47. If this fails, the torch in use splits correctly
    and the guard only costs a check."""
    inductor_fixes.install()
    monkeypatch.setattr(CppScheduling, "try_loop_split", CppScheduling.try_loop_split.__wrapped__)
    unwritten = _compiled(_dequantized_tail).isnan().nonzero().flatten()
    assert unwritten.tolist() == list(range(32, 48))


@pytest.mark.parametrize("preset", [dict(beta1=0.9), dict(PRESETS["adamw"].primary)],
                         ids=["beta1", "adamw"])
def test_vector_with_a_padded_momentum_block_trains_every_element(preset: dict) -> None:
    """A 1-D parameter of 5000 elements (momentum blocks of 256, the last one padded) steps
    compiled as it does eager: unguarded, Inductor left its last 136 elements untouched
    under beta1=0.9."""
    results = []
    for compile in (False, True):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5000, generator=gen))
        opt = afx.Adafactor8Bit([p], compile=compile, **{**preset, "lr": 1e-3})
        for _ in range(3):
            p.grad = torch.randn(5000, generator=gen)
            opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-6)
