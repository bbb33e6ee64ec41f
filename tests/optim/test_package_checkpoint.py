"""adafactor8bit 0.4.6 checkpoints load into afx.Adafactor8Bit and training continues."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from adafactor8bit import Adafactor8Bit as Package
from test_adafactor8bit import CONFIGS, Net, rel_diff
from test_adafactor8bit_apollo import ADAM_LIKE, ApolloNet

import afx
from afx.optim.package_checkpoint import is_package_state_dict

RESUMED = {name: (dict(CONFIGS[name], min_8bit_size=1024), Net, 96)
           for name in ("default", "beta1", "came", "adamw", "sgd", "unfactored", "fira")}
RESUMED["apollo (cached projection)"] = (
    dict(ADAM_LIKE, apollo_cache_proj=True, apollo_update_proj_gap=1000, min_8bit_size=256,
         block_size=128, m_block_size=32), ApolloNet, 40)


def saved_and_loaded(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def resume_from_package(options: dict, model_cls: type, width: int, quantize: bool,
                        before: int = 10, after: int = 30):
    """The package trains ``before`` steps and saves; afx loads and both continue."""
    ref = model_cls()
    ours = copy.deepcopy(ref)
    opt_ref = Package(ref.parameters(), use_cuda_kernel=False, quantize=quantize, **options)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(16, width, generator=gen) for _ in range(before + after)]
    for x in data[:before]:
        opt_ref.zero_grad()
        ref(x).backward()
        opt_ref.step()
    ours.load_state_dict(ref.state_dict())
    opt = afx.Adafactor8Bit(ours.parameters(), compile=False)
    opt.load_state_dict(saved_and_loaded(opt_ref.state_dict()))
    worst = 0.0
    for x in data[before:]:
        for model, o in ((ref, opt_ref), (ours, opt)):
            o.zero_grad()
            model(x).backward()
            o.step()
        worst = max(worst, rel_diff(ours, ref))
    return ref(x).item(), ours(x).item(), worst, opt, opt_ref


@pytest.mark.parametrize("name", sorted(RESUMED))
def test_training_continues_like_the_package(name: str) -> None:
    """After loading the package's checkpoint afx takes the package's next 30 steps: ≤ 1e-5
    per step with float32 states, within 1 % (final loss and every step) with 8-bit states."""
    options, model_cls, width = RESUMED[name]
    _, _, worst, opt, _ = resume_from_package(options, model_cls, width, quantize=False)
    assert worst <= 1e-5
    loss_ref, loss, worst, opt, _ = resume_from_package(options, model_cls, width, quantize=True)
    assert abs(loss - loss_ref) <= 0.01 * loss_ref
    assert worst <= 1e-2
    assert all(float(opt.state[p]["step"]) == 40 for p in opt.state)


def test_full_blocks_keep_the_packages_codes() -> None:
    """A state longer than a block converts code for code: decoding with the package's layout
    and re-encoding with afx's (same block size) reproduces every code."""
    options = dict(factored=False, min_8bit_size=1024, beta1=0.9)
    ref = torch.nn.Parameter(torch.randn(5000))
    opt_ref = Package([ref], use_cuda_kernel=False, **options)
    ref.grad = torch.randn(5000)
    opt_ref.step()
    ours = torch.nn.Parameter(ref.detach().clone())
    opt = afx.Adafactor8Bit([ours], compile=False)
    opt.load_state_dict(saved_and_loaded(opt_ref.state_dict()))
    state, saved = opt.state[ours], opt_ref.state[ref]
    codes = state["elementwise.second_moment.v.codes"].reshape(-1)[:5000]
    assert torch.equal(codes, saved["variance_q"].reshape(-1)[:5000])
    momentum = state["elementwise.momentum.m.codes"].reshape(-1)[:5000]
    assert torch.equal(momentum, saved["m_q"].reshape(-1)[:5000])


@pytest.mark.parametrize("v_quant_type", ["al8", "al16"])
def test_bf16_parameters_keep_integer_codes_and_float32_statistics(v_quant_type: str) -> None:
    """With bf16 parameters, loaded codes stay uint8/int16 and scales, statistics and the step
    stay float32 (torch.optim would cast them to the parameter's dtype)."""
    options = dict(beta1=0.9, min_8bit_size=1024, v_quant_type=v_quant_type, factored=False)
    ref = torch.nn.Parameter(torch.randn(64, 80, dtype=torch.bfloat16))
    opt_ref = Package([ref], use_cuda_kernel=False, **options)
    ref.grad = torch.randn(64, 80, dtype=torch.bfloat16)
    opt_ref.step()
    ours = torch.nn.Parameter(ref.detach().clone())
    opt = afx.Adafactor8Bit([ours], compile=False)
    opt.load_state_dict(saved_and_loaded(opt_ref.state_dict()))
    code_dtype = torch.int16 if v_quant_type == "al16" else torch.uint8
    dtypes = {k: v.dtype for k, v in opt.state[ours].items()}
    assert dtypes["elementwise.second_moment.v.codes"] == code_dtype
    assert dtypes["elementwise.momentum.m.codes"] == torch.uint8
    assert all(d == torch.float32 for k, d in dtypes.items() if not k.endswith("codes"))
    ours.grad = torch.randn_like(ours)
    opt.step()
    assert bool(torch.isfinite(ours.float()).all())


def test_afx_checkpoints_are_not_mistaken_for_the_packages() -> None:
    """Only the package's state dicts take the conversion path."""
    w = torch.nn.Parameter(torch.randn(64, 64))
    opt = afx.Adafactor8Bit([w], compile=False)
    w.grad = torch.randn_like(w)
    opt.step()
    assert not is_package_state_dict(opt.state_dict())
    assert is_package_state_dict(Package([w], use_cuda_kernel=False).state_dict())


def test_a_checkpoint_with_other_groups_is_refused_before_anything_changes() -> None:
    """A package checkpoint of two groups cannot load into a one-group optimizer; the error
    says so and the optimizer's state is untouched."""
    a, b = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))
    package = Package([{"params": [a]}, {"params": [b]}], use_cuda_kernel=False)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    package.step()
    opt = afx.Adafactor8Bit([a, b], compile=False)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[a].items()}
    with pytest.raises(ValueError, match="param groups"):
        opt.load_state_dict(package.state_dict())
    assert all(torch.equal(before[k], v) for k, v in opt.state[a].items())
