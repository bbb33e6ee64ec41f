"""quantize_state: encoded storage inside the (compiled) step, sized by each state's own size."""

from __future__ import annotations

import copy
import io

import torch

import afx
from afx import transforms as T


class Wide(torch.nn.Module):
    """A 64x128 weight (its full V and M are worth encoding) and a 1-D bias (too small)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter((0.1 * torch.randn(64, 128, generator=g)).to(dtype))
        self.bias = torch.nn.Parameter(torch.zeros(128, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.weight.dtype) @ self.weight.T
        return (torch.tanh(h) * self.bias[:64]).sum() + h.square().mean()


def chain(quantized: bool) -> afx.GradientTransformation:
    inner = afx.chain(T.scale_by_factored_rms(factored=False), T.ema(0.9))
    if quantized:
        inner = T.quantize_state(inner, {"v": ("al8", 256), "m": ("uf8", 256)})
    return afx.chain(inner, T.clip_by_rms(1.0), T.scale_by_learning_rate(1e-2))


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 128, generator=gen)).float().backward()
        opt.step()


def state_bytes(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    return sum(v.numel() * v.element_size() for v in opt.state[p].values())


def test_only_states_worth_encoding_are_encoded() -> None:
    """The 8192-element V and M are 8-bit codes; the 128-element bias states stay float32."""
    m = Wide()
    opt = afx.optim.Optimizer(m.parameters(), chain(True), compile=False)
    train(m, opt, 1)
    assert opt.state[m.weight]["0.0.v.codes"].dtype == torch.uint8
    assert opt.state[m.weight]["0.1.m.codes"].dtype == torch.uint8
    assert opt.state[m.bias]["0.0.v"].dtype == torch.float32
    assert state_bytes(opt, m.weight) < 2 * 8192 * 1.1  # ≈ 2 bytes per parameter, not 8
    assert state_bytes(opt, m.bias) == 2 * 128 * 4 + 4  # float32 V and M, and the step


def test_quantized_training_tracks_float32_training() -> None:
    """After 30 steps, 8-bit states move the weights like float32 states (within 2%)."""
    a, b, start = Wide(), Wide(), Wide()
    train(a, afx.optim.Optimizer(a.parameters(), chain(False), compile=False), 30)
    train(b, afx.optim.Optimizer(b.parameters(), chain(True), compile=False), 30)
    moved = (a.weight - start.weight).norm()
    assert (b.weight - a.weight).norm() / moved < 0.02


def test_compiled_equals_eager_and_never_recompiles() -> None:
    """decode → update → encode compile into the bucket graph with no recompiles.

    Inductor's fused log2/exp2 may differ from eager's by an ulp, which moves a value sitting on
    a code boundary to the neighbouring code: a handful of elements may differ by one code level
    (≤ lr · a fraction of the update), all others agree to float32 rounding.
    """
    a, b = Wide(), Wide()
    train(a, afx.optim.Optimizer(a.parameters(), chain(True), compile=False), 6)
    opt = afx.optim.Optimizer(b.parameters(), chain(True), compile=True)
    train(b, opt, 1)
    with torch.compiler.set_stance("fail_on_recompile"):
        gen = torch.Generator().manual_seed(0)
        torch.randn(16, 128, generator=gen)  # the batch of the first step
        for _ in range(5):
            opt.zero_grad()
            b(torch.randn(16, 128, generator=gen)).backward()
            opt.step()
    close = torch.isclose(b.weight, a.weight, rtol=1e-5, atol=1e-7)
    assert close.float().mean() >= 0.999
    assert (b.weight - a.weight).abs().max() <= 1e-4


def test_checkpoint_keeps_codes_for_bf16_parameters() -> None:
    """uint8 codes and float32 scales survive save/load with bf16 params, bit for bit."""
    m = Wide(torch.bfloat16)
    opt = afx.optim.Optimizer(m.parameters(), chain(True), compile=False)
    train(m, opt, 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    m2 = copy.deepcopy(m)
    opt2 = afx.optim.Optimizer(m2.parameters(), chain(True), compile=False)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for key, value in opt.state[m.weight].items():
        assert opt2.state[m2.weight][key].dtype == value.dtype
        assert torch.equal(opt2.state[m2.weight][key], value)
    train(m, opt, 2, seed=9)
    train(m2, opt2, 2, seed=9)
    assert torch.equal(m.weight, m2.weight)
