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
    """
    token = _PARAM_NAMES.set(names)
    try:
        yield
    finally:
        _PARAM_NAMES.reset(token)


def _entry_name(entry: Any) -> str:
    for attr in ("field", "key", "name", "index"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def path_names(tree: Any) -> list[str]:
    """Dotted names of the leaves of ``tree`` (NamedTuple fields, dict keys, sequence indices)."""
    accessors, _, _ = optree.tree_flatten_with_accessor(tree)
    return [".".join(_entry_name(e) for e in acc) for acc in accessors]


def leaf_names(params: Any) -> list[str | None]:
    """Names of the leaves of a params tree; a bare tensor takes its name from the context."""
    if isinstance(params, Tensor):
        return [_PARAM_NAMES.get().get(id(params))]
    return path_names(params)


def flatten_state(state: Any) -> tuple[dict[str, Tensor], optree.PyTreeSpec]:
    """Flattens a state to ``{dotted name: tensor}`` and the structure to rebuild it."""
    leaves, spec = optree.tree_flatten(state)
    names = path_names(state)
    return dict(zip(names, leaves)), spec
