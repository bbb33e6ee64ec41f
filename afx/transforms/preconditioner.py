"""Diagonal preconditioners: a second-moment estimate turned into a per-element scale.

A preconditioner computes ``inv ≈ 1/√E[g²]`` from the raw gradient and outputs ``g · inv``, or,
with Adam-style momentum, ``m · inv`` where ``m`` is an EMA of the raw gradient. The momentum has
to live inside the preconditioner because both need the raw gradient. It can also clip its
output by RMS, which for a factored ``inv`` a compiled step gets without a pass of its own.
A momentum stored in blocks (:func:`afx.transforms.quantize_state`) can be computed in the
same blocks, so the encoder's block absmax shares its loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from afx.base import (
    NON_NEGATIVE,
    GradientTransformation,
    Hyper,
    Hyperparam,
    hyper_value,
    merge_hyperparams,
    per_leaf,
)
from afx.numerics import blockwise_mean_square, clip_rms, factored_mean_square, fp32_zeros
from afx.transforms.momentum import lerp_momentum, momentum_blocks

Tensor = torch.Tensor
#: ``inverse_leaf(g, state, param, hyper) -> (inv, new state)``; ``inv`` is a tensor or, for a
#: factored estimate, a pair ``(row part, column part)`` whose product is ``inv``.
InverseFn = Callable[[Tensor, Any, Tensor | None, Hyper | None],
                     tuple[Tensor | tuple[Tensor, Tensor], Any]]


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
                   beta1: float, clip_threshold: float | None = None,
                   momentum_block: int | None = None) -> GradientTransformation:
    """Builds ``u = g · inv`` (or ``m · inv`` with ``m ← lerp(m, g, 1 − β₁)``) per parameter.

    With ``clip_threshold`` ``d``, the output is then clipped like :func:`clip_by_rms` does:
    ``u ← u / max(1, RMS(u)/d)``. For a factored ``inv = r cᵀ`` without momentum, a compiled
    step takes ``RMS(u)² = mean_j(c_j² mean_i(g²_ij r_i²))`` from a sum down the columns of
    ``g`` that fuses with the second moment's own, instead of a loop over ``u`` (equal up to
    rounding; eager steps compute ``RMS(u)`` directly).

    With ``momentum_block`` ``B`` (the block length the momentum is encoded in) and a matrix
    whose row length ``B`` divides, a compiled step computes ``m`` and the clip's mean square
    block by block (:func:`afx.transforms.momentum.lerp_momentum`): ``m``'s loop then also
    takes the encoder's block absmax and ``RMS(u)``, one pass over memory fewer. The momentum
    is the same bits either way; the mean square is equal up to rounding.

    Args:
        init_leaf: ``init_leaf(param) -> second-moment state``.
        inverse_leaf: ``inverse_leaf(g, state, param, hyper) -> (inv, new state)``, ``inv`` a
            tensor or a factored pair (see :data:`InverseFn`).
        specs: hyperparameters of ``inverse_leaf``.
        momentum: add Adam-style momentum (hyperparameter ``"beta1"``).
        beta1: default of ``"beta1"``.
        clip_threshold: if given, clip the output by RMS (hyperparameter
            ``"clip_threshold"``, ``d ≥ 0``; ``d = 0`` disables clipping).
        momentum_block: the block length of the momentum's codec, if it is block-encoded.

    Returns:
        The per-leaf transformation.

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2015: momentum and the
        second moment both estimated from the raw gradient. Shazeer & Stern, "Adafactor:
        Adaptive Learning Rates with Sublinear Memory Cost", 2018: update clipping.

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
    extra = {}
    if momentum:
        extra["beta1"] = Hyperparam(beta1, 0.0, 1.0, high_inclusive=False)
    if clip_threshold is not None:
        extra["clip_threshold"] = NON_NEGATIVE._replace(default=clip_threshold)
    if extra:
        specs = merge_hyperparams([specs, extra])

    def init(p: Tensor) -> Any:
        return MomentumState(init_leaf(p), fp32_zeros(p.shape, p)) if momentum else init_leaf(p)

    def update(g: Tensor, state: Any, p: Tensor | None, hyper: Hyper | None):
        g = g.float()
        inv, rms = inverse_leaf(g, state.rms if momentum else state, p, hyper)
        parts = inv if isinstance(inv, tuple) else None
        if parts is not None:
            inv = parts[0] * parts[1]
        blocks = momentum_blocks(g, momentum_block) if momentum else None
        if momentum:
            x = lerp_momentum(state.m, g, 1.0 - hyper_value(hyper, "beta1", beta1), blocks)
            state = MomentumState(rms, x)
        else:
            x, state = g, rms
        u = x * inv
        if clip_threshold is None:
            return u, state
        # With momentum, u = m·r·c: the column sums would have to read m as well, so they
        # would cost as much as the plain mean square of u.
        from_columns = parts is not None and not momentum and torch.compiler.is_compiling()
        mean_square = (factored_mean_square(g, *parts) if from_columns
                       else blockwise_mean_square(u, blocks) if blocks else None)
        return clip_rms(u, hyper_value(hyper, "clip_threshold", clip_threshold),
                        mean_square=mean_square), state

    return per_leaf(init, update, specs)
