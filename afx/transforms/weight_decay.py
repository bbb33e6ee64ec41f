"""Weight decay added to the update."""

from __future__ import annotations

import torch

from afx.base import (
    NON_NEGATIVE,
    GradientTransformation,
    hyper_value,
    hyperparams,
    merge_hyperparams,
    stateless,
)
from afx.numerics import hoisted
from afx.transforms.step_size import StepSize

Tensor = torch.Tensor


def add_decayed_weights(weight_decay: float = 0.0,
                        step_size: StepSize | None = None) -> GradientTransformation:
    """Adds ``λ · α · param`` to the update.

    Without ``step_size`` (``α = 1``) place it before the learning-rate scaling, as in AdamW's
    decoupled decay. With ``step_size`` the decay is coupled to that step size wherever the
    transform sits: Adafactor adds ``λ α_t p`` after its momentum, with ``α_t`` the relative
    step times the parameter scale.

    Args:
        weight_decay: ``λ ≥ 0``, hyperparameter ``"weight_decay"``.
        step_size: optional step size ``α`` multiplying the decay.

    Returns:
        A stateless transformation.

    References:
        Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> tx = T.add_decayed_weights(0.1, T.learning_rate(0.5))
        >>> tx.update(torch.zeros(2), tx.init(torch.ones(2)), torch.ones(2))[0]
        tensor([0.0500, 0.0500])
    """
    specs = merge_hyperparams([
        hyperparams(weight_decay=NON_NEGATIVE._replace(default=weight_decay)),
        step_size.hyperparams if step_size is not None else {},
    ])

    def decay(u: Tensor, p: Tensor | None, hyper) -> Tensor:
        if p is None:
            raise ValueError("add_decayed_weights needs the parameters: pass params to update")
        lam = hyper_value(hyper, "weight_decay", weight_decay)
        if step_size is not None:
            lam = lam * step_size.fn(p, hyper)
        return u + hoisted(lam) * p.float()

    return stateless(decay, specs)
