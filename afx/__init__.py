"""afx: a torch.compile-first library of functional, memory-efficient optimizers.

Algorithms are chains of pure gradient transformations (:mod:`afx.transforms`) run by
:class:`afx.optim.Optimizer`, a ``torch.optim.Optimizer`` that compiles each chain into a few
fused kernels.
"""

from afx import optim, transforms
from afx.apply import apply_updates
from afx.base import (
    CountState,
    EmptyState,
    GradientTransformation,
    Hyperparam,
    count_steps,
    per_leaf,
    stateless,
)
from afx.combine import Skipped, chain, masked, named_chain, partition, rename_hyperparams
from afx.optim import Adafactor, Adafactor8Bit, build_param_groups

__version__ = "0.1.0"

__all__ = [
    "Adafactor",
    "Adafactor8Bit",
    "CountState",
    "EmptyState",
    "GradientTransformation",
    "Hyperparam",
    "Skipped",
    "apply_updates",
    "build_param_groups",
    "chain",
    "count_steps",
    "masked",
    "named_chain",
    "optim",
    "partition",
    "per_leaf",
    "rename_hyperparams",
    "stateless",
    "transforms",
]
