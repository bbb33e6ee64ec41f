"""Small numeric helpers shared by transforms."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def rms(x: Tensor) -> Tensor:
    """Root mean square of all elements, accumulated in float32: ``‖x‖₂ / √numel``."""
    return x.float().square().mean().sqrt()


def fp32_zeros(shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
    """A float32 zero tensor of ``shape`` on ``like``'s device (states are fp32 whatever the
    parameter's dtype)."""
    return torch.zeros(shape, dtype=torch.float32, device=like.device)


def factored_rsqrt(row: Tensor, col: Tensor, floor: Tensor | float) -> Tensor:
    """``1/√V̂`` for the factored estimate ``V̂ = row colᵀ / max(mean(row), floor)``.

    ``row`` has shape ``(..., R)`` and ``col`` ``(..., C)``; the result ``(..., R, C)``.
    """
    row_mean = torch.clamp(row.mean(dim=-1, keepdim=True), min=floor)
    return (row / row_mean).rsqrt().unsqueeze(-1) * col.rsqrt().unsqueeze(-2)


def clip_rms(u: Tensor, d: Tensor | float) -> Tensor:
    """``u / max(1, RMS(u)/d)``; ``d = 0`` leaves ``u`` unchanged."""
    denom = torch.clamp(rms(u) / d, min=1.0)
    return u / torch.where(torch.as_tensor(d) > 0, denom, torch.ones_like(denom))
