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

from afx.sharding import full_numel

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

    References:
        None; afx's declaration of the numbers a scheduler may change between steps.

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

    References:
        Babuschkin et al., "The DeepMind JAX Ecosystem", 2020 (optax):
        transformations as pairs of pure ``init``/``update`` functions.

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
    """The state of a stateless transform.

    References:
        None; a placeholder that keeps every leaf of a state tree a NamedTuple.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> T.scale(2.0).init(torch.zeros(3))
        EmptyState()
    """


def hyperparams(**specs: Hyperparam) -> Mapping[str, Hyperparam]:
    """Builds an immutable name -> :class:`Hyperparam` mapping.

    Read-only, so a transform's declaration cannot be changed behind the back of graphs that
    were traced with it.

    Args:
        **specs: hyperparameter name -> its :class:`Hyperparam`.

    Returns:
        A read-only mapping.

    References:
        None; a helper of afx's hyperparameter declarations.

    Example:
        >>> from afx.base import Hyperparam, hyperparams
        >>> specs = hyperparams(lr=Hyperparam(1e-3, 0.0))
        >>> specs["lr"].default
        0.001
    """
    return MappingProxyType(dict(specs))


def merge_hyperparams(specs: Iterable[Mapping[str, Hyperparam]]) -> Mapping[str, Hyperparam]:
    """Union of hyperparameter declarations; a name declared twice must agree.

    Two parts of a chain that read the same name read the same value, so their declarations
    (default and range) have to be identical.

    Args:
        specs: the declarations to merge, e.g. the ``hyperparams`` of each part of a chain.

    Returns:
        A read-only name -> :class:`Hyperparam` mapping.

    Raises:
        ValueError: if a name is declared twice with different specs.

    References:
        None; a helper of afx's hyperparameter declarations.

    Example:
        >>> from afx.base import Hyperparam, hyperparams, merge_hyperparams
        >>> lr, beta = Hyperparam(0.1, 0.0), Hyperparam(0.9, 0.0, 1.0, high_inclusive=False)
        >>> sorted(merge_hyperparams([hyperparams(lr=lr), hyperparams(lr=lr, beta1=beta)]))
        ['beta1', 'lr']
        >>> merge_hyperparams([hyperparams(lr=lr), hyperparams(lr=lr._replace(default=1.0))])
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: hyperparameter 'lr' is declared twice with different specs ...
    """
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
    """The value of hyperparameter ``name``: ``hyper[name]`` if present, else ``default``.

    Args:
        hyper: the ``hyper`` mapping passed to ``update``, or ``None``.
        name: the hyperparameter's name.
        default: the value a transform was built with.

    Returns:
        ``hyper[name]`` as given (0-d tensor or number), else ``default``.

    References:
        None; a helper of afx's hyperparameter handling.

    Example:
        >>> import torch
        >>> from afx.base import hyper_value
        >>> hyper_value({"lr": torch.tensor(0.5)}, "lr", 1e-3), hyper_value(None, "lr", 1e-3)
        (tensor(0.5000), 0.001)
    """
    if hyper is None:
        return default
    return hyper.get(name, default)


def step_count(hyper: Hyper | None) -> Tensor:
    """The 1-based step count of the current update, as a float32 tensor.

    Args:
        hyper: the ``hyper`` mapping passed to ``update``; must hold ``"step"`` (a tensor or a
            number).

    Returns:
        A 0-d float32 tensor.

    Raises:
        KeyError: if ``hyper`` has no ``"step"`` (the message says to use :func:`count_steps`).

    References:
        None; a helper of afx's step counting.

    Example:
        >>> import torch
        >>> from afx.base import step_count
        >>> step_count({"step": 3}), step_count({"step": torch.tensor(4)})
        (tensor(3.), tensor(4.))
    """
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
        The lifted :class:`GradientTransformation`. Empty tensors keep their initial state;
        0-d tensors run as 1-element vectors so their math stays in float32.

    References:
        Babuschkin et al., "The DeepMind JAX Ecosystem", 2020 (optax):
        transformations mapped over a tree of parameters.

    Example:
        >>> import torch
        >>> from afx.base import per_leaf
        >>> from afx.transforms import EmaState
        >>> running_sum = per_leaf(lambda p: EmaState(torch.zeros_like(p)),
        ...                        lambda u, s, p, h: (s.m + u, EmaState(s.m + u)))
        >>> params = {"a": torch.zeros(2), "b": torch.zeros(())}
        >>> state = running_sum.init(params)
        >>> for _ in range(3):
        ...     u, state = running_sum.update({"a": torch.ones(2), "b": torch.ones(())}, state)
        >>> u
        {'a': tensor([3., 3.]), 'b': tensor(3.)}
    """

    def init(params: PyTree) -> PyTree:
        return optree.tree_map(init_leaf, params)

    def update(updates: PyTree, state: PyTree, params: PyTree = None, hyper: Hyper | None = None):
        leaves, spec = optree.tree_flatten(updates)
        states = spec.flatten_up_to(state)
        param_leaves = [None] * len(leaves) if params is None else spec.flatten_up_to(params)
        # An empty tensor has nothing to update; its statistics (means over empty dims) would
        # be NaN, so its state is left as initialised. (A rank holding no rows of a sharded
        # parameter still runs: the other ranks' reductions need its part.)
        out = [(u, s) if full_numel(u) == 0 else
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
    """A per-leaf transformation without state: ``update = fn(update, param, hyper)``.

    Args:
        fn: ``fn(update, param, hyper) -> update`` for one tensor; ``param`` is ``None`` when
            ``update`` is called without params.
        specs: the hyperparameters ``fn`` reads.

    Returns:
        A :class:`GradientTransformation` whose state is an :class:`EmptyState` per leaf.

    References:
        Babuschkin et al., "The DeepMind JAX Ecosystem", 2020 (optax).

    Example:
        >>> import torch
        >>> from afx.base import stateless
        >>> clamp = stateless(lambda u, p, h: u.clamp(-1.0, 1.0))
        >>> clamp.update(torch.tensor([-3.0, 0.5, 2.0]), clamp.init(torch.zeros(3)))[0]
        tensor([-1.0000,  0.5000,  1.0000])
    """
    return per_leaf(lambda p: EmptyState(), lambda u, s, p, h: (fn(u, p, h), s), specs)


class CountState(NamedTuple):
    """State of :func:`count_steps`: the number of completed steps and the inner state.

    Attributes:
        step: 0-d float32 tensor, the number of completed steps (0 after ``init``).
        inner: the state of the wrapped transformation.

    References:
        Babuschkin et al., "The DeepMind JAX Ecosystem", 2020 (optax):
        step counts kept in the state.

    Example:
        >>> import torch, afx
        >>> from afx import transforms as T
        >>> afx.count_steps(T.scale(1.0)).init(torch.zeros(2)).step
        tensor(0.)
    """

    step: Tensor
    inner: PyTree


def count_steps(inner: GradientTransformation) -> GradientTransformation:
    """Counts steps and gives each update of ``inner`` its 1-based step as ``hyper["step"]``.

    Args:
        inner: the transformation whose hyperparameters include the step count.

    Returns:
        A transformation with state ``CountState(step, inner_state)``.

    References:
        Babuschkin et al., "The DeepMind JAX Ecosystem", 2020 (optax).

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
