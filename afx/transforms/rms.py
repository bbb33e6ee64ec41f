"""Adam's second-moment denominator ``√V + ε``."""

from __future__ import annotations

from typing import NamedTuple

import torch

from afx.base import (
    NON_NEGATIVE,
    GradientTransformation,
    Hyper,
    Hyperparam,
    hyper_value,
    hyperparams,
    step_count,
)
from afx.numerics import fp32_zeros, hoisted
from afx.transforms.preconditioner import preconditioner

Tensor = torch.Tensor


class SecondMomentState(NamedTuple):
    """Element-wise EMA ``v`` of ``g²`` (float32, the parameter's shape).

    Attributes:
        v: Adam's second moment, zero after ``init`` and not bias-corrected.

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2015.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> T.scale_by_rms().init(torch.zeros(2))
        SecondMomentState(v=tensor([0., 0.]))
    """

    v: Tensor


def scale_by_rms(beta2: float = 0.999, eps1: float = 1e-8, *, eps_correction: bool = False,
                 momentum: bool = False, beta1: float = 0.9) -> GradientTransformation:
    """Divides updates by Adam's denominator: ``u = g / (√V + ε)``, ``V ← lerp(V, g², 1 − β₂)``.

    With ``momentum`` the numerator is Adam's first moment ``m ← lerp(m, g, 1 − β₁)``. Neither
    moment is bias-corrected here; with ``eps_correction`` the epsilon becomes
    ``ε·√(1 − β₂^t)`` so that multiplying the step by :func:`adam_bias_correction` gives exactly
    Adam's ``m̂ / (√v̂ + ε)``.

    Args:
        beta2: ``β₂ ∈ [0, 1)``, hyperparameter ``"beta2"``.
        eps1: ``ε ≥ 0``, hyperparameter ``"eps1"``.
        eps_correction: scale ``ε`` by ``√(1 − β₂^t)`` (needs ``hyper["step"]``).
        momentum: precondition the EMA of the gradient.
        beta1: default of hyperparameter ``"beta1"`` when ``momentum``.

    Returns:
        The transformation.

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2015;
        Tieleman & Hinton, "RMSProp", lecture notes, 2012.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> tx = T.scale_by_rms(beta2=0.75, eps1=0.0)
        >>> u, state = tx.update(torch.tensor([2.0]), tx.init(torch.zeros(1)), None, {})
        >>> u, state.v
        (tensor([2.]), tensor([1.]))
    """
    specs = hyperparams(beta2=Hyperparam(beta2, 0.0, 1.0, high_inclusive=False),
                        eps1=NON_NEGATIVE._replace(default=eps1))

    def inverse_leaf(g: Tensor, state: SecondMomentState, p, hyper: Hyper | None):
        b2 = hyper_value(hyper, "beta2", beta2)
        v = torch.lerp(state.v, g.square(), 1.0 - b2)
        eps = hyper_value(hyper, "eps1", eps1)
        if eps_correction:
            eps = hoisted(eps * torch.sqrt(1.0 - b2 ** step_count(hyper)))
        return 1.0 / (v.sqrt() + eps), SecondMomentState(v)

    return preconditioner(lambda p: SecondMomentState(fp32_zeros(p.shape, p)), inverse_leaf,
                          specs, momentum=momentum, beta1=beta1)
