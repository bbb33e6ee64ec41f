"""Fuzzing: random options x shapes x dtypes either train with finite values or fail clearly."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
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
    "apollo_rank": st.sampled_from([0, 1, 4]),
    "apollo_scale_type": st.sampled_from(["channel", "tensor"]),
    "apollo_update_proj_gap": st.sampled_from([1, 3]),
    "apollo_factorize": st.booleans(),
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


# ------------------------------------------------------------------------------- compiled --
# Compiling a new bucket costs ~10 s here, so the compiled fuzz runs few, small examples: the
# explicit ones cover every odd shape, dtype and preset, the random one varies the rest.
ODD_SHAPES = [(), (1,), (1, 7), (7, 1), (2, 1, 3, 1, 2), (0,), (3, 0)]
PRESET_NAMES = ["sgd", "adafactor", "adamw", "rmsprop", "came", "apollo"]
COMPILED_OPTIONS = {
    "stochastic_round_writeback": st.booleans(),
    "quantize": st.booleans(),
    "min_8bit_size": st.sampled_from([0, 4096]),
    "m_quant_type": st.sampled_from(["uf8", "d4", "s4", "fp32"]),
    "v_quant_type": st.sampled_from(["al8", "al16"]),
    "enable_fira_for_adafactor": st.booleans(),
    "maximize": st.booleans(),
    "weight_decay": st.sampled_from([0.0, 0.1]),
}
FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
# Parameters are compared relative to their largest magnitude after a few steps: fp32 math in
# a different order, then rounding to the parameter's dtype (one ulp, possibly a flipped code).
TOLERANCE = {FP32: 1e-5, BF16: 2.0**-7, FP16: 2.0**-10}


def odd_model(params: list[tuple[tuple, torch.dtype]], seed: int) -> torch.nn.Module:
    model = torch.nn.Module()
    gen = torch.Generator().manual_seed(seed)
    for i, (shape, dtype) in enumerate(params):
        model.register_parameter(f"p{i}", torch.nn.Parameter(
            torch.randn(shape, generator=gen).to(dtype)))
    return model


# No shrinking: each shrink attempt would compile again.
@settings(max_examples=1, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PRESET_NAMES),
       st.lists(st.tuples(st.sampled_from(ODD_SHAPES), st.sampled_from(DTYPES)), min_size=1,
                max_size=1),
       st.fixed_dictionaries({}, optional=COMPILED_OPTIONS), st.integers(0, 2**16))
@example("came", [((), BF16), ((2, 1, 3, 1, 2), FP32)],
         {"quantize": False, "stochastic_round_writeback": True}, 0)
@example("adafactor", [((1, 7), FP16), ((3, 0), BF16)],
         {"min_8bit_size": 0, "enable_fira_for_adafactor": True, "weight_decay": 0.1}, 1)
@example("adamw", [((7, 1), FP32), ((1,), FP16)], {"min_8bit_size": 0, "m_quant_type": "s4"}, 2)
@example("rmsprop", [((0,), BF16)], {"maximize": True}, 3)
@example("sgd", [((1,), BF16)], {"stochastic_round_writeback": True, "weight_decay": 0.1}, 4)
@example("apollo", [((), FP32), ((1, 7), BF16)], {"min_8bit_size": 0}, 5)
def test_compiled_matches_eager_on_odd_shapes(preset: str, params: list, options: dict,
                                              seed: int) -> None:
    """A preset (G0 groups) with drawn options on odd shapes and dtypes, compiled: the first
    step compiles, later steps (one with a zero gradient) never recompile, every parameter and
    state stays finite, and the parameters equal the eager run's (fp32: ≤ 1e-5 relative;
    bf16/fp16: within a couple of ulps of the largest magnitude)."""
    model = odd_model(params, seed)
    twin = copy.deepcopy(model)
    optimizers = []
    for m, compile in ((model, True), (twin, False)):
        groups = afx.build_param_groups(m, preset, "G0")
        optimizers.append(afx.Adafactor8Bit(groups, lr=1e-2, block_size=128, m_block_size=32,
                                            compile=compile, **options))
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(6):
        grads = [(0.0 if step == 3 else 1.0) * torch.randn(p.shape, generator=gen)
                 for p in model.parameters()]
        for m, opt in zip((model, twin), optimizers):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.to(p.dtype)
            if step == 0 or opt is optimizers[1]:
                opt.step()
            else:
                with torch.compiler.set_stance("fail_on_recompile"):
                    opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.isfinite(p).all()
        assert all(torch.isfinite(v).all() for v in optimizers[0].state[p].values()
                   if v.is_floating_point())
        if p.numel():
            scale = q.float().abs().max().clamp_min(1e-30)
            diff = ((p.float() - q.float()).abs().max() / scale).item()
            assert diff <= TOLERANCE[p.dtype], (tuple(p.shape), p.dtype, diff)


def test_sgd_preset_compiles_a_0d_parameter() -> None:
    """Found by the compiled fuzz: the sgd preset (quantize on, the default) compiles and
    updates a 0-d parameter (quantize_state used to read the layout of its 1-element vector
    form inside the graph, where the SGD route's dict state cannot be flattened)."""
    model = odd_model([((), FP32)], 0)
    opt = afx.Adafactor8Bit(afx.build_param_groups(model, "sgd", "G0"), lr=1e-2)
    model.p0.grad = torch.ones(())
    before = model.p0.detach().clone()
    opt.step()
    assert int(opt.state[model.p0]["step"]) == 1 and not torch.equal(model.p0, before)
