"""Adafactor's second-moment estimate: factored over the last two dims, element-wise otherwise."""

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
from afx.numerics import factored_rsqrt_parts, fp32_zeros, full_mean, hoisted
from afx.sharding import full_shape
from afx.transforms.preconditioner import preconditioner

Tensor = torch.Tensor
FLT_MIN = torch.finfo(torch.float32).tiny


class FactoredRmsState(NamedTuple):
    """Row and column EMAs of ``g² + eps1`` for a tensor of shape ``(..., R, C)``.

    Attributes:
        v_row: shape ``(..., R)``, the EMA of the mean over columns.
        v_col: shape ``(..., C)``, the EMA of the mean over rows.

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> T.scale_by_factored_rms().init(torch.zeros(4, 3))
        FactoredRmsState(v_row=tensor([0., 0., 0., 0.]), v_col=tensor([0., 0., 0.]))
    """

    v_row: Tensor
    v_col: Tensor


class RmsState(NamedTuple):
    """Element-wise EMA ``v`` of ``g² + eps1`` (tensors with fewer than two dims).

    Attributes:
        v: float32, the parameter's shape.

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> T.scale_by_factored_rms().init(torch.zeros(3))
        RmsState(v=tensor([0., 0., 0.]))
    """

    v: Tensor


def scale_by_factored_rms(
    decay_rate: float = -0.8,
    eps1: float = 1e-30,
    *,
    beta2: float | None = None,
    factored: bool = True,
    bias_correction: bool = False,
    momentum: bool = False,
    beta1: float = 0.9,
    clip_threshold: float | None = None,
    momentum_block: int | None = None,
) -> GradientTransformation:
    """Divides updates by Adafactor's estimate of the root mean square of the gradient.

    With ``G = g² + eps1`` and the new-value weight ``w_t = t^decay_rate`` (or ``1 − beta2``):

    * tensors with at least two dims (if ``factored``), shape ``(..., R, C)``:
      ``R_t = (1 − w_t) R_{t−1} + w_t mean_C(G)``, ``C_t = (1 − w_t) C_{t−1} + w_t mean_R(G)``,
      ``V̂ = R_t C_tᵀ / max(mean(R_t), eps1)`` (leading dims are independent batches);
    * other tensors: ``V_t = (1 − w_t) V_{t−1} + w_t G``, ``V̂ = max(V_t, eps1², 2^-126)``;
    * output ``u = g / √V̂`` (or ``m / √V̂`` with Adam-style ``momentum``, ``m`` the EMA of ``g``
      with ``beta1``); with ``bias_correction`` (fixed ``beta2`` only) ``V̂`` is divided by
      ``1 − beta2^t``;
    * with ``clip_threshold`` ``d``: ``u ← u / max(1, RMS(u)/d)``, :func:`clip_by_rms` inside
      the transform, so a compiled step gets ``RMS(u)`` of a factored ``u`` from the loop
      that sums ``G`` down the columns (see :func:`afx.transforms.preconditioner`).

    The two floors only act where ``eps1`` is below the float32 range or zero; with
    transformers' default they never change a value.

    Args:
        decay_rate: exponent ``c ≤ 0`` of the schedule ``w_t = t^c`` (hyperparameter
            ``"decay_rate"``); ``w_1 = 1``, so the first estimate is the first gradient's.
        eps1: added to ``g²`` (hyperparameter ``"eps1"``).
        beta2: if given, a fixed EMA coefficient (hyperparameter ``"beta2"``) replacing the
            schedule.
        factored: factor tensors with two or more dims; ``False`` keeps a full ``V`` for all.
        bias_correction: divide by ``1 − beta2^t`` (needs ``beta2``).
        momentum: precondition an EMA of the gradient (adafactor8bit's factored momentum).
        beta1: default of hyperparameter ``"beta1"`` when ``momentum``.
        clip_threshold: if given, clip the output by RMS (hyperparameter
            ``"clip_threshold"``; 0 disables clipping).
        momentum_block: the block length the momentum is encoded in, if it is (a layout
            hint for compiled steps, see :func:`afx.transforms.preconditioner`).

    Returns:
        The transformation; needs ``hyper["step"]`` (see :func:`afx.count_steps`).

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018.

    Example:
        >>> import torch, afx
        >>> from afx import transforms as T
        >>> tx = afx.count_steps(T.scale_by_factored_rms())
        >>> g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> u, state = tx.update(g, tx.init(g), g, {})
        >>> state.inner.v_row, state.inner.v_col
        (tensor([ 2.5000, 12.5000]), tensor([ 5., 10.]))
    """
    if bias_correction and beta2 is None:
        raise ValueError("scale_by_factored_rms: bias_correction=True needs a fixed beta2")
    specs = {"eps1": NON_NEGATIVE._replace(default=eps1)}
    if beta2 is None:
        specs["decay_rate"] = Hyperparam(decay_rate, high=0.0)
    else:
        specs["beta2"] = Hyperparam(beta2, 0.0, 1.0, high_inclusive=False)

    def init_leaf(p: Tensor):
        if factored and p.ndim >= 2:
            # Whole statistics even for a sharded parameter: they are small, and kept the
            # same on every rank (see afx.sharding).
            shape = full_shape(p)
            return FactoredRmsState(fp32_zeros(shape[:-1], p),
                                    fp32_zeros(shape[:-2] + shape[-1:], p))
        return RmsState(fp32_zeros(p.shape, p))

    def inverse_leaf(g: Tensor, state, p: Tensor | None, hyper: Hyper | None):
        t = step_count(hyper)
        if beta2 is None:
            weight = t ** hyper_value(hyper, "decay_rate", decay_rate)
        else:
            weight = 1.0 - hyper_value(hyper, "beta2", beta2)
        weight = hoisted(weight)
        e1 = hyper_value(hyper, "eps1", eps1)
        sq = g.square() + e1
        correction = hoisted(1.0 - (1.0 - weight) ** t) if bias_correction else None
        if isinstance(state, FactoredRmsState):
            v_row = torch.lerp(state.v_row, full_mean(sq, -1), weight)
            v_col = torch.lerp(state.v_col, full_mean(sq, -2, cheap=True), weight)
            col = v_col if correction is None else v_col / correction
            return factored_rsqrt_parts(v_row, col, e1), FactoredRmsState(v_row, v_col)
        v = torch.lerp(state.v, sq, weight)
        v_hat = v if correction is None else v / correction
        floor = torch.clamp(torch.as_tensor(e1) ** 2, min=FLT_MIN)
        return torch.maximum(v_hat, floor).rsqrt(), RmsState(v)

    return preconditioner(init_leaf, inverse_leaf, hyperparams(**specs), momentum=momentum,
                          beta1=beta1, clip_threshold=clip_threshold,
                          momentum_block=momentum_block)
