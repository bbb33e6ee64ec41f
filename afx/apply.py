"""Applying updates to parameters."""

from __future__ import annotations

import optree
import torch

from afx.base import PyTree

Tensor = torch.Tensor


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """Returns ``params + updates``, computed in float32 and rounded to each parameter's dtype.

    Args:
        params: a pytree of tensors.
        updates: a pytree of the same structure (as returned by a transformation's ``update``).

    Returns:
        The new parameters; the inputs are not modified.

    References:
        Babuschkin et al., "The DeepMind JAX Ecosystem", 2020 (optax): updates returned by pure
        transformations and added to the parameters by the caller.

    Example:
        >>> import torch, afx
        >>> params = {"w": torch.ones(2, dtype=torch.bfloat16)}
        >>> afx.apply_updates(params, {"w": torch.full((2,), 0.5)})
        {'w': tensor([1.5000, 1.5000], dtype=torch.bfloat16)}
    """
    return optree.tree_map(lambda p, u: (p.float() + u).to(p.dtype), params, updates)
