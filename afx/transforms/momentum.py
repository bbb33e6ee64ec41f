"""Exponential moving average of updates (momentum)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from afx.base import GradientTransformation, Hyperparam, hyper_value, hyperparams, per_leaf
from afx.numerics import fp32_zeros, row_blocks

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


def momentum_blocks(x: Tensor, block: int | None) -> int | None:
    """``block`` if a compiled step should compute ``x``'s momentum in blocks, else ``None``.

    That is when the momentum is block-encoded (``block`` is its codec's block length), ``x``
    is a matrix whose row length ``block`` divides, and the step is being compiled: see
    :func:`lerp_momentum`.

    Example:
        >>> import torch
        >>> from afx.transforms.momentum import momentum_blocks
        >>> momentum_blocks(torch.zeros(4, 512), 256) is None  # eager
        True
    """
    fits = block is not None and x.ndim == 2 and x.shape[-1] % block == 0
    return block if fits and torch.compiler.is_compiling() else None


def lerp_momentum(m: Tensor, x: Tensor, weight: Any, block: int | None = None) -> Tensor:
    """``lerp(m, x, weight)``, the new momentum; with ``block``, created in row blocks.

    A compiled step stores the new momentum in the shape it is created in, and Inductor puts
    reductions in one loop only if they run over the same shape. Created as
    :func:`afx.numerics.row_blocks` of the codec's block length, the momentum's loop is also
    the loop of its encoder's block absmax (and of any sum taken over the same blocks), one
    pass over memory fewer than computing it as a matrix. The values are the same bits.

    Args:
        m: the momentum, shape of ``x``.
        x: what it averages (gradient or update).
        weight: ``1 − β₁``.
        block: ``None``, or a block length that divides ``x``'s rows (:func:`momentum_blocks`).

    Returns:
        The new momentum, shape of ``x``.

    References:
        Polyak, "Some methods of speeding up the convergence of iteration methods", 1964.

    Example:
        >>> import torch
        >>> from afx.transforms.momentum import lerp_momentum
        >>> lerp_momentum(torch.zeros(1, 4), torch.ones(1, 4), 0.25, block=2)
        tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
    """
    if block is None:
        return torch.lerp(m, x, weight)
    return torch.lerp(row_blocks(m, block), row_blocks(x, block), weight).view(x.shape)


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
