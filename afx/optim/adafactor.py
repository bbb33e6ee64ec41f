"""``afx.Adafactor``: transformers' Adafactor, step for step, as a compiled afx chain."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from afx.base import GradientTransformation
from afx.combine import named_chain
from afx.optim.optimizer import Optimizer
from afx.transforms import (
    add_decayed_weights,
    ema,
    learning_rate,
    param_rms,
    relative_step,
    scale,
    scale_by_factored_rms,
    scale_by_step_size,
)


def _check_options(lr: Any, relative_step: bool, warmup_init: bool) -> None:
    # The same two conditions, and the same exception type, as transformers' constructor.
    if lr is not None and relative_step:
        raise ValueError(f"lr={lr!r} cannot be combined with relative_step=True: pass lr=None for "
                         "the relative step size, or relative_step=False for a manual lr")
    if warmup_init and not relative_step:
        raise ValueError("warmup_init=True needs relative_step=True")


def adafactor(group: Mapping[str, Any]) -> GradientTransformation:
    """The Adafactor chain for one param group with transformers' options.

    Per parameter, with ``α_t = ρ_t · max(eps2, RMS(p))`` (``ρ_t = min(1e-2, 1/√t)``, or
    ``min(1e-6 t, 1/√t)`` with ``warmup_init``, or ``lr``; the RMS factor only with
    ``scale_parameter``): ``u = clip_d(g / √V̂) · α_t``; with ``beta1``, ``u ← EMA_β₁(u)``;
    ``p ← p − u − λ α_t p``.

    Args:
        group: a param group with transformers' Adafactor options.

    Returns:
        The chain (state names ``rms.v_row``, ``rms.v_col`` or ``rms.v``, ``momentum.m``).

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018.

    Example:
        >>> import afx
        >>> tx = afx.optim.adafactor(dict(lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0,
        ...     decay_rate=-0.8, beta1=None, weight_decay=0.0, scale_parameter=True,
        ...     relative_step=True, warmup_init=False))
        >>> sorted(tx.hyperparams)
        ['clip_threshold', 'decay_rate', 'eps1', 'eps2', 'weight_decay']
    """
    _check_options(group["lr"], group["relative_step"], group["warmup_init"])
    if group["lr"] is None and not group["relative_step"]:
        # transformers only fails at its first step on this; afx when the group is added.
        raise ValueError("lr=None needs relative_step=True: give an lr or use the relative step")
    eps = group["eps"]
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"Invalid eps: {eps!r} (expected a pair (eps1, eps2))")
    alpha = relative_step(group["warmup_init"]) if group["relative_step"] else learning_rate(
        group["lr"])
    if group["scale_parameter"]:
        alpha = alpha * param_rms(eps[1])
    parts = [
        # Clipping inside the second moment lets a compiled step take RMS(u) from the loop
        # of its column statistics (see afx.transforms.preconditioner).
        ("rms", scale_by_factored_rms(group["decay_rate"], eps[0],
                                      clip_threshold=group["clip_threshold"])),
        ("step_size", scale_by_step_size(alpha)),
    ]
    if group["beta1"] is not None:
        parts.append(("momentum", ema(group["beta1"])))
    parts += [("weight_decay", add_decayed_weights(group["weight_decay"], alpha)),
              ("descent", scale(-1.0))]
    return named_chain(*parts)


class Adafactor(Optimizer):
    """transformers' Adafactor with the same signature, defaults, numbers and checkpoints.

    A checkpoint of either loads into the other and training continues: the per-parameter
    state uses transformers' names (``step``, ``exp_avg_sq_row``, ``exp_avg_sq_col``,
    ``exp_avg_sq``, ``exp_avg``). Unlike transformers, options are validated for every param
    group (negative ``lr``, ``eps``, ``weight_decay`` or ``clip_threshold`` and ``beta1``
    outside [0, 1) raise), before any state or parameter changes, and the states are float32
    whatever the parameter's dtype.

    Args:
        params: parameters or param groups.
        lr: external learning rate; must be ``None`` when ``relative_step`` is true.
        eps: ``(eps1, eps2)``: added to ``g²``; floor of the parameter scale.
        clip_threshold: update RMS threshold ``d`` (0 disables clipping).
        decay_rate: exponent ``c`` of the second-moment weight ``t^c``.
        beta1: momentum coefficient, or ``None`` for no momentum.
        weight_decay: ``λ``, coupled to the step size ``α_t``.
        scale_parameter: multiply the step size by ``max(eps2, RMS(p))``.
        relative_step: step size ``min(1e-2, 1/√t)`` instead of ``lr``.
        warmup_init: relative step ``min(1e-6·t, 1/√t)``.
        compile: see :class:`afx.optim.Optimizer`.
        atomic: undo a step that raises completely, at the cost of a copy of the parameters
            and state during each step; see :class:`afx.optim.Optimizer`.

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018.

    Example:
        >>> import torch, afx
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = afx.Adafactor(model.parameters(), compile=False)
        >>> model(torch.randn(2, 4)).sum().backward()
        >>> opt.step()
        >>> sorted(opt.state[model.weight])
        ['exp_avg_sq_col', 'exp_avg_sq_row', 'step']
    """

    state_key_names: Mapping[str, str] = MappingProxyType({
        "rms.v_row": "exp_avg_sq_row", "rms.v_col": "exp_avg_sq_col", "rms.v": "exp_avg_sq",
        "momentum.m": "exp_avg"})
    option_names = MappingProxyType({"eps1": "eps[0]", "eps2": "eps[1]"})
    precompile = True  # the chain is afx's, built from the static options

    def __init__(self, params: Iterable, lr: float | None = None,
                 eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, beta1: float | None = None, weight_decay: float = 0.0,
                 scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False, *, compile: bool | dict = True,
                 atomic: bool = False) -> None:
        _check_options(lr, relative_step, warmup_init)
        super().__init__(params, adafactor, compile=compile, atomic=atomic, lr=lr, eps=eps,
                         clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
                         weight_decay=weight_decay, scale_parameter=scale_parameter,
                         relative_step=relative_step, warmup_init=warmup_init)

    def hyper_values(self, group: Mapping[str, Any]) -> Mapping[str, Any]:
        eps1, eps2 = group["eps"]
        return {**group, "eps1": eps1, "eps2": eps2}
