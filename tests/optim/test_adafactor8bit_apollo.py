"""APOLLO in afx.Adafactor8Bit vs adafactor8bit 0.4.6 (use_cuda_kernel=False).

The package draws its projections from a ``torch.Generator``; afx from a counter-based hash
that works inside a compiled graph. To compare everything else, both optimizers cache their
projection (``apollo_cache_proj=True``), take one step with zero gradients (which leaves every
moment at zero and the parameters unchanged), and afx's cached projection is overwritten with
the package's. The gap is longer than the run, so neither redraws.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from adafactor8bit import Adafactor8Bit as Package
from afx_testing import step_buffer_sizes, step_sources
from test_adafactor8bit import rel_diff, state_bytes

import afx
import afx.matmul
from afx.optim.compiled import CPU_INDUCTOR_OPTIONS

ADAM_LIKE = dict(apollo_rank=4, beta1=0.9, beta2=0.999, beta2_decay=None, relative_step=False,
                 lr=1e-3, scale_parameter=False, scale_weight_decay=False, d=0.0,
                 eps=(1e-6, 1e-3), weight_decay=0.01)
CONFIGS = {
    "preset-like (channel, momentum, Fira)": ADAM_LIKE,
    "tensor scaling": dict(ADAM_LIKE, apollo_scale_type="tensor"),
    "factorize": dict(ADAM_LIKE, apollo_factorize=True),
    "apollo + came": dict(ADAM_LIKE, beta3=0.999, d=1.0),
    "apollo + came, factorize": dict(ADAM_LIKE, beta3=0.999, apollo_factorize=True, d=1.0),
    "constructor defaults (relative step, t^-0.8)": dict(apollo_rank=4),
    "no momentum, scale in front of Fira": dict(ADAM_LIKE, beta1=None, apollo_scale=4.0,
                                               apollo_scale_front=True, d=1.0),
    # No weight decay here: coupled to α_t = lr·RMS(p), the package's float32 factor
    # fl(1 − α_t λ) drifts by ~1e-5 over 100 steps (afx's decay is the more exact one, see
    # test_adafactor8bit.py::test_weight_decay_is_more_exact_than_the_package).
    "scale after, Fira off, clip, param scale": dict(
        ADAM_LIKE, apollo_scale=2.0, enable_fira_for_apollo=False, d=0.5,
        scale_parameter=True, weight_decay=0.0),
}
SMALL_BLOCKS = dict(min_8bit_size=256, block_size=128, m_block_size=32)


class ApolloNet(torch.nn.Module):
    """Projected from both sides: 48x40 (rows kept), 24x48 and a 16x6x4 tensor (columns kept),
    plus a bias that takes the non-APOLLO path. Gradients are dense: no channel's gradient sits
    at zero, where APOLLO's ``‖U‖/(‖L‖ + 1e-8)`` would amplify float32 rounding."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(48, 40, generator=g) / math.sqrt(40))
        self.b1 = torch.nn.Parameter(torch.zeros(48))
        self.w2 = torch.nn.Parameter(torch.randn(24, 48, generator=g) / math.sqrt(48))
        self.k = torch.nn.Parameter(torch.randn(16, 6, 4, generator=g) / math.sqrt(24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(torch.tanh(x @ self.w1.T + self.b1) @ self.w2.T)
        return (h @ self.k.reshape(16, 24).T - 0.5).square().mean()


def share_projection(ref: torch.nn.Module, opt_ref: Package, ours: torch.nn.Module,
                     opt: afx.Adafactor8Bit) -> None:
    """One zero-gradient step in both, then the package's projections into afx's state."""
    for model, o in ((ref, opt_ref), (ours, opt)):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        o.step()
    for p, q in zip(ref.parameters(), ours.parameters()):
        if opt_ref.state[p].get("apollo_proj_matrix_T") is not None:
            (key,) = [k for k in opt.state[q] if k.endswith(".proj")]
            opt.state[q][key].copy_(opt_ref.state[p]["apollo_proj_matrix_T"])


def run_both(options: dict, steps: int = 100, compile: bool = False,
             trained: tuple[str, ...] = ("w1", "b1", "w2", "k")):
    """Trains ``trained`` (the others stay frozen) in both; returns the final losses and the
    largest relative parameter difference over the steps."""
    options = dict(options, apollo_cache_proj=True, apollo_update_proj_gap=1000)
    ref, ours = ApolloNet(), ApolloNet()
    for model in (ref, ours):
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained)
    opt_ref = Package(ref.parameters(), use_cuda_kernel=False, **options)
    opt = afx.Adafactor8Bit(ours.parameters(), compile=compile, **options)
    share_projection(ref, opt_ref, ours, opt)
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(steps):
        x = torch.randn(16, 40, generator=gen)
        for model, o in ((ref, opt_ref), (ours, opt)):
            o.zero_grad()
            model(x).backward()
            o.step()
        worst = max(worst, rel_diff(ours, ref))
    return ref(x).item(), ours(x).item(), worst


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unquantized_parity_for_100_steps(name: str) -> None:
    """quantize=False, same projection: max relative parameter difference ≤ 1e-5 at every
    step (the projection's random stream is the one deliberate difference)."""
    _, _, worst = run_both(dict(CONFIGS[name], quantize=False))
    assert worst <= 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantized_parity_for_100_steps(name: str) -> None:
    """8-bit low-rank states (al8 V and residual, uf8 momentum, blocks small enough that this
    model's states are quantized): final loss within 1 % of the package's, parameters within
    1 % at every step."""
    loss_ref, loss, worst = run_both(dict(CONFIGS[name], quantize=True, **SMALL_BLOCKS))
    print(f"\n{name}: final loss package {loss_ref:.6e} afx {loss:.6e}; max per-step relative "
          f"parameter difference {worst:.1e}")
    assert abs(loss - loss_ref) <= 0.01 * loss_ref
    assert worst <= 1e-2


def test_compiled_parity() -> None:
    """The compiled APOLLO chain (8-bit states) matches the package like the eager one, on
    both sides of the projection: w1 (48x40, ``L = G P``) and the 3-D kernel (viewed 16x24,
    ``L = Pᵀ G``). The bias (not projected) and w2 (projected like the kernel) stay frozen:
    each compiled bucket costs ~20 s here."""
    loss_ref, loss, worst = run_both(dict(ADAM_LIKE, beta3=0.999, d=1.0, **SMALL_BLOCKS),
                                     steps=30, compile=True, trained=("w1", "k"))
    assert abs(loss - loss_ref) <= 0.01 * loss_ref
    assert worst <= 1e-2


def test_regenerated_projection_trains_like_the_cached_one() -> None:
    """Without caching (afx's default: nothing stored), afx redraws the same projections, so
    the run is bitwise the one with ``apollo_cache_proj=True``."""
    results = []
    for cache in (False, True):
        model = ApolloNet()
        opt = afx.Adafactor8Bit(model.parameters(), compile=False, apollo_cache_proj=cache,
                                **dict(ADAM_LIKE, apollo_update_proj_gap=3))
        gen = torch.Generator().manual_seed(1)
        for _ in range(8):
            opt.zero_grad()
            model(torch.randn(16, 40, generator=gen)).backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


MEMORY = {
    "r=16, constructor defaults": dict(apollo_rank=16),
    "r=16 + uf8 m": dict(apollo_rank=16, beta1=0.9),
    "r=16 + uf8 m + cache_proj": dict(apollo_rank=16, beta1=0.9, apollo_cache_proj=True),
    "r=256 + uf8 m": dict(apollo_rank=256, beta1=0.9),
    "r=256 preset-like (cache_proj)": dict(ADAM_LIKE, apollo_rank=256, apollo_cache_proj=True),
    "r=1 tensor + m": dict(apollo_rank=1, beta1=0.9, apollo_scale_type="tensor"),
    "r=16 factorize + m": dict(apollo_rank=16, beta1=0.9, apollo_factorize=True),
    "r=16 + came": dict(apollo_rank=16, beta1=0.9, beta3=0.999),
}


@pytest.mark.parametrize("name", sorted(MEMORY))
def test_state_bytes_never_exceed_the_package(name: str) -> None:
    """The APOLLO rows of the package's memory table (1024x4096 weight): afx ≤ package."""
    measured = []
    for cls, extra in ((Package, dict(use_cuda_kernel=False)),
                       (afx.Adafactor8Bit, dict(compile=False))):
        w = torch.nn.Parameter(torch.zeros(1024, 4096))
        opt = cls([w], **MEMORY[name], **extra)
        w.grad = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0))
        opt.step()
        measured.append(state_bytes(opt, w))
    print(f"\n{name}: package {measured[0]:,} B, afx {measured[1]:,} B")
    assert measured[1] <= measured[0]


def test_apollo_preset_trains_a_gpt_like_block() -> None:
    """build_param_groups(model, "apollo") + Adafactor8Bit: the attention/MLP matrices take
    the APOLLO path, the rest AdamW-like, and the loss goes down."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.Linear(32, 32)
            self.mlp = torch.nn.Linear(32, 32)
            self.head = torch.nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.mlp(torch.relu(self.attn(x)))))

    torch.manual_seed(0)
    model = Block()
    groups = afx.build_param_groups(model, "apollo", apollo_rank=4)
    opt = afx.Adafactor8Bit(groups, lr=1e-2, compile=False)
    x, y = torch.randn(64, 32), torch.randn(64, 4)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert any(k.startswith("apollo.") for k in opt.state[model.attn.weight])
    assert not any(k.startswith("apollo.") for k in opt.state[model.head.weight])
    assert losses[-1] < 0.7 * losses[0]


def test_loaded_package_projection_is_used_until_the_next_refresh() -> None:
    """A projection written into the state (as from a checkpoint) is what the next steps use
    while no refresh is due; the refresh then replaces it with afx's own draw."""
    model = ApolloNet()
    opt = afx.Adafactor8Bit(model.parameters(), compile=False, apollo_cache_proj=True,
                            **dict(ADAM_LIKE, apollo_update_proj_gap=3))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    key = next(k for k in opt.state[model.w1] if k.endswith(".proj"))
    injected = torch.full_like(opt.state[model.w1][key], 0.5)
    opt.state[model.w1][key].copy_(injected)
    opt.step()
    opt.step()
    assert torch.equal(opt.state[model.w1][key], injected)
    opt.step()  # t = 4 = 1 + gap
    assert not torch.equal(opt.state[model.w1][key], injected)


def test_rank_and_scale_type_are_validated_per_group() -> None:
    """A bad APOLLO option in any group is refused before any state exists."""
    w = torch.nn.Parameter(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="apollo_scale_type"):
        afx.Adafactor8Bit([w], apollo_rank=2, apollo_scale_type="row")
    with pytest.raises(ValueError, match="apollo_rank"):
        afx.Adafactor8Bit([{"params": [w], "apollo_rank": -1}])
    with pytest.raises(ValueError, match="apollo_update_proj_gap"):
        afx.Adafactor8Bit([w], apollo_rank=2, apollo_update_proj_gap=0)


def test_apollo_seeds_are_parameter_positions_across_groups() -> None:
    """Each parameter's projection seed is its position in param_groups, so same-shaped
    parameters in groups built separately (here: different quantize flags) still get
    different projections."""
    start = torch.randn(32, 16)
    params = [torch.nn.Parameter(start.clone()) for _ in range(3)]
    opt = afx.Adafactor8Bit([{"params": params[:2], "quantize": True},
                             {"params": params[2:], "quantize": False}],
                            apollo_rank=2, compile=False)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert [int(opt.state[p]["apollo.low_rank.seed"]) for p in params] == [1, 2, 3]
    # Same start, same gradient: only the projections can make the steps differ.
    assert not torch.equal(params[0], params[1])
    assert not torch.equal(params[0], params[2])


def test_compiled_step_keeps_no_parameter_sized_temporary() -> None:
    """With ``skip_nonfinite`` (the default) APOLLO multiplies the gradient itself, not a
    NaN-free copy of it, and its bucket compiles with Inductor's own fusion threshold, so the
    scaled gradient S ⊙ G goes straight into the parameter update: Inductor's CPU code for
    the step allocates no parameter-sized buffer (it allocated one, 147 MiB on GPT-2's
    embedding). A NaN gradient then still leaves the parameter and its state untouched."""
    param = torch.nn.Parameter(torch.randn(500, 384) * 0.02)
    param.grad = torch.randn(500, 384) * 1e-3
    opt = afx.Adafactor8Bit([param], apollo_rank=64)
    sizes = step_buffer_sizes(opt)
    assert sizes and max(sizes) < param.numel()
    before = param.detach().clone()
    state = {k: v.clone() for k, v in opt.state[param].items()}
    param.grad[7, 5] = float("nan")
    opt.step()
    assert torch.equal(param, before) and int(opt.skipped_updates) == 1
    assert all(torch.equal(opt.state[param][k], v) for k, v in state.items())


def test_compiled_low_rank_state_reads_block_statistics_per_block() -> None:
    """A 16×96 parameter projects as L = P G, an 8×96 matrix whose 8-bit V (blocks of 128)
    has blocks that straddle rows. Its update runs over the flat state, so Inductor's loops
    index each block's statistics by the block, never by dividing every element's index by
    the block length (a scalar fetch per element in the 2-D loop); the step compiles to the
    oneDNN product."""
    param = torch.nn.Parameter(torch.randn(16, 96) * 0.1)
    param.grad = torch.randn(16, 96)
    opt = afx.Adafactor8Bit([param], apollo_rank=8, block_size=128, min_8bit_size=256)
    sources = step_sources(opt)
    assert opt.state[param]["apollo.low_rank.v.codes"].shape == (6, 128)
    assert not any(re.search(r"div_floor_integer\([^;]*128L", s) for s in sources)
    if afx.matmul._LINEAR is not None:
        assert any("torch.ops.afx.cpu_mm" in s for s in sources)


def test_only_apollo_buckets_use_inductors_default_fusion() -> None:
    """Adafactor8Bit's other routes keep afx's CPU Inductor options."""
    opt = afx.Adafactor8Bit([torch.nn.Parameter(torch.zeros(4, 4))], compile=False)
    assert opt.cpu_inductor_options(("apollo.low_rank.v", "apollo.fira.prev_norm"), 16) == {}
    assert opt.cpu_inductor_options(("factored.second_moment.v_row",), 16) == CPU_INDUCTOR_OPTIONS
