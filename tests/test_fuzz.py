"""Fuzzing: random options x shapes x dtypes either train with finite values or fail clearly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import afx

SHAPES = [(), (1,), (1, 7), (7, 1), (0,), (3, 0), (2, 1, 3, 1, 2), (1, 300), (300, 1), (64, 80)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

VALID = {
    "lr": st.sampled_from([1e-4, 1e-2, 0.0]),
    "beta1": st.sampled_from([None, 0.0, 0.9]),
    "beta2": st.sampled_from([None, 0.999]),
    "beta2_decay": st.sampled_from([None, -0.8]),
    "beta3": st.sampled_from([None, 0.9999]),
    "eps": st.sampled_from([(1e-30, 1e-3), (None, 1e-3), (1e-8, 1e-3)]),
    "weight_decay": st.sampled_from([0.0, 0.1]),
    "d": st.sampled_from([0.0, 1.0]),
    "relative_step": st.booleans(),
    "scale_parameter": st.booleans(),
    "factored": st.booleans(),
    "quantize": st.booleans(),
    "m_quant_type": st.sampled_from(["uf8", "uf4", "d8", "d4", "s4", "s8", "fp32"]),
    "v_quant_type": st.sampled_from(["al8", "al16", "fp32"]),
    "block_size": st.sampled_from([128, 256, 2048]),
    "m_block_size": st.sampled_from([32, 256]),
    "min_8bit_size": st.sampled_from([0, 16, 4096]),
    "enable_fira_for_adafactor": st.booleans(),
    "stochastic_round_writeback": st.booleans(),
    "maximize": st.booleans(),
    "bias_correction": st.sampled_from([None, True, False]),
    "momentum_only_1d": st.sampled_from([None, True, False]),
}
INVALID = {"lr": -1.0, "beta1": 1.0, "beta2": 1.5, "beta2_decay": 0.3, "eps": (-1.0, 1e-3),
           "weight_decay": -0.1, "d": -2.0, "m_quant_type": "q5", "block_size": 100,
           "m_block_size": 30}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=VALID),
       st.one_of(st.none(), st.sampled_from(sorted(INVALID))), st.sampled_from(DTYPES),
       st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4), st.integers(0, 2**16))
def test_train_finitely_or_refuse_clearly(options: dict, bad: str | None, dtype: torch.dtype,
                                          shapes: list, seed: int) -> None:
    """Construction either raises a ValueError/NotImplementedError naming one of the options
    passed (always, when an invalid value was injected), or 20 steps (one with a zero gradient)
    keep every parameter and state finite."""
    if bad is not None:
        options = {**options, bad: INVALID[bad]}
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    try:
        opt = afx.Adafactor8Bit(params, compile=False, **options)
    except (ValueError, NotImplementedError) as error:
        assert any(name in str(error) for name in options), str(error)
        return
    assert bad is None or (bad == "block_size" and not options.get("quantize", True)), bad
    for step in range(20):
        for p in params:
            scale = 0.0 if step == 3 else 1.0
            p.grad = (scale * torch.randn(p.shape, generator=gen)).to(dtype)
        opt.step()
    for p in params:
        assert torch.isfinite(p).all()
        for key, value in opt.state[p].items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("shape", SHAPES)
def test_adafactor_on_odd_shapes_stays_finite(shape: tuple) -> None:
    """transformers-compatible Adafactor handles 0-d, empty, 1xN, Nx1 and 5-D parameters."""
    p = torch.nn.Parameter(torch.randn(shape))
    opt = afx.Adafactor([p], beta1=0.9, weight_decay=0.01, compile=False)
    for _ in range(20):
        p.grad = torch.randn(shape)
        opt.step()
    assert torch.isfinite(p).all()
    assert all(torch.isfinite(v).all() for v in opt.state[p].values())
