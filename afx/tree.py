"""Pytree helpers: dotted names for leaves and states, and the parameter-name context."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import optree
import torch

Tensor = torch.Tensor

_PARAM_NAMES: contextvars.ContextVar[Mapping[int, str]] = contextvars.ContextVar(
    "afx_param_names", default=MappingProxyType({}))


@contextlib.contextmanager
def param_names(names: Mapping[int, str]) -> Iterator[None]:
    """Within this context, a bare tensor ``p`` passed to ``init`` is called ``names[id(p)]``.

    The optimizer adapter initialises one parameter at a time; this is how name predicates of
    :func:`afx.partition` and :func:`afx.masked` learn the parameter's module path.

    Args:
        names: ``id(tensor)`` -> name, e.g. built from ``model.named_parameters()``.

    Yields:
        Nothing; the names apply until the ``with`` block ends (also on error).

    References:
        None; a helper of afx's parameter naming.

    Example:
        >>> import torch
        >>> from afx.tree import leaf_names, param_names
        >>> p = torch.zeros(3)
        >>> with param_names({id(p): "encoder.bias"}):
        ...     print(leaf_names(p))
        ['encoder.bias']
        >>> leaf_names(p)
        [None]
    """
    token = _PARAM_NAMES.set(names)
    try:
        yield
    finally:
        _PARAM_NAMES.reset(token)


_PARAM_INDEX: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "afx_param_index", default=None)


@contextlib.contextmanager
def param_index(index: int | None) -> Iterator[None]:
    """Within this context, ``init`` is creating the state of the optimizer's ``index``-th
    parameter (1-based, in ``param_groups`` order).

    Transforms that need a per-parameter seed (APOLLO's projections) take it from here, so
    seeds are unique within an optimizer and the same on every rank and in every process.

    Args:
        index: the position, or ``None`` outside an optimizer.

    Returns:
        A context manager.

    References:
        None; part of afx's optimizer adapter.

    Example:
        >>> from afx.tree import current_param_index, param_index
        >>> with param_index(3):
        ...     current_param_index()
        3
    """
    token = _PARAM_INDEX.set(index)
    try:
        yield
    finally:
        _PARAM_INDEX.reset(token)


def current_param_index() -> int | None:
    """The position set by :func:`param_index`, or ``None``.

    Returns:
        The 1-based index of the parameter whose state is being created, or ``None`` outside
        a :func:`param_index` context.

    References:
        None; part of afx's optimizer adapter.

    Example:
        >>> from afx.tree import current_param_index
        >>> current_param_index() is None
        True
    """
    return _PARAM_INDEX.get()


def _entry_name(entry: Any) -> str:
    for attr in ("field", "key", "name", "index"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_names(tree: Any) -> list[str]:
    """Dotted names of the leaves of ``tree`` (NamedTuple fields, dict keys, sequence indices).

    Args:
        tree: any pytree optree can flatten.

    Returns:
        One name per leaf, in optree's flattening order (dict keys sorted).

    References:
        None; a helper of afx's state naming.

    Example:
        >>> import torch
        >>> from afx.tree import path_names
        >>> path_names({"w": torch.zeros(2), "layers": [torch.zeros(1), torch.zeros(1)]})
        ['layers.0', 'layers.1', 'w']
    """
    accessors, _, _ = optree.tree_flatten_with_accessor(tree)
    return [".".join(_entry_name(e) for e in acc) for acc in accessors]


def leaf_names(params: Any) -> list[str | None]:
    """Names of the leaves of a params tree; a bare tensor takes its name from the context.

    Args:
        params: a pytree of tensors, or a single tensor.

    Returns:
        :func:`path_names` of a tree; for a bare tensor a one-element list holding the name
        :func:`param_names` gave it, or ``None`` outside such a context.

    References:
        None; a helper of afx's parameter naming.

    Example:
        >>> import torch
        >>> from afx.tree import leaf_names
        >>> leaf_names({"bias": torch.zeros(2)}), leaf_names(torch.zeros(2))
        (['bias'], [None])
    """
    if isinstance(params, Tensor):
        return [_PARAM_NAMES.get().get(id(params))]
    return path_names(params)


def flatten_state(state: Any) -> tuple[dict[str, Tensor], optree.PyTreeSpec]:
    """Flattens a state to ``{dotted name: tensor}`` and the structure to rebuild it.

    Args:
        state: a state tree, e.g. from a transformation's ``init``.

    Returns:
        ``(tensors, spec)``: the leaves keyed by :func:`path_names`, in flattening order, and
        the ``optree.PyTreeSpec`` for which ``spec.unflatten(tensors.values())`` rebuilds
        ``state``.

    References:
        None; a helper of afx's state naming (the optimizer's state keys).

    Example:
        >>> import torch, afx
        >>> from afx import transforms as T
        >>> from afx.tree import flatten_state
        >>> tx = afx.named_chain(("rms", T.scale_by_factored_rms()), ("m", T.ema()))
        >>> tensors, spec = flatten_state(tx.init({"w": torch.zeros(2, 3)}))
        >>> {name: tuple(t.shape) for name, t in tensors.items()}
        {'m.w.m': (2, 3), 'rms.w.v_row': (2,), 'rms.w.v_col': (3,)}
        >>> spec.unflatten(tensors.values())["rms"]["w"].v_col
        tensor([0., 0., 0.])
    """
    leaves, spec = optree.tree_flatten(state)
    names = path_names(state)
    return dict(zip(names, leaves)), spec
