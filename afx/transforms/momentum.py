"""Exponential moving average of updates (momentum)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from afx.base import GradientTransformation, Hyperparam, hyper_value, hyperparams, per_leaf
from afx.numerics import fp32_zeros

Tensor = torch.Tensor


class EmaState(NamedTuple):
    """The moving average ``m`` (float32, the parameter's shape).

    Attributes:
        m: the EMA of the updates, zero after ``init``.

    References:
        Polyak, "Some methods of speeding up the convergence of iteration methods", 1964.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> T.ema().init(torch.zeros(2))
        EmaState(m=tensor([0., 0.]))
    """

    m: Tensor


def ema(beta1: float = 0.9) -> GradientTransformation:
    """Replaces updates by their exponential moving average: ``m ← β₁ m + (1 − β₁) u; u ← m``.

    Where it sits in a chain decides the flavour of momentum: first (an EMA of gradients) is
    Adam-style; after the step size (an EMA of scaled, clipped updates) is Adafactor-style.

    Args:
        beta1: ``β₁ ∈ [0, 1)``, hyperparameter ``"beta1"``.

    Returns:
        The transformation, state :class:`EmaState` (zero-initialised, no bias correction).

    References:
        Polyak, "Some methods of speeding up the convergence of iteration methods", 1964;
        Shazeer & Stern, "Adafactor", 2018 (section 6, momentum on the scaled update).

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> tx = T.ema(0.5)
        >>> u, state = tx.update(torch.ones(2), tx.init(torch.zeros(2)), None)
        >>> u, state.m
        (tensor([0.5000, 0.5000]), tensor([0.5000, 0.5000]))
    """

    def update_leaf(u: Tensor, state: EmaState, p, hyper):
        m = torch.lerp(state.m, u.float(), 1.0 - hyper_value(hyper, "beta1", beta1))
        return m, EmaState(m)

    return per_leaf(lambda p: EmaState(fp32_zeros(p.shape, p)), update_leaf,
                    hyperparams(beta1=Hyperparam(beta1, 0.0, 1.0, high_inclusive=False)))
