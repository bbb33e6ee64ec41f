"""Combinators: sequences of transforms, per-parameter routing and hyperparameter renaming."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import NamedTuple

import optree
import torch

from afx.base import (
    GradientTransformation,
    Hyper,
    PyTree,
    merge_hyperparams,
    per_leaf,
)
from afx.tree import leaf_names

Tensor = torch.Tensor
LabelFn = Callable[[str | None, Tensor], str]


def chain(*txs: GradientTransformation) -> GradientTransformation:
    """Applies ``txs`` one after the other; the state is the tuple of their states.

    Args:
        *txs: the transformations, in order.

    Returns:
        The chained transformation. Its hyperparameters are the union of the parts'.

    References:
        Babuschkin et al., "The DeepMind JAX Ecosystem", 2020 (optax): composing transformations
        by chaining them.

    Example:
        >>> import torch, afx
        >>> from afx import transforms as T
        >>> tx = afx.chain(T.clip_by_rms(1.0), T.scale(-0.5))
        >>> u, _ = tx.update(torch.tensor([3.0, 4.0]), tx.init(torch.zeros(2)), None, {})
        >>> u
        tensor([-0.4243, -0.5657])
    """
    parts = list(txs)

    def init(params: PyTree) -> tuple:
        return tuple(tx.init(params) for tx in parts)

    def update(updates: PyTree, state: tuple, params: PyTree = None, hyper: Hyper | None = None):
        new_states = []
        for tx, s in zip(parts, state):
            updates, s = tx.update(updates, s, params, hyper)
            new_states.append(s)
        return updates, tuple(new_states)

    specs = merge_hyperparams(tx.hyperparams for tx in parts)
    return GradientTransformation(init, update, specs)


def named_chain(*named: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Like :func:`chain`, with a name per part: the state is a ``dict`` keyed by these names.

    The names become the prefixes of the optimizer's state keys (``"rms.v_row"``), so
    checkpoints stay readable and stable when parts are added or removed.

    Args:
        *named: ``(name, transformation)`` pairs, in order; names must be unique and contain no
            dot.

    Returns:
        The chained transformation.

    References:
        Babuschkin et al., "The DeepMind JAX Ecosystem", 2020 (optax): chaining, here with named
        states.

    Example:
        >>> import torch, afx
        >>> from afx import transforms as T
        >>> tx = afx.named_chain(("rms", T.scale_by_factored_rms()), ("clip", T.clip_by_rms()))
        >>> sorted(tx.init(torch.zeros(4, 3))["rms"]._fields)
        ['v_col', 'v_row']
    """
    names = [name for name, _ in named]
    if len(set(names)) != len(names) or any("." in n or not n for n in names):
        raise ValueError(f"named_chain names must be unique, non-empty and dot-free: {names}")
    parts = list(named)

    def init(params: PyTree) -> dict:
        return {name: tx.init(params) for name, tx in parts}

    def update(updates: PyTree, state: dict, params: PyTree = None, hyper: Hyper | None = None):
        new_state = {}
        for name, tx in parts:
            updates, new_state[name] = tx.update(updates, state[name], params, hyper)
        return updates, new_state

    specs = merge_hyperparams(tx.hyperparams for _, tx in parts)
    return GradientTransformation(init, update, specs)


def _route_leaves(params: PyTree, route: Callable[[str | None, Tensor], PyTree]) -> PyTree:
    names = leaf_names(params)
    leaves, spec = optree.tree_flatten(params)
    return spec.unflatten([route(name, p) for name, p in zip(names, leaves)])


def partition(transforms: Mapping[str, GradientTransformation],
              labels: LabelFn) -> GradientTransformation:
    """Routes each parameter to one of several transformations by a predicate.

    The choice is made once, at ``init``, from the parameter's name and tensor (shape, dtype);
    each parameter's state is ``{label: state of transforms[label]}``, so the route is part of the
    state's structure and ``update`` never branches on data.

    Args:
        transforms: label -> transformation.
        labels: ``labels(name, param) -> label``. ``name`` is the parameter's dotted path in the
            params tree, or its module path when used through :class:`afx.optim.Optimizer` built
            from ``model.named_parameters()``; ``None`` when unknown.

    Returns:
        The routing transformation.

    References:
        Babuschkin et al., "The DeepMind JAX Ecosystem", 2020 (optax): routing parameters to
        different transformations by label.

    Example:
        >>> import torch, afx
        >>> from afx import transforms as T
        >>> tx = afx.partition({"matrix": T.scale(0.5), "vector": T.scale(2.0)},
        ...                    lambda name, p: "matrix" if p.ndim >= 2 else "vector")
        >>> params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
        >>> u, _ = tx.update(params, tx.init(params), params, {})
        >>> u["b"], u["w"][0]
        (tensor([2., 2.]), tensor([0.5000, 0.5000]))
    """
    table = dict(transforms)

    def init_route(name: str | None, p: Tensor) -> dict:
        label = labels(name, p)
        if label not in table:
            raise ValueError(f"partition: label {label!r} for parameter {name!r} is not one of "
                             f"{sorted(table)}")
        return {label: table[label].init(p)}

    def update_leaf(u: Tensor, s: dict, p: Tensor | None, hyper: Hyper | None):
        (label, inner), = s.items()
        u, inner = table[label].update(u, inner, p, hyper)
        return u, {label: inner}

    specs = merge_hyperparams(tx.hyperparams for tx in table.values())
    lifted = per_leaf(None, update_leaf, specs)
    return lifted._replace(init=lambda params: _route_leaves(params, init_route))


class Skipped(NamedTuple):
    """Leaf state of a parameter that a :func:`masked` transformation leaves alone.

    References:
        None; a marker of afx's state trees.

    Example:
        >>> import torch, afx
        >>> from afx import transforms as T
        >>> tx = afx.masked(T.ema(0.9), lambda name, p: p.ndim >= 2)
        >>> tx.init({"b": torch.zeros(2), "w": torch.zeros(2, 2)})["b"]
        Skipped()
    """


def masked(inner: GradientTransformation,
           mask: Callable[[str | None, Tensor], bool]) -> GradientTransformation:
    """Applies ``inner`` to the parameters selected by ``mask``; the others pass unchanged.

    Args:
        inner: the transformation to apply to selected parameters.
        mask: ``mask(name, param) -> bool`` (see :func:`partition` for ``name``), decided once at
            ``init``.

    Returns:
        The masked transformation; unselected parameters get no state.

    References:
        Babuschkin et al., "The DeepMind JAX Ecosystem", 2020 (optax): masked transformations.

    Example:
        >>> import torch, afx
        >>> from afx import transforms as T
        >>> tx = afx.masked(T.add_decayed_weights(0.1), lambda name, p: p.ndim >= 2)
        >>> params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
        >>> u, _ = tx.update({"w": torch.zeros(2, 2), "b": torch.zeros(2)}, tx.init(params), params)
        >>> u["b"], u["w"][0]
        (tensor([0., 0.]), tensor([0.1000, 0.1000]))
    """

    def init_route(name: str | None, p: Tensor) -> PyTree:
        return inner.init(p) if mask(name, p) else Skipped()

    def update_leaf(u: Tensor, s: PyTree, p: Tensor | None, hyper: Hyper | None):
        if isinstance(s, Skipped):
            return u, s
        return inner.update(u, s, p, hyper)

    lifted = per_leaf(None, update_leaf, inner.hyperparams)
    return lifted._replace(init=lambda params: _route_leaves(params, init_route))


def rename_hyperparams(tx: GradientTransformation,
                       names: Mapping[str, str]) -> GradientTransformation:
    """Makes ``tx`` read hyperparameter ``names[k]`` wherever it would read ``k``.

    Use it to give two transforms of one chain independent values of a hyperparameter they
    both call by the same name.

    Args:
        tx: the transformation.
        names: inner name -> outer name.

    Returns:
        The renamed transformation.

    References:
        Babuschkin et al., "The DeepMind JAX Ecosystem", 2020 (optax): hyperparameters as
        inputs of the update rather than constants.

    Example:
        >>> import afx
        >>> from afx import transforms as T
        >>> slow = afx.rename_hyperparams(T.ema(0.99), {"beta1": "beta_slow"})
        >>> dict(slow.hyperparams)["beta_slow"].default
        0.99
    """
    unknown = set(names) - set(tx.hyperparams)
    if unknown:
        raise ValueError(f"rename_hyperparams: {sorted(unknown)} not among the hyperparameters "
                         f"{sorted(tx.hyperparams)}")
    specs = {names.get(k, k): v for k, v in tx.hyperparams.items()}

    def update(updates: PyTree, state: PyTree, params: PyTree = None, hyper: Hyper | None = None):
        inner = {k: v for k, v in (hyper or {}).items() if k not in names}
        for old, new in names.items():
            if hyper is not None and new in hyper:
                inner[old] = hyper[new]
        return tx.update(updates, state, params, inner)

    return GradientTransformation(tx.init, update, MappingProxyType(specs))
