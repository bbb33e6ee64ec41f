"""Core types: gradient transformations, their hyperparameters and the per-leaf lifting helper.

A :class:`GradientTransformation` is a pair of pure functions, as in optax::

    state = tx.init(params)
    updates, state = tx.update(updates, state, params, hyper)

``hyper`` maps hyperparameter names to 0-d tensors (or Python numbers). Every number a user or a
scheduler may change is read from it, so changing one never changes the traced graph. The
``"step"`` entry is the 1-based step count of the update being computed; :func:`count_steps`
maintains it for functional users and the :class:`afx.optim.Optimizer` adapter uses it too.

Each transform also declares its hyperparameters (:class:`Hyperparam`: default and valid range) so
the adapter can seed ``param_groups`` with them, validate what schedulers and users write there, and
mirror them into the compiled graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import optree
import torch

Tensor = torch.Tensor
PyTree = Any
Hyper = Mapping[str, Any]
Scalar = Tensor | float


class Hyperparam(NamedTuple):
    """A numeric hyperparameter of a transform: its default and its valid interval.

    Args:
        default: value used when neither the caller nor the param group provides one.
        low: smallest valid value (inclusive).
        high: largest valid value.
        high_inclusive: whether ``high`` itself is valid (``False`` for EMA coefficients in [0, 1)).

    Example:
        >>> import afx
        >>> afx.Hyperparam(0.9, 0.0, 1.0, high_inclusive=False).check("beta1", 0.95)
    """

    default: float
    low: float = -math.inf
    high: float = math.inf
    high_inclusive: bool = True

    def interval(self) -> str:
        """Returns the valid interval in mathematical notation, e.g. ``[0, 1)``."""
        close = "]" if self.high_inclusive else ")"
        low = "(-inf" if self.low == -math.inf else f"[{self.low:g}"
        high = "inf)" if self.high == math.inf else f"{self.high:g}{close}"
        return f"{low}, {high}"

    def check(self, name: str, value: Any) -> None:
        """Raises ``ValueError`` naming ``name`` and ``value`` if ``value`` is not valid.

        Tensor values are checked only for their shape (one element): reading their value would
        synchronise with the device.
        """
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"Invalid {name}: a tensor {name} must have one element, got "
                                 f"shape {tuple(value.shape)}")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"Invalid {name}: expected a number, got {value!r}")
        high_ok = value <= self.high if self.high_inclusive else value < self.high
        if not (value >= self.low and high_ok):  # also rejects NaN
            raise ValueError(f"Invalid {name}: {value!r} (must be in {self.interval()})")


NON_NEGATIVE = Hyperparam(0.0, 0.0)


class GradientTransformation(NamedTuple):
    """A pure gradient transformation: ``init`` builds the state, ``update`` transforms updates.

    Attributes:
        init: ``init(params) -> state``; ``state`` is a pytree of NamedTuples of tensors.
        update: ``update(updates, state, params, hyper) -> (updates, state)``; never mutates its
            arguments, never synchronises with the device.
        hyperparams: the numeric hyperparameters ``update`` reads from ``hyper`` (name ->
            :class:`Hyperparam`). Missing entries of ``hyper`` fall back to the defaults.

    Example:
        >>> import torch, afx
        >>> from afx import transforms as T
        >>> tx = afx.count_steps(afx.chain(T.clip_by_rms(1.0), T.scale_by_learning_rate(0.1)))
        >>> params = torch.ones(3)
        >>> state = tx.init(params)
        >>> updates, state = tx.update(torch.full((3,), 4.0), state, params, {})
        >>> updates
        tensor([-0.1000, -0.1000, -0.1000])
    """

    init: Callable[[PyTree], PyTree]
    update: Callable[..., tuple[PyTree, PyTree]]
    hyperparams: Mapping[str, Hyperparam] = MappingProxyType({})


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


def hyperparams(**specs: Hyperparam) -> Mapping[str, Hyperparam]:
    """Builds an immutable name -> :class:`Hyperparam` mapping."""
    return MappingProxyType(dict(specs))


def merge_hyperparams(specs: Iterable[Mapping[str, Hyperparam]]) -> Mapping[str, Hyperparam]:
    """Union of hyperparameter declarations; a name declared twice must agree."""
    merged: dict[str, Hyperparam] = {}
    for declared in specs:
        for name, spec in declared.items():
            if name in merged and merged[name] != spec:
                raise ValueError(
                    f"hyperparameter {name!r} is declared twice with different specs "
                    f"({merged[name]} and {spec}); give one of them another name with "
                    "afx.rename_hyperparams")
            merged[name] = spec
    return MappingProxyType(merged)


def hyper_value(hyper: Hyper | None, name: str, default: float) -> Scalar:
    """The value of hyperparameter ``name``: ``hyper[name]`` if present, else ``default``."""
    if hyper is None:
        return default
    return hyper.get(name, default)


def step_count(hyper: Hyper | None) -> Tensor:
    """The 1-based step count of the current update, as a float32 tensor."""
    if hyper is None or "step" not in hyper:
        raise KeyError("this transform needs the step count: wrap the chain in afx.count_steps, "
                       "or pass hyper={'step': ...}")
    step = hyper["step"]
    return step.float() if isinstance(step, Tensor) else torch.tensor(float(step))


def per_leaf(
    init_leaf: Callable[[Tensor], Any],
    update_leaf: Callable[[Tensor, Any, Tensor | None, Hyper | None], tuple[Tensor, Any]],
    specs: Mapping[str, Hyperparam] = MappingProxyType({}),
) -> GradientTransformation:
    """Lifts a transformation of one tensor to pytrees of tensors.

    The state is the params' tree with one leaf state (a NamedTuple) per tensor, so each
    parameter's state can be sized and shaped after the parameter itself (factored or not).

    Args:
        init_leaf: ``init_leaf(param) -> leaf_state``.
        update_leaf: ``update_leaf(update, leaf_state, param, hyper) -> (update, leaf_state)``.
        specs: the hyperparameters ``update_leaf`` reads.

    Returns:
        The lifted :class:`GradientTransformation`.
    """

    def init(params: PyTree) -> PyTree:
        return optree.tree_map(init_leaf, params)

    def update(updates: PyTree, state: PyTree, params: PyTree = None, hyper: Hyper | None = None):
        leaves, spec = optree.tree_flatten(updates)
        states = spec.flatten_up_to(state)
        param_leaves = [None] * len(leaves) if params is None else spec.flatten_up_to(params)
        # An empty tensor has nothing to update; its statistics (means over empty dims) would
        # be NaN, so its state is left as initialised.
        out = [(u, s) if u.numel() == 0 else
               _update_scalar_as_vector(update_leaf, u, s, p, hyper) if u.ndim == 0
               else update_leaf(u, s, p, hyper)
               for u, s, p in zip(leaves, states, param_leaves)]
        return spec.unflatten([o[0] for o in out]), spec.unflatten([o[1] for o in out])

    return GradientTransformation(init, update, specs)


def _update_scalar_as_vector(update_leaf: Callable, u: Tensor, state: Any, p: Tensor | None,
                             hyper: Hyper | None) -> tuple[Tensor, Any]:
    # Hyperparameters are float64 0-d tensors; combined with a 0-d float32 tensor they would
    # promote it to float64. Running a 0-d parameter as a 1-element vector keeps its math, its
    # update and its state in float32, exactly like every other parameter.
    as_vector = optree.tree_map(lambda t: t.reshape(1) if t.ndim == 0 else t, state)
    u, new_state = update_leaf(u.reshape(1), as_vector, None if p is None else p.reshape(1),
                               hyper)
    new_state = optree.tree_map(lambda new, old: new.reshape(old.shape), new_state, state)
    return u.reshape(()), new_state


def stateless(
    fn: Callable[[Tensor, Tensor | None, Hyper | None], Tensor],
    specs: Mapping[str, Hyperparam] = MappingProxyType({}),
) -> GradientTransformation:
    """A per-leaf transformation without state: ``update = fn(update, param, hyper)``."""
    return per_leaf(lambda p: EmptyState(), lambda u, s, p, h: (fn(u, p, h), s), specs)


class CountState(NamedTuple):
    """State of :func:`count_steps`: the number of completed steps and the inner state."""

    step: Tensor
    inner: PyTree


def count_steps(inner: GradientTransformation) -> GradientTransformation:
    """Counts steps and gives each update of ``inner`` its 1-based step as ``hyper["step"]``.

    Args:
        inner: the transformation whose hyperparameters include the step count.

    Returns:
        A transformation with state ``CountState(step, inner_state)``.

    Example:
        >>> import torch, afx
        >>> from afx import transforms as T
        >>> tx = afx.count_steps(T.scale_by_relative_step())
        >>> state = tx.init(torch.zeros(2))
        >>> u, state = tx.update(torch.ones(2), state, torch.zeros(2), {})
        >>> int(state.step), u
        (1, tensor([0.0100, 0.0100]))
    """

    def init(params: PyTree) -> CountState:
        leaves = optree.tree_leaves(params)
        device = leaves[0].device if leaves else None
        return CountState(torch.zeros((), dtype=torch.float32, device=device), inner.init(params))

    def update(updates: PyTree, state: CountState, params: PyTree = None,
               hyper: Hyper | None = None):
        step = state.step + 1
        updates, inner_state = inner.update(updates, state.inner, params,
                                            {**(hyper or {}), "step": step})
        return updates, CountState(step, inner_state)

    return GradientTransformation(init, update, inner.hyperparams)
