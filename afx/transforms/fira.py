"""Fira's norm-growth limiter."""

from __future__ import annotations

from typing import NamedTuple

import torch

from afx.base import (
    NON_NEGATIVE,
    GradientTransformation,
    Hyper,
    hyper_value,
    hyperparams,
    merge_hyperparams,
    per_leaf,
)
from afx.numerics import fp32_zeros, hoisted, norm
from afx.sharding import full_numel

Tensor = torch.Tensor


class FiraState(NamedTuple):
    """The previous step's limited update norm ``P`` (0-d float32; 0 before the first step).

    Attributes:
        prev_norm: ``P``; below ``1e-6`` it makes the next step reset the limiter.

    References:
        Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
        Constraint?", 2024.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> tx = T.fira_limit()
        >>> tx.update(torch.tensor([3.0, 4.0]), tx.init(torch.zeros(2)), None, {})[1]
        FiraState(prev_norm=tensor(5.))
    """

    prev_norm: Tensor


def fira_limit(fira_margin: float = 0.01, clip_threshold: float | None = None
               ) -> GradientTransformation:
    """Limits how fast the update norm may grow from one step to the next.

    With ``n = ‖u‖`` and the previous limited norm ``P``:
    ``s = min(1, (1 + m)(P + 1e-8) / n)``, ``u ← s·u``, ``P ← s·n``; if ``P < 1e-6`` (first step,
    or after a collapse) the limiter resets: ``s = 1``, ``P ← n``. A non-finite ``n`` zeroes the
    update (and counts as ``n = 0``).

    Args:
        fira_margin: ``m ≥ 0``, the allowed relative growth per step (hyperparameter
            ``"fira_margin"``).
        clip_threshold: if given, also divide by ``max(1, n/(√N·d))`` computed from the same
            unlimited norm ``n`` (adafactor8bit 0.4.6's order; hyperparameter
            ``"clip_threshold"``, 0 disables). Use this instead of a separate
            :func:`clip_by_rms`, which would measure the already limited update.

    Returns:
        The transformation, state :class:`FiraState` per parameter.

    References:
        Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
        Constraint?", 2024.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> tx = T.fira_limit(0.0)
        >>> state = tx.init(torch.zeros(2))
        >>> u, state = tx.update(torch.tensor([3.0, 4.0]), state, None, {})
        >>> u, _ = tx.update(torch.tensor([6.0, 8.0]), state, None, {})   # norm 10 limited to 5
        >>> u
        tensor([3., 4.])
    """
    specs = hyperparams(fira_margin=NON_NEGATIVE._replace(default=fira_margin))
    if clip_threshold is not None:
        specs = merge_hyperparams([specs, hyperparams(
            clip_threshold=NON_NEGATIVE._replace(default=clip_threshold))])

    def update_leaf(u: Tensor, state: FiraState, p, hyper: Hyper | None):
        u = u.float()
        n = norm(u)
        finite = torch.isfinite(n)
        n = torch.where(finite, n, torch.zeros_like(n))
        u = torch.where(finite, u, torch.zeros_like(u))
        grow = 1.0 + hyper_value(hyper, "fira_margin", fira_margin)
        reset = state.prev_norm < 1e-6
        limiter = torch.clamp(n / (state.prev_norm + 1e-8), min=grow) / grow
        s = torch.where(reset, torch.ones_like(n), 1.0 / limiter)
        prev = torch.where(reset, n, n * s)
        if clip_threshold is not None:
            d = torch.as_tensor(hyper_value(hyper, "clip_threshold", clip_threshold))
            denom = torch.clamp(n / (full_numel(u) ** 0.5 * d), min=1.0)
            s = s / torch.where(d > 0, denom, torch.ones_like(denom))
        u = u * hoisted(s)
        return u, FiraState(prev.float())

    return per_leaf(lambda p: FiraState(fp32_zeros((), p)), update_leaf, specs)
