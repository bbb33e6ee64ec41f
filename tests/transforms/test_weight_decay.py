"""add_decayed_weights: decoupled (λp) and coupled to a step size (λαp)."""

from __future__ import annotations

import torch

from afx import transforms as T


def test_decoupled_and_coupled_decay() -> None:
    """u + λp without a step size; u + λ·α(p)·p with one."""
    p = torch.tensor([2.0, -4.0])
    u = torch.tensor([1.0, 1.0])
    plain, _ = T.add_decayed_weights(0.1).update(u, None, p, {})
    torch.testing.assert_close(plain, u + 0.1 * p)
    coupled = T.add_decayed_weights(0.1, T.learning_rate(0.5) * T.param_rms())
    out, _ = coupled.update(u, None, p, {"weight_decay": torch.tensor(0.2)})
    rms = (p.square().mean()).sqrt()
    torch.testing.assert_close(out, u + 0.2 * 0.5 * rms * p)


def test_bf16_parameters_decay_in_float32() -> None:
    """The decay term is computed in float32 even for bf16 parameters."""
    p = torch.tensor([3.0], dtype=torch.bfloat16)
    out, _ = T.add_decayed_weights(1e-3).update(torch.zeros(1), None, p, {})
    assert out.dtype == torch.float32 and out.item() == torch.tensor(3e-3).item()
