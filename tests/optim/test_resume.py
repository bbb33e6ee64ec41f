"""Exact resume: a run interrupted by a checkpoint (state_dict -> torch.save -> torch.load with
weights_only=True -> a fresh optimizer) continues exactly like the uninterrupted run, for every
preset, with stochastic rounding and quantized states; loading follows the parameters' device.

No GPU on this machine: device-following is tested by loading a CPU checkpoint into an
optimizer over meta-device parameters.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from torch import nn

import afx

PRESET_NAMES = ["sgd", "adafactor", "adamw", "rmsprop", "came", "apollo"]
# Per-preset overrides: SGD runs with momentum, so that it has a state to checkpoint; APOLLO
# projects this model's two Linear weights at rank 2 and redraws the projections every 5
# steps, so a checkpoint at step 7 falls inside a refresh gap and the resumed run crosses a
# refresh.
OVERRIDES = {"sgd": {"beta1": 0.9},
             "apollo": {"apollo_rank": 2, "apollo_update_proj_gap": 5,
                        "apollo_targets": ("fc", "out", "table")}}


class Small(nn.Module):
    """Embedding, LayerNorm and two Linear layers (several routes and shapes)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(12, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        self.to(dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(self.norm(self.embed(idx)))))


class Mini(nn.Module):
    """One table: one bucket to compile (a quantized CAME bucket with stochastic rounding takes
    ~25 s to compile here; the eager tests cover the other routes)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.table = nn.Parameter((0.5 * torch.randn(12, 4, generator=g)).to(dtype))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.table[idx])


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of a given step, whatever process or optimizer asks for it."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 12, (16,), generator=g), torch.randn(16, 4, generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        idx, target = batch(step)
        opt.zero_grad()
        (model(idx).float() - target).square().mean().backward()
        opt.step()


def round_trip(obj: dict, **load_args) -> dict:
    """torch.save to memory, then torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True, **load_args)


Factory = Callable[[nn.Module], afx.Adafactor8Bit]


def factory(preset: str, variant: str, compile: bool = False) -> Factory:
    """An optimizer for a model: ``fp32`` uses the preset's default (G1) groups; ``quantized``
    puts every parameter in one group (G0) with 8-bit/4-bit states down to tiny tensors;
    ``sr`` adds stochastic rounding of bfloat16 parameters on top of ``quantized``; the
    preset's :data:`OVERRIDES` apply to all three."""
    overrides = OVERRIDES.get(preset, {})

    def make(model: nn.Module) -> afx.Adafactor8Bit:
        if variant == "fp32":
            groups = afx.build_param_groups(model, preset, **overrides)
            return afx.Adafactor8Bit(groups, lr=1e-2, weight_decay=0.1, quantize=False,
                                     compile=compile)
        groups = afx.build_param_groups(model, preset, "G0", **overrides)
        return afx.Adafactor8Bit(groups, lr=1e-2, weight_decay=0.1, min_8bit_size=0,
                                 block_size=128, m_block_size=32, compile=compile,
                                 stochastic_round_writeback=variant == "sr")
    return make


def run_with_checkpoint(make: Factory, dtype: torch.dtype, save_at: int, total: int,
                        **load_args) -> tuple[nn.Module, afx.Adafactor8Bit]:
    """Trains ``save_at`` steps, checkpoints model and optimizer, loads both into fresh
    objects and trains the remaining steps."""
    model = Small(dtype)
    opt = make(model)
    train(model, opt, range(save_at))
    ckpt = round_trip({"model": model.state_dict(), "opt": opt.state_dict()}, **load_args)
    resumed = Small(dtype)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, range(save_at, total))
    return resumed, opt2


def differences(a: nn.Module, opt_a: torch.optim.Optimizer, b: nn.Module,
                opt_b: torch.optim.Optimizer) -> float:
    """Max over parameters and floating state tensors of max|a − b| / max|b|; integer state
    (codes, seeds) must match exactly, and both runs must hold the same state entries."""
    worst = 0.0
    for p, q in zip(a.parameters(), b.parameters()):
        pairs = [(p.detach(), q.detach())]
        assert opt_a.state[p].keys() == opt_b.state[q].keys()
        for key, value in opt_a.state[p].items():
            other = opt_b.state[q][key]
            assert value.dtype == other.dtype, key
            if value.is_floating_point():
                pairs.append((value, other))
            else:
                assert torch.equal(value, other), key
        for x, y in pairs:
            if x.numel():
                scale = y.float().abs().max().clamp_min(1e-30)
                worst = max(worst, ((x.float() - y.float()).abs().max() / scale).item())
    return worst


@pytest.mark.parametrize("variant", ["fp32", "quantized", "sr"])
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_eager_resume_is_bit_identical(preset: str, variant: str) -> None:
    """Checkpoint at an odd step, resume in a fresh model and optimizer: after 13 steps every
    parameter and state tensor (quantized codes, scales, rounding seeds) is bitwise equal to
    the uninterrupted run."""
    dtype = torch.bfloat16 if variant == "sr" else torch.float32
    make = factory(preset, variant)
    whole = Small(dtype)
    opt = make(whole)
    train(whole, opt, range(13))
    resumed, opt2 = run_with_checkpoint(make, dtype, save_at=7, total=13)
    if variant != "fp32":
        assert any(v.dtype == torch.uint8 for s in opt.state.values() for v in s.values())
    if variant == "sr":
        assert all("sr_seed" in s for s in opt2.state.values())
    if preset == "apollo":
        assert any(k.startswith("apollo.") for s in opt2.state.values() for k in s)
    assert differences(resumed, opt2, whole, opt) == 0.0


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_compiled_resume_matches_the_uninterrupted_run(preset: str) -> None:
    """Every preset compiled, with quantized states and stochastic rounding of bf16
    parameters, checkpointed at step 5 (inside APOLLO's refresh gap): after 12 steps
    parameters and states are within 1e-6 relative of the uninterrupted compiled run."""
    make = factory(preset, "sr", compile=True)
    whole = Mini(torch.bfloat16)
    opt = make(whole)
    train(whole, opt, range(5))
    ckpt = round_trip({"model": whole.state_dict(), "opt": opt.state_dict()})
    # The checkpointed run goes on uninterrupted (one compiled optimizer less to build).
    train(whole, opt, range(5, 12))
    resumed = Mini(torch.bfloat16)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, range(5, 12))
    state = opt2.state[resumed.table]
    assert "sr_seed" in state and any(v.dtype == torch.uint8 for v in state.values())
    worst = differences(resumed, opt2, whole, opt)
    print(f"\ncompiled resume vs uninterrupted: max relative difference {worst:.3g}")
    assert worst <= 1e-6


@pytest.mark.parametrize("map_location", ["cpu", "function"])
def test_map_location(map_location: str) -> None:
    """torch.load(map_location="cpu") or a map_location function: the resumed run is still
    bitwise the uninterrupted one, and the function really saw the checkpoint's storages."""
    seen = []

    def locate(storage: torch.UntypedStorage, location: str) -> torch.UntypedStorage:
        seen.append(location)
        return storage

    make = factory("adamw", "quantized")
    whole = Small()
    opt = make(whole)
    train(whole, opt, range(8))
    resumed, opt2 = run_with_checkpoint(
        make, torch.float32, save_at=3, total=8,
        map_location="cpu" if map_location == "cpu" else locate)
    assert differences(resumed, opt2, whole, opt) == 0.0
    assert map_location == "cpu" or (seen and set(seen) == {"cpu"})


def test_loaded_state_follows_the_parameters_device() -> None:
    """A CPU checkpoint loaded into an optimizer over meta-device parameters puts every state
    tensor on the meta device with its saved dtype (codes stay uint8, statistics float32,
    seeds int64) rather than casting to the parameters' bfloat16."""
    make = factory("came", "sr")
    model = Small(torch.bfloat16)
    opt = make(model)
    train(model, opt, range(3))
    ckpt = round_trip(opt.state_dict())
    with torch.device("meta"):
        meta = Small(torch.bfloat16)
    opt_meta = make(meta)
    opt_meta.load_state_dict(ckpt)
    for p, q in zip(model.parameters(), meta.parameters()):
        assert opt_meta.state[q].keys() == opt.state[p].keys()
        for key, value in opt_meta.state[q].items():
            assert value.device.type == "meta", key
            assert value.dtype == opt.state[p][key].dtype, key
            assert value.shape == opt.state[p][key].shape, key
