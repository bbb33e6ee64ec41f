"""Diagonal preconditioners: a second-moment estimate turned into a per-element scale.

A preconditioner computes ``inv ≈ 1/√E[g²]`` from the raw gradient and outputs ``g · inv``, or,
with Adam-style momentum, ``m · inv`` where ``m`` is an EMA of the raw gradient. The momentum has
to live inside the preconditioner because both need the raw gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from afx.base import (
    GradientTransformation,
    Hyper,
    Hyperparam,
    hyper_value,
    merge_hyperparams,
    per_leaf,
)
from afx.numerics import fp32_zeros

Tensor = torch.Tensor
InverseFn = Callable[[Tensor, Any, Tensor | None, Hyper | None], tuple[Tensor, Any]]


class MomentumState(NamedTuple):
    """A second-moment state ``rms`` and the Adam-style momentum ``m`` (EMA of gradients).

    Attributes:
        rms: the preconditioner's own state (e.g. a ``SecondMomentState``).
        m: float32, the parameter's shape.

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2015.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> T.scale_by_rms(momentum=True).init(torch.zeros(2))
        MomentumState(rms=SecondMomentState(v=tensor([0., 0.])), m=tensor([0., 0.]))
    """

    rms: Any
    m: Tensor


def preconditioner(init_leaf: Callable[[Tensor], Any], inverse_leaf: InverseFn,
                   specs: Mapping[str, Hyperparam], *, momentum: bool,
                   beta1: float) -> GradientTransformation:
    """Builds ``u = g · inv`` (or ``m · inv`` with ``m ← lerp(m, g, 1 − β₁)``) per parameter.

    Args:
        init_leaf: ``init_leaf(param) -> second-moment state``.
        inverse_leaf: ``inverse_leaf(g, state, param, hyper) -> (inv, new state)``.
        specs: hyperparameters of ``inverse_leaf``.
        momentum: add Adam-style momentum (hyperparameter ``"beta1"``).
        beta1: default of ``"beta1"``.

    Returns:
        The per-leaf transformation.

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2015: momentum and the
        second moment both estimated from the raw gradient.

    Example:
        >>> import torch
        >>> from afx.base import EmptyState
        >>> from afx.transforms import preconditioner
        >>> sign = preconditioner(lambda p: EmptyState(),
        ...                       lambda g, s, p, h: (1.0 / g.abs().clamp(min=1e-12), s),
        ...                       {}, momentum=False, beta1=0.9)
        >>> sign.update(torch.tensor([-2.0, 0.5]), sign.init(torch.zeros(2)))[0]
        tensor([-1.,  1.])
    """
    if momentum:
        specs = merge_hyperparams([specs, {"beta1": Hyperparam(beta1, 0.0, 1.0,
                                                               high_inclusive=False)}])

    def init(p: Tensor) -> Any:
        return MomentumState(init_leaf(p), fp32_zeros(p.shape, p)) if momentum else init_leaf(p)

    def update(g: Tensor, state: Any, p: Tensor | None, hyper: Hyper | None):
        g = g.float()
        if not momentum:
            inv, state = inverse_leaf(g, state, p, hyper)
            return g * inv, state
        inv, rms = inverse_leaf(g, state.rms, p, hyper)
        m = torch.lerp(state.m, g, 1.0 - hyper_value(hyper, "beta1", beta1))
        return m * inv, MomentumState(rms, m)

    return per_leaf(init, update, specs)
