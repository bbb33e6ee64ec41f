"""Small numeric helpers shared by transforms."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def rms(x: Tensor) -> Tensor:
    """Root mean square of all elements, accumulated in float32: ``‖x‖₂ / √numel``.

    Args:
        x: a tensor of any shape and floating dtype.

    Returns:
        A 0-d float32 tensor (NaN for an empty ``x``).

    References:
        None; a helper shared by the transforms.

    Example:
        >>> import torch
        >>> from afx.numerics import rms
        >>> rms(torch.tensor([3.0, 4.0]))
        tensor(3.5355)
    """
    return x.float().square().mean().sqrt()


def fp32_zeros(shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
    """A float32 zero tensor of ``shape`` on ``like``'s device (states are fp32 whatever the
    parameter's dtype).

    Args:
        shape: the state's shape.
        like: the parameter the state belongs to.

    Returns:
        ``torch.zeros(shape)`` in float32 on ``like.device``.

    References:
        None; a helper of afx's state initialisation.

    Example:
        >>> import torch
        >>> from afx.numerics import fp32_zeros
        >>> fp32_zeros((2,), torch.ones(3, dtype=torch.bfloat16))
        tensor([0., 0.])
    """
    return torch.zeros(shape, dtype=torch.float32, device=like.device)


def factored_rsqrt(row: Tensor, col: Tensor, floor: Tensor | float) -> Tensor:
    """``1/√V̂`` for the factored estimate ``V̂ = row colᵀ / max(mean(row), floor)``.

    Args:
        row: row statistics, shape ``(..., R)``.
        col: column statistics, shape ``(..., C)``.
        floor: lower bound of ``mean(row)``, so an all-zero row statistic stays finite.

    Returns:
        ``1/√V̂`` of shape ``(..., R, C)``; leading dims are independent batches.

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018:
        the factored second-moment estimate.

    Example:
        >>> import torch
        >>> from afx.numerics import factored_rsqrt
        >>> factored_rsqrt(torch.tensor([1.0, 1.0]), torch.tensor([4.0, 16.0]), 1e-30)
        tensor([[0.5000, 0.2500],
                [0.5000, 0.2500]])
    """
    row_mean = torch.clamp(row.mean(dim=-1, keepdim=True), min=floor)
    return hoisted((row / row_mean).rsqrt()).unsqueeze(-1) * hoisted(col.rsqrt()).unsqueeze(-2)


def hoisted(x: Tensor | float) -> Tensor | float:
    """``x`` unchanged, but computed once per call of the compiled step, not once per element.

    Inductor inlines cheap pointwise math on small tensors (a step-size scalar, a row or column
    factor) into every loop that reads the result, and its C++ loops then redo it (``pow``,
    ``sqrt``, float64 divisions) for each vector of 16 elements of the parameter: 1–3 ns per
    element. A reduction is always computed in a loop of its own and stored, so routing the
    small tensor through an ``amax`` over 16 copies (exact for any value, NaN included) makes
    the big loops just load it.

    Args:
        x: a 0-d or small tensor, or a Python number (returned as is).

    Returns:
        ``x``, bit for bit.

    References:
        None; a workaround for how Inductor's C++ backend schedules scalar math.

    Example:
        >>> import torch
        >>> from afx.numerics import hoisted
        >>> hoisted(torch.tensor(0.3, dtype=torch.float64)).item() == 0.3
        True
    """
    if not isinstance(x, Tensor):
        return x
    return x.unsqueeze(-1).expand(*x.shape, 16).amax(dim=-1)


def clip_rms(u: Tensor, d: Tensor | float) -> Tensor:
    """``u / max(1, RMS(u)/d)``; ``d = 0`` leaves ``u`` unchanged.

    Args:
        u: the update.
        d: the clipping threshold (number or 0-d tensor, so a scheduler can change it without
            a recompile).

    Returns:
        ``u`` scaled down so its RMS is at most ``d``.

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018:
        update clipping.

    Example:
        >>> import torch
        >>> from afx.numerics import clip_rms
        >>> clip_rms(torch.tensor([3.0, 4.0]), 1.0), clip_rms(torch.tensor([0.3, 0.4]), 1.0)
        (tensor([0.8485, 1.1314]), tensor([0.3000, 0.4000]))
    """
    denom = torch.clamp(rms(u) / d, min=1.0)
    return u / hoisted(torch.where(torch.as_tensor(d) > 0, denom, torch.ones_like(denom)))
