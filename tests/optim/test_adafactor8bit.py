"""afx.Adafactor8Bit vs adafactor8bit 0.4.6 (use_cuda_kernel=False): numbers, memory, errors."""

from __future__ import annotations

import copy
import math
import numbers
import os
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from adafactor8bit import Adafactor8Bit as Package
from afx_testing import step_buffer_sizes

import afx
from afx.optim import StepLayout

ADAMW = dict(factored=False, beta1=0.9, beta2=0.999, beta2_decay=None, relative_step=False,
             lr=1e-3, d=0.0, scale_parameter=False, scale_weight_decay=False, weight_decay=0.01,
             eps=(1e-8, 1e-3))
CONFIGS = {
    "default": {},
    "fira": dict(enable_fira_for_adafactor=True, fira_margin=0.05),
    "came": dict(beta1=0.9, beta2=0.999, beta2_decay=None, beta3=0.9999, relative_step=False,
                 scale_parameter=False, scale_weight_decay=False, lr=1e-4, weight_decay=0.01),
    "came_fira_al16": dict(beta1=0.9, beta3=0.999, enable_fira_for_adafactor=True,
                           c_quant_type="al16", lr=1e-3, relative_step=False),
    "fira_beta1_unfactored": dict(enable_fira_for_adafactor=True, beta1=0.9, factored=False),
    "beta1": dict(beta1=0.9),
    "unfactored": dict(factored=False),
    "adamw": ADAMW,
    "rmsprop": dict(ADAMW, beta1=None, beta2=0.99, weight_decay=0.0),
    "sgd": dict(beta1=0.9, beta2=None, beta2_decay=None, relative_step=False, factored=False,
                scale_parameter=False, d=0.0),
    "bias_corrected": dict(beta1=0.9, relative_step=False, bias_correction=True,
                           weight_decay=0.1),
}


class Net(torch.nn.Module):
    """Shapes above the 8-bit threshold (2-D and 4-D) plus a small bias."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.1 * torch.randn(96, 64, generator=g))
        self.e = torch.nn.Parameter(0.1 * torch.randn(80, 72, generator=g))
        self.c = torch.nn.Parameter(0.1 * torch.randn(4, 3, 24, 32, generator=g))
        self.b = torch.nn.Parameter(torch.zeros(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(x @ self.w + self.b)
        conv = self.c.sum(0).sum(0) @ x[:, :32].T
        return (h @ self.e[:, :64].T).square().mean() + 1e-2 * conv.square().mean()


def run_both(options: dict, steps: int = 100, compile: bool = False):
    """Trains two copies of Net side by side; returns both and the max per-step difference."""
    base = Net()
    ref, ours = copy.deepcopy(base), copy.deepcopy(base)
    opt_ref = Package(ref.parameters(), use_cuda_kernel=False, **options)
    opt = afx.Adafactor8Bit(ours.parameters(), compile=compile, **options)
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(steps):
        x = torch.randn(16, 96, generator=gen)
        for model, o in ((ref, opt_ref), (ours, opt)):
            o.zero_grad()
            model(x).backward()
            o.step()
        worst = max(worst, rel_diff(ours, ref))
    return ref, ours, worst, x


def rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(((p - q).abs().max() / q.abs().max().clamp_min(1e-30)).item()
               for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unquantized_parity_for_100_steps(name: str) -> None:
    """quantize=False: max relative parameter difference ≤ 1e-5 at every step."""
    _, _, worst, _ = run_both(dict(CONFIGS[name], quantize=False))
    assert worst <= 1e-5


@pytest.mark.parametrize("quantize", [False, True])
def test_compiled_parity(quantize: bool) -> None:
    """The compiled chain matches the package too (beta1: factored, Adafactor-style 1-D):
    ≤ 1e-5 unquantized; with 8-bit states, within the quantized runs' tolerance. Momentum
    blocks of 32 divide the rows of the 96×64 weight, whose compiled momentum is then created
    in blocks, and not those of the 80×72 one, whose momentum stays a matrix."""
    options = dict(beta1=0.9, quantize=quantize, m_block_size=32)
    ref, ours, worst, x = run_both(options, steps=30, compile=True)
    if quantize:
        assert abs(ours(x).item() - ref(x).item()) <= 0.01 * ref(x).item()
        assert worst <= 1e-2
    else:
        assert worst <= 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantized_parity_for_100_steps(name: str) -> None:
    """quantize=True: final loss within 1 % of the package's; parameters within 1 % per step.

    Both store 8-bit states; they differ by quantization error only where afx keeps a state the
    package pads (none here) or where one code flips at a rounding boundary, so the per-step
    difference stays at the size of one code level of the update.
    """
    ref, ours, worst, x = run_both(dict(CONFIGS[name], quantize=True))
    loss_ref, loss = ref(x).item(), ours(x).item()
    print(f"\n{name}: final loss package {loss_ref:.6e} afx {loss:.6e} "
          f"(relative {abs(loss - loss_ref) / loss_ref:.1e}); max per-step relative "
          f"parameter difference {worst:.1e}")
    assert abs(loss - loss_ref) <= 0.01 * loss_ref
    assert worst <= 1e-2


def state_bytes(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    """Bytes a parameter's state holds: tensors, plus 8 per Python number (the package keeps
    its step counter, block sizes and flags as Python values; afx keeps none)."""
    total = 0
    for value in opt.state[p].values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, numbers.Number):
            total += 8
    return total


MEMORY = {
    "factored al8": {},
    "factored al16": dict(v_quant_type="al16"),
    "factored + uf4 momentum": dict(beta1=0.9, m_quant_type="uf4"),
    "factored + d4 momentum": dict(beta1=0.9, m_quant_type="d4"),
    "factored + uf8 momentum": dict(beta1=0.9),
    "factored + d8 momentum": dict(beta1=0.9, m_quant_type="d8"),
    "adamw al8 + uf8": ADAMW,
    "adamw al16 + uf8": dict(ADAMW, v_quant_type="al16"),
    "unfactored al8": dict(factored=False),
    "sgd + uf8": CONFIGS["sgd"],
    "came al8 V + al8 C + uf8 M": CONFIGS["came"],
    "came al16 V + al16 C + uf8 M": dict(CONFIGS["came"], v_quant_type="al16"),
    "quantize=False factored": dict(quantize=False),
    "quantize=False adamw": dict(ADAMW, quantize=False),
}


@pytest.mark.parametrize("name", sorted(MEMORY))
def test_state_bytes_never_exceed_the_package(name: str) -> None:
    """A 1024x4096 weight: afx's state is at most the package's, for every configuration."""
    measured = []
    for cls, extra in ((Package, dict(use_cuda_kernel=False)), (afx.Adafactor8Bit,
                                                                 dict(compile=False))):
        w = torch.nn.Parameter(torch.zeros(1024, 4096))
        opt = cls([w], **MEMORY[name], **extra)
        w.grad = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0))
        opt.step()
        measured.append(state_bytes(opt, w))
    print(f"\n{name}: package {measured[0]:,} B, afx {measured[1]:,} B "
          f"({measured[1] / (1024 * 4096):.4f} B/param)")
    assert measured[1] <= measured[0]


@pytest.mark.parametrize("shape", [(64, 64), (128, 128), (100,), (3, 5, 7)])
def test_small_tensors_never_cost_more_than_float32(shape: tuple) -> None:
    """Deliberate difference: the package pads a 64-element row vector into a 2048-byte block
    (4,112 B for a 64x64 weight); afx's quantized state is never larger than float32."""
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = afx.Adafactor8Bit([p], beta1=0.9, min_8bit_size=0, compile=False)
    p.grad = torch.randn(shape)
    opt.step()
    plain = afx.Adafactor8Bit([p], beta1=0.9, quantize=False, compile=False)
    plain.step()
    assert state_bytes(opt, p) <= state_bytes(plain, p)


def test_short_states_are_encoded_without_padding() -> None:
    """One block of the state's own length holds the same codes and statistics as a zero-padded
    block; decoded values agree to the ulp (vectorised pow may round a tail element apart)."""
    from afx.codecs import get_codec

    x = torch.rand(300) + 1e-3
    codec = get_codec("al8")
    padded, short = codec.encode(x, 2048), codec.encode(x, 300)
    assert torch.equal(padded.codes[0, :300], short.codes[0])
    assert torch.equal(padded.scale, short.scale) and torch.equal(padded.min_log, short.min_log)
    torch.testing.assert_close(codec.decode(padded, (300,)), codec.decode(short, (300,)),
                               rtol=2.4e-7, atol=0.0)


def test_group_options_are_validated() -> None:
    """Deliberate difference: the package checks only constructor arguments; afx every group."""
    w = torch.nn.Parameter(torch.zeros(8, 8))
    Package([{"params": [w], "d": -1.0}], use_cuda_kernel=False)  # accepted by the package
    for bad, name in (({"d": -1.0}, "d"), ({"block_size": 100}, "block_size"),
                      ({"m_quant_type": "q3"}, "m_quant_type"),
                      ({"beta2_decay": 0.5}, "beta2_decay"),
                      ({"beta2": None, "beta2_decay": None}, "relative_step")):
        with pytest.raises(ValueError, match=name):
            afx.Adafactor8Bit([{"params": [w], **bad}], compile=False)


def test_package_code_runs_unchanged_and_unknown_options_fail() -> None:
    """0.2.2 and 0.4.6 options are accepted (CUDA-only knobs have no effect); typos raise."""
    w = torch.nn.Parameter(torch.zeros(8, 8))
    afx.Adafactor8Bit([w], lr=1e-3, relative_step=False, use_cuda_kernel=True, lag_norm=True,
                      warmup_multiplier=0.5, m_block_size=128, block_size=1024, compile=False)
    with pytest.raises(TypeError, match="blocksize"):
        afx.Adafactor8Bit([w], blocksize=256)


def test_weight_decay_is_more_exact_than_the_package() -> None:
    """Deliberate difference: the package applies decay as p · fl(1 − wλ), a factor that float32
    rounds in steps of 6e-8 (and to exactly 1 below 3e-8), then subtracts the update; afx
    subtracts (update + wλp) once. Against a float64 run of the same SGD steps, afx's mean error
    is several times smaller (measured about 11x at wλ = 1e-7)."""
    options = dict(beta2=None, beta2_decay=None, relative_step=False, lr=1e-3,
                   weight_decay=1e-4, scale_parameter=False, d=0.0, quantize=False,
                   factored=False)
    gen = torch.Generator().manual_seed(0)
    start = torch.rand(4096, generator=gen) + 0.5
    grads = [torch.randn(4096, generator=gen) * 1e-3 for _ in range(200)]
    exact = start.double()
    for g in grads:
        exact = exact - 1e-3 * g.double() - 1e-3 * 1e-4 * exact
    errors = []
    for cls, extra in ((Package, dict(use_cuda_kernel=False)),
                       (afx.Adafactor8Bit, dict(compile=False))):
        p = torch.nn.Parameter(start.clone())
        opt = cls([p], **options, **extra)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        errors.append((p.detach().double() - exact).abs().mean().item())
    assert errors[1] * 4 <= errors[0]


def test_maximize_equals_minimizing_the_negated_loss() -> None:
    """maximize=True on L takes the same steps as maximize=False on −L."""
    data = [torch.randn(16, 96, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    results = []
    for maximize, sign in ((True, 1.0), (False, -1.0)):
        model = Net()
        opt = afx.Adafactor8Bit(model.parameters(), beta1=0.9, maximize=maximize, compile=False)
        for x in data:
            opt.zero_grad()
            (sign * model(x)).backward()
            opt.step()
        results.append(model)
    assert rel_diff(results[0], results[1]) == 0.0


def test_symmetric_momentum_codes_keep_the_positive_extreme() -> None:
    """Deliberate addition: uf4 decodes +absmax as 7/8·absmax, so with zero gradients a block's
    positive maximum loses 12.5 % per step on top of the β₁ decay; afx's symmetric s4 keeps it.
    (m_quant_type='uf4' keeps the package's code.)"""
    from afx import transforms as T

    g = torch.linspace(-0.5, 1.0, 4096)
    peaks = {}
    for code in ("uf4", "s4"):
        tx = T.quantize_state(T.ema(0.5), {"m": code})
        state = tx.init(g)
        _, state = tx.update(g, state, g, {})
        for _ in range(5):
            m, state = tx.update(torch.zeros_like(g), state, g, {})
        peaks[code] = m.max().item()
    exact = 0.5 ** 6
    assert abs(peaks["s4"] - exact) <= 1e-6 * exact
    assert peaks["uf4"] < 0.55 * exact  # (7/8)^5 ≈ 0.51 of the exact value


def test_eps1_none_means_1e_30_for_bf16_parameters() -> None:
    """0.2.2 turned eps=(None, …) into the parameter dtype's epsilon (7.8e-3 for bf16), which
    floors V and makes small-gradient updates non-adaptive; afx follows 0.4.6: 1e-30."""
    updates = []
    for eps in ((None, 1e-3), (1e-30, 1e-3)):
        p = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
        opt = afx.Adafactor8Bit([p], eps=eps, quantize=False, compile=False)
        p.grad = torch.full_like(p, 1e-4)
        opt.step()
        updates.append(1.0 - p.detach().float())
    assert torch.equal(updates[0], updates[1])


def test_explicit_bias_correction_corrects_momentum_free_second_moments() -> None:
    """Deliberate fix, opt-in: with beta1=None the package never bias-corrects V, so an
    RMSprop-like first step is 1/√(1−β₂) ≈ 10× Adam's; bias_correction=True makes it Adam-sized.
    The default (None) keeps the package's numbers."""
    rms = dict(CONFIGS["rmsprop"], quantize=False)
    steps = {}
    for bc in (None, True):
        p = torch.nn.Parameter(torch.zeros(16))
        opt = afx.Adafactor8Bit([p], bias_correction=bc, compile=False, **rms)
        p.grad = torch.full((16,), 0.3)
        opt.step()
        steps[bc] = -p.detach()
    torch.testing.assert_close(steps[True], torch.full((16,), 1e-3), rtol=1e-4, atol=0)
    torch.testing.assert_close(steps[None], torch.full((16,), 1e-3 / (1 - 0.99) ** 0.5),
                               rtol=1e-4, atol=0)


def test_came_matches_came_pytorch() -> None:
    """The CAME configuration equals came-pytorch's CAME (the official algorithm) to ≤ 1e-5
    over 100 steps: factored confidence for matrices, momentum-only for the 1-D bias."""
    from came_pytorch import CAME

    base = Net()
    ref, ours = copy.deepcopy(base), copy.deepcopy(base)
    opt_ref = CAME(ref.parameters(), lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999, 0.9999),
                   eps=(1e-30, 1e-16))
    opt = afx.Adafactor8Bit(ours.parameters(), compile=False,
                            **dict(CONFIGS["came"], quantize=False))
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        x = torch.randn(16, 96, generator=gen)
        for model, o in ((ref, opt_ref), (ours, opt)):
            o.zero_grad()
            model(x).backward()
            o.step()
        assert rel_diff(ours, ref) <= 1e-5


def test_groups_differing_only_in_a_size_option_get_their_own_layouts() -> None:
    """Block sizes, the 8-bit threshold and the APOLLO rank shape the state: groups that differ
    only in one of them are built separately (numbers that scale the update are shared)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 512, generator=gen)) for _ in range(4)]
    opt = afx.Adafactor8Bit([
        {"params": [params[0]], "block_size": 128},
        {"params": [params[1]], "block_size": 256},
        {"params": [params[2]], "apollo_rank": 2, "min_8bit_size": 1 << 30},
        {"params": [params[3]], "apollo_rank": 4, "min_8bit_size": 1 << 30},
    ], factored=False, min_8bit_size=1024, compile=False)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    assert opt.state[params[0]]["elementwise.second_moment.v.codes"].shape[-1] == 128
    assert opt.state[params[1]]["elementwise.second_moment.v.codes"].shape[-1] == 256
    assert opt.state[params[2]]["apollo.low_rank.v"].shape == (2, 512)
    assert opt.state[params[3]]["apollo.low_rank.v"].shape == (4, 512)


def test_only_large_factored_momentum_buckets_recompute_their_momentum() -> None:
    """From 8M elements (a 32 MiB fp32 buffer, beyond what glibc serves from its heap), a
    factored bucket with 8-bit momentum compiles with RECOMPUTE_MOMENTUM_OPTIONS; smaller
    ones, CAME's (momentum under another name) and unquantized momentum keep afx's default."""
    from afx.optim.adafactor8bit import RECOMPUTE_MOMENTUM_OPTIONS
    from afx.optim.compiled import CPU_INDUCTOR_OPTIONS

    opt = afx.Adafactor8Bit([torch.nn.Parameter(torch.zeros(4, 4))], compile=False)
    keys = ("factored.second_moment.m.absmax", "factored.second_moment.m.codes",
            "factored.second_moment.rms.v_row.codes")
    big = 8 * 2**20
    assert opt.cpu_inductor_options(keys, big) == RECOMPUTE_MOMENTUM_OPTIONS
    assert opt.cpu_inductor_options(keys, big - 1) == CPU_INDUCTOR_OPTIONS
    assert opt.cpu_inductor_options(("factored.momentum.m.codes",), big) == CPU_INDUCTOR_OPTIONS
    assert opt.cpu_inductor_options(("factored.second_moment.m",), big) == CPU_INDUCTOR_OPTIONS


def _probe_then_lockstep(probed: afx.Adafactor8Bit, p1: torch.nn.Parameter,
                         other: afx.Adafactor8Bit, p2: torch.nn.Parameter,
                         grads: list[torch.Tensor], dtype: torch.dtype | None = None
                         ) -> list[int]:
    """Steps ``probed`` (on ``p1``) and ``other`` (on ``p2``) through ``grads`` side by side;
    returns the sizes of the buffers ``probed``'s first, compiled, step allocates."""
    p1.grad = grads[0].clone()
    sizes = step_buffer_sizes(probed, dtype=dtype)
    p2.grad = grads[0].clone()
    other.step()
    for g in grads[1:]:
        p1.grad, p2.grad = g.clone(), g.clone()
        probed.step()
        other.step()
    return sizes


def test_recomputed_momentum_stores_no_parameter_sized_buffer_and_matches() -> None:
    """With RECOMPUTE_MOMENTUM_OPTIONS the compiled beta1 step allocates no buffer as large as
    the parameter (afx's default stores the new fp32 momentum), and parameters and states
    stay bitwise equal to the default compile's over three steps."""
    from afx.optim.adafactor8bit import RECOMPUTE_MOMENTUM_OPTIONS

    def make() -> tuple[torch.nn.Parameter, list[torch.Tensor]]:
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(512, 256) * 0.02)
        return p, [torch.randn(512, 256) * 1e-3 for _ in range(3)]

    (p1, grads), (p2, _) = make(), make()
    recompute = afx.Adafactor8Bit(
        [p1], beta1=0.9, compile={"options": dict(RECOMPUTE_MOMENTUM_OPTIONS)})
    stored = afx.Adafactor8Bit([p2], beta1=0.9)
    assert max(_probe_then_lockstep(recompute, p1, stored, p2, grads)) < p1.numel()
    assert torch.equal(p1, p2)
    assert all(torch.equal(v, stored.state[p2][k]) for k, v in recompute.state[p1].items())


def test_zero_d_is_static_and_leaves_the_clip_out() -> None:
    """Whether d is zero is part of a group's static options: a d = 0 group's chain has no
    clip (no clip_threshold hyperparameter to mirror), other values (a tensor, even a zero
    one, is never read to decide) share one chain with a dynamic d, and moving d to 0 mid-run
    keeps the state and matches a run started at 0."""
    params = [torch.nn.Parameter(torch.randn(8, 6)) for _ in range(4)]
    opt = afx.Adafactor8Bit([{"params": [params[0]], "d": 0.0}, {"params": [params[1]], "d": 1.0},
                             {"params": [params[2]], "d": 0.5},
                             {"params": [params[3]], "d": torch.tensor(0.0)}], compile=False)
    (s0, t0), (s1, t1), (s2, t2), (s3, t3) = (opt._transformation(g) for g in opt.param_groups)
    assert s0 != s1 and t0 is not t1 and (s1, t1) == (s2, t2) == (s3, t3)
    assert "clip_threshold" not in t0.hyperparams and "clip_threshold" in t1.hyperparams

    def run(d_first: float) -> tuple[torch.Tensor, afx.Adafactor8Bit]:
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64, 96))
        o = afx.Adafactor8Bit([p], compile=False, **dict(ADAMW, d=d_first))
        for step in range(4):
            if step == 2:
                o.param_groups[0]["d"] = 0.0
            p.grad = torch.randn(64, 96)
            o.step()
        return p, o

    (p_moved, moved), (p_zero, zero) = run(1e9), run(0.0)  # d = 1e9 never clips these updates
    assert torch.equal(p_moved, p_zero)
    assert all(torch.equal(v, zero.state[p_zero][k]) for k, v in moved.state[p_moved].items())


def test_large_elementwise_moment_buckets_store_only_the_second_moment() -> None:
    """From 8M elements an element-wise bucket with 8-bit first and second moments (the
    AdamW-like preset) compiles with ELEMENTWISE_MOMENTS_OPTIONS, under which the compiled
    step allocates one parameter-sized float32 buffer (the new second moment; afx's default
    options store the new first moment too) and trains like eager."""
    from afx.optim.adafactor8bit import ELEMENTWISE_MOMENTS_OPTIONS
    from afx.optim.compiled import CPU_INDUCTOR_OPTIONS

    probe = afx.Adafactor8Bit([torch.nn.Parameter(torch.zeros(4, 4))], compile=False)
    keys = ("elementwise.second_moment.rms.v.codes", "elementwise.second_moment.rms.v.scale",
            "elementwise.second_moment.m.codes", "elementwise.second_moment.m.absmax")
    big = 8 * 2**20
    assert probe.cpu_inductor_options(keys, big) == ELEMENTWISE_MOMENTS_OPTIONS
    assert probe.cpu_inductor_options(keys, big - 1) == CPU_INDUCTOR_OPTIONS
    assert probe.cpu_inductor_options(keys[:2], big) == CPU_INDUCTOR_OPTIONS

    torch.manual_seed(0)
    shape = (512, 256)
    start = torch.randn(shape) * 0.02
    p1, p2 = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    grads = [torch.randn(shape) * 1e-3 for _ in range(3)]
    compiled = afx.Adafactor8Bit([p1], compile={"options": dict(ELEMENTWISE_MOMENTS_OPTIONS)},
                                 **ADAMW)
    eager = afx.Adafactor8Bit([p2], compile=False, **ADAMW)
    sizes = _probe_then_lockstep(compiled, p1, eager, p2, grads, dtype=torch.float32)
    assert sum(n >= p1.numel() for n in sizes) == 1, sizes
    torch.testing.assert_close(p1, p2, rtol=0, atol=1e-6)


class _OwnShape(afx.Adafactor8Bit):
    """Adafactor8Bit stepping every parameter in its own shape (no step_layout)."""

    def step_layout(self, group, state_keys, param):
        return StepLayout()


def test_step_layout_is_flat_for_elementwise_routes_and_row_blocks_for_8bit_momentum() -> None:
    """step_layout flattens a contiguous matrix on the element-wise route (padded last blocks
    included), names m_block_size for a matrix whose rows it divides and whose factored momentum
    is 8-bit (Adam-style or CAME's), and keeps the parameter's own shape otherwise."""
    opt = afx.Adafactor8Bit([torch.nn.Parameter(torch.zeros(4, 4))], compile=False)
    group = dict(opt.param_groups[0], block_size=256, m_block_size=32)
    adam, came = ("factored.second_moment.m.codes",), ("factored.momentum.m.codes",)
    elementwise = ("elementwise.second_moment.m.codes", "elementwise.second_moment.rms.v.codes")
    matrix = torch.zeros(8, 64)
    assert opt.step_layout(group, adam, matrix) == StepLayout(rows=32)
    assert opt.step_layout(group, came, matrix) == StepLayout(rows=32)
    assert opt.step_layout(group, elementwise, matrix) == StepLayout(flat=True)
    assert opt.step_layout(group, elementwise, torch.zeros(2, 8, 64)) == StepLayout(flat=True)
    assert opt.step_layout(group, ("factored.second_moment.m",), matrix) == StepLayout()
    assert opt.step_layout(group, (), matrix) == StepLayout()
    assert opt.step_layout(group, adam, torch.zeros(8, 48)) == StepLayout()
    assert opt.step_layout(group, adam, torch.zeros(64, 8).T) == StepLayout()
    assert opt.step_layout(group, elementwise, torch.zeros(64, 8).T) == StepLayout()
    assert opt.step_layout(group, adam, torch.zeros(512)) == StepLayout()
    assert opt.step_layout(group, elementwise, torch.zeros(512)) == StepLayout()
    assert opt.step_layout(group, elementwise, torch.zeros(12, 4)) == StepLayout(flat=True)
    assert opt.step_layout(dict(group, block_size=2048), elementwise,
                           torch.zeros(50257, 768)) == StepLayout(flat=True)
    assert opt.step_layout(dict(group, m_quant_type="fp32"), adam, matrix) == StepLayout()


def _layout_against_own_shape(options: dict, shape: tuple[int, int]) -> tuple[list, list]:
    """Steps ``Adafactor8Bit(**options)`` and :class:`_OwnShape` alike on two parameters (fp32,
    and bf16 with stochastic rounding), over steps that include a skipped NaN gradient; checks
    that parameters and states stay bitwise equal and returns each optimizer's compiled
    sources of the first step."""
    from torch._inductor.utils import fresh_cache, run_and_get_code

    from afx.optim import precompiled

    gen = torch.Generator().manual_seed(0)
    start = [0.02 * torch.randn(shape, generator=gen) for _ in range(2)]
    grads = [[1e-3 * torch.randn(shape, generator=gen) for _ in range(2)] for _ in range(4)]
    grads[1][0][3, 5] = float("nan")
    results, sources = [], []
    for cls in (afx.Adafactor8Bit, _OwnShape):
        params = [torch.nn.Parameter(start[0].clone()),
                  torch.nn.Parameter(start[1].to(torch.bfloat16))]
        opt = cls(params, stochastic_round_writeback=True, **options)
        for i, step in enumerate(grads):
            for p, g in zip(params, step):
                p.grad = g.to(p.dtype)
            if i:
                opt.step()
                continue
            with mock.patch.dict(os.environ, {precompiled.ENV: "0"}), fresh_cache():
                sources.append(run_and_get_code(opt.step)[1])
        results.append((params, opt))
    (ours, opt), (theirs, ref) = results
    assert int(opt.skipped_updates) == int(ref.skipped_updates) == 1
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        assert all(torch.equal(v, ref.state[q][k]) for k, v in opt.state[p].items())
    return sources


def _analyse(sources: list, numel: int) -> list:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from afxbench.passes import analyse

    return [analyse(s, numel) for s in sources]


def test_parameters_written_in_momentum_blocks_match_and_save_a_pass() -> None:
    """Compiled, a factored bucket with 8-bit momentum writes its parameter in the momentum's
    blocks: results stay bitwise those of stepping each parameter in its own shape, and each
    bucket's update then shares the loop that encodes the momentum: one pass fewer."""
    shape = (64, 96)
    ours, theirs = _layout_against_own_shape(dict(beta1=0.9, m_block_size=32, min_8bit_size=1024),
                                             shape)
    counts = [sum(len(k.passes) for k in _analyse(s, math.prod(shape))) for s in (ours, theirs)]
    assert counts[0] == counts[1] - 2


def test_elementwise_routes_step_flat_and_save_a_pass() -> None:
    """Compiled, an element-wise (AdamW-like) bucket whose second-moment blocks span rows (a
    block of 256 on 96-wide rows) steps the flattened parameter: results stay bitwise those
    of stepping it in its own shape, and the new momentum is computed in the loop that
    updates the parameter instead of a loop of its own: one pass and 8 bytes per element
    fewer in each bucket."""
    options = dict(factored=False, beta1=0.9, beta2=0.999, beta2_decay=None,
                   relative_step=False, lr=1e-3, d=0, scale_parameter=False,
                   scale_weight_decay=False, eps=(1e-8, 1e-3), block_size=256, m_block_size=32,
                   min_8bit_size=1024)
    shape = (64, 96)
    ours, theirs = (_analyse(s, math.prod(shape))
                    for s in _layout_against_own_shape(options, shape))
    assert len(ours) == len(theirs) == 2  # the fp32 and the bf16 parameter
    for flat, own in zip(ours, theirs):
        assert len(flat.passes) == len(own.passes) - 1
        assert flat.bytes_per_element == own.bytes_per_element - 8
