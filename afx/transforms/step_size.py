"""Step sizes: learning rate, Adafactor's relative step and parameter scale, and scaling by them.

A :class:`StepSize` is a scalar function of the parameter and the hyperparameters. Step sizes
multiply (``relative_step() * param_rms()`` is Adafactor's ``α_t``), scale updates through
:func:`scale_by_step_size`, and couple weight decay to the step through
:func:`afx.transforms.add_decayed_weights`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from afx.base import (
    NON_NEGATIVE,
    GradientTransformation,
    Hyper,
    Hyperparam,
    hyper_value,
    hyperparams,
    merge_hyperparams,
    stateless,
    step_count,
)
from afx.numerics import hoisted, rms

Tensor = torch.Tensor


class StepSize(NamedTuple):
    """A scalar step size ``fn(param, hyper)`` and the hyperparameters it reads.

    Step sizes multiply with ``*``; the product reads the union of both factors'
    hyperparameters.

    Attributes:
        fn: ``fn(param, hyper) -> factor``, a number or a 0-d tensor; ``param`` may be ``None``
            for step sizes that do not depend on it.
        hyperparams: name -> :class:`afx.Hyperparam` of the hyperparameters ``fn`` reads.

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018:
        its ``α_t = ρ_t · max(ε₂, RMS(X))`` is the product this type expresses.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> alpha = T.learning_rate(0.1) * T.param_rms(1e-3)
        >>> alpha.fn(torch.full((4,), 2.0), {})
        tensor(0.2000)
    """

    fn: Callable[[Tensor | None, Hyper | None], Tensor | float]
    hyperparams: Mapping[str, Hyperparam]

    def __mul__(self, other: StepSize) -> StepSize:  # type: ignore[override]
        left, right = self.fn, other.fn
        specs = merge_hyperparams([self.hyperparams, other.hyperparams])
        return StepSize(lambda p, h: left(p, h) * right(p, h), specs)


def constant(value: float) -> StepSize:
    """A fixed factor, baked into the graph (use it for signs, not for tunable numbers).

    Args:
        value: the factor.

    Returns:
        A :class:`StepSize` without hyperparameters.

    References:
        None; a building block of afx's step sizes.

    Example:
        >>> from afx import transforms as T
        >>> T.constant(-1.0).fn(None, {})
        -1.0
    """
    return StepSize(lambda p, h: value, hyperparams())


def learning_rate(lr: float = 1e-3) -> StepSize:
    """The learning rate as a step size.

    Args:
        lr: default of hyperparameter ``"lr"`` (≥ 0).

    Returns:
        A :class:`StepSize` reading ``hyper["lr"]``.

    References:
        None; the plain learning rate.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> T.learning_rate(0.1).fn(None, {"lr": torch.tensor(0.5)})
        tensor(0.5000)
    """
    return StepSize(lambda p, h: hyper_value(h, "lr", lr), hyperparams(lr=NON_NEGATIVE._replace(
        default=lr)))


def relative_step(warmup_init: bool = False, *, capped_by_lr: bool = False,
                  lr: float = 1e-2) -> StepSize:
    """Adafactor's relative step ``ρ_t = min(1e-2, 1/√t)``, or ``min(1e-6·t, 1/√t)`` with warmup.

    Args:
        warmup_init: grow the cap linearly from ``1e-6`` instead of a constant ``1e-2``.
        capped_by_lr: cap with hyperparameter ``"lr"`` instead: ``min(lr, 1/√t)``
            (adafactor8bit's relative step).
        lr: default of ``"lr"`` when ``capped_by_lr``.

    Returns:
        A :class:`StepSize` reading ``hyper["step"]``.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> T.relative_step().fn(None, {"step": torch.tensor(400.0)})
        tensor(0.0100)

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018.
    """

    def fn(p: Tensor | None, hyper: Hyper | None) -> Tensor:
        t = step_count(hyper)
        if capped_by_lr:
            return torch.clamp(t.rsqrt(), max=hyper_value(hyper, "lr", lr))
        cap = t * 1e-6 if warmup_init else torch.full_like(t, 1e-2)
        return torch.minimum(cap, t.rsqrt())

    if capped_by_lr:
        return StepSize(fn, learning_rate(lr).hyperparams)
    return StepSize(fn, hyperparams())


def param_rms(eps2: float = 1e-3) -> StepSize:
    """Adafactor's parameter scale ``max(eps2, RMS(param))``.

    Args:
        eps2: default of hyperparameter ``"eps2"`` (≥ 0), the floor for near-zero parameters.

    Returns:
        A :class:`StepSize` of the parameter.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> T.param_rms().fn(torch.tensor([3.0, 4.0]), {})
        tensor(3.5355)

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018.
    """

    def fn(p: Tensor | None, hyper: Hyper | None) -> Tensor:
        if p is None:
            raise ValueError("param_rms needs the parameters: pass params to update")
        return torch.clamp(rms(p), min=hyper_value(hyper, "eps2", eps2))

    return StepSize(fn, hyperparams(eps2=NON_NEGATIVE._replace(default=eps2)))


def adam_bias_correction(second_moment: bool = True, beta1: float = 0.9,
                         beta2: float = 0.999) -> StepSize:
    """Adam's bias correction as a step-size factor: ``√(1 − β₂^t) / (1 − β₁^t)``.

    Args:
        second_moment: include the ``√(1 − β₂^t)`` factor (``False``: ``1/(1 − β₁^t)`` only,
            for a second moment that needs no correction).
        beta1: default of hyperparameter ``"beta1"``.
        beta2: default of hyperparameter ``"beta2"``.

    Returns:
        A :class:`StepSize` reading ``hyper["step"]``.

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2015.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> T.adam_bias_correction(beta1=0.5, beta2=0.75).fn(None, {"step": torch.tensor(1.0)})
        tensor(1.)
    """
    specs = {"beta1": Hyperparam(beta1, 0.0, 1.0, high_inclusive=False)}
    if second_moment:
        specs["beta2"] = Hyperparam(beta2, 0.0, 1.0, high_inclusive=False)

    def fn(p: Tensor | None, hyper: Hyper | None) -> Tensor:
        t = step_count(hyper)
        factor = 1.0 / (1.0 - hyper_value(hyper, "beta1", beta1) ** t)
        if second_moment:
            factor = factor * torch.sqrt(1.0 - hyper_value(hyper, "beta2", beta2) ** t)
        return factor

    return StepSize(fn, hyperparams(**specs))


def second_moment_correction(beta2: float = 0.999) -> StepSize:
    """``√(1 − β₂^t)``: Adam's correction of a zero-initialised second moment alone.

    Args:
        beta2: default of hyperparameter ``"beta2"`` (in ``[0, 1)``).

    Returns:
        A :class:`StepSize` reading ``hyper["step"]``.

    References:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", 2015.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> T.second_moment_correction(0.75).fn(None, {"step": torch.tensor(1.0)})
        tensor(0.5000)
    """
    def fn(p: Tensor | None, hyper: Hyper | None) -> Tensor:
        return torch.sqrt(1.0 - hyper_value(hyper, "beta2", beta2) ** step_count(hyper))

    return StepSize(fn, hyperparams(beta2=Hyperparam(beta2, 0.0, 1.0, high_inclusive=False)))


def heavy_ball(beta1: float = 0.9) -> StepSize:
    """``1/(1 − β₁)``: turns an EMA of gradients into the heavy-ball sum ``b ← β₁ b + g``.

    The EMA ``m ← β₁ m + (1 − β₁) g`` equals ``(1 − β₁) b``, so the factor restores
    classical momentum without a second buffer.

    Args:
        beta1: default of hyperparameter ``"beta1"`` (in ``[0, 1)``), the EMA's coefficient.

    Returns:
        A :class:`StepSize` independent of the parameter.

    References:
        Polyak, "Some methods of speeding up the convergence of iteration methods", 1964.

    Example:
        >>> from afx import transforms as T
        >>> T.heavy_ball(0.75).fn(None, {})
        4.0
    """
    return StepSize(lambda p, h: 1.0 / (1.0 - hyper_value(h, "beta1", beta1)),
                    hyperparams(beta1=Hyperparam(beta1, 0.0, 1.0, high_inclusive=False)))


def scale_by_step_size(step_size: StepSize) -> GradientTransformation:
    """Multiplies updates by a step size: ``u ← α(param, hyper) · u``.

    Args:
        step_size: the step size.

    Returns:
        A stateless transformation.

    References:
        Babuschkin et al., "The DeepMind JAX Ecosystem", 2020 (optax): step sizes applied as
        transformations of the update.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> tx = T.scale_by_step_size(T.learning_rate(0.5))
        >>> tx.update(torch.ones(2), tx.init(torch.zeros(2)), None, {"lr": 0.25})[0]
        tensor([0.2500, 0.2500])
    """
    return stateless(lambda u, p, h: u * hoisted(step_size.fn(p, h)), step_size.hyperparams)


def scale(factor: float) -> GradientTransformation:
    """Multiplies updates by a fixed ``factor`` (typically ``-1`` to turn a step into a descent).

    Args:
        factor: the factor, a constant of the compiled graph (not a hyperparameter).

    Returns:
        A stateless transformation.

    References:
        Babuschkin et al., "The DeepMind JAX Ecosystem", 2020 (optax).

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> T.scale(-1.0).update(torch.ones(2), T.scale(-1.0).init(torch.zeros(2)), None)[0]
        tensor([-1., -1.])
    """
    return scale_by_step_size(constant(factor))


def scale_by_learning_rate(lr: float = 1e-3, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiplies updates by ``-lr`` (or ``lr`` with ``flip_sign=False``), as in optax.

    Args:
        lr: hyperparameter ``"lr"`` (≥ 0).
        flip_sign: negate, so that adding the result to the parameters descends.

    Returns:
        A stateless transformation.

    References:
        Babuschkin et al., "The DeepMind JAX Ecosystem", 2020 (optax).

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> tx = T.scale_by_learning_rate(0.1)
        >>> tx.update(torch.ones(2), tx.init(torch.zeros(2)), None)[0]
        tensor([-0.1000, -0.1000])
    """
    alpha = learning_rate(lr)
    return scale_by_step_size(constant(-1.0) * alpha if flip_sign else alpha)


def scale_by_relative_step(warmup_init: bool = False) -> GradientTransformation:
    """Multiplies updates by Adafactor's relative step ``min(1e-2, 1/√t)`` (see
    :func:`relative_step`); needs ``hyper["step"]``.

    Args:
        warmup_init: cap the step at ``1e-6·t`` instead of ``1e-2``.

    Returns:
        A stateless transformation without hyperparameters.

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018.

    Example:
        >>> import torch, afx
        >>> from afx import transforms as T
        >>> tx = afx.count_steps(T.scale_by_relative_step(warmup_init=True))
        >>> tx.update(torch.ones(1), tx.init(torch.zeros(1)), None)[0]
        tensor([1.0000e-06])
    """
    return scale_by_step_size(relative_step(warmup_init))


def scale_by_param_rms(eps2: float = 1e-3) -> GradientTransformation:
    """Multiplies updates by ``max(eps2, RMS(param))`` (Adafactor's ``scale_parameter``).

    Args:
        eps2: default of hyperparameter ``"eps2"`` (≥ 0), the floor for near-zero parameters.

    Returns:
        A stateless transformation; ``update`` needs the params.

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> tx = T.scale_by_param_rms()
        >>> tx.update(torch.ones(2), tx.init(torch.zeros(2)), torch.full((2,), 3.0))[0]
        tensor([3., 3.])
    """
    return scale_by_step_size(param_rms(eps2))
