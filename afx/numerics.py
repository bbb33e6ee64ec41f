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
