"""A guard around one Inductor CPU loop transformation that drops iterations.

Inductor's C++ backend (``CppScheduling.try_loop_split``; seen in torch 2.13, other releases
not checked) removes a division from a fused loop by splitting the loop variable ``x`` of an index
``x // B`` into ``B * y + z``. It sizes the new outer loop ``n // B`` without checking that
``B`` divides ``n``, so the last ``n % B`` iterations are never run: their outputs are left
unwritten. afx reaches that pattern whenever a flat update reads a block-scaled state whose
last block is padded (a 1-D parameter with 8-bit momentum, say, or a flat bucket), and the
parameter's tail then silently stops training.

:func:`install` wraps the transformation: it keeps the split only when every node still
iterates over as many points as before, and otherwise restores the loops it was given (the same
fallback Inductor itself takes when a split leaves incompatible loops). Because an Inductor cache
entry written without the guard may hold the wrong kernel, it also adds a tag to
``torch.compiler.config.cache_key_tag`` so those entries are not reused.
:func:`afx.optim.compiled.bucket_function` installs it before compiling; it changes nothing
when the transformation is absent or already correct.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

#: Added to ``torch.compiler.config.cache_key_tag`` once the guard is installed.
CACHE_TAG = "afx-loop-split-guard-1"

_WRAPPED = "__afx_loop_split_guard__"


def _iterations(node: Any) -> Any:
    """The number of points a scheduler node's (non-reduction) loops visit."""
    return math.prod(node.group[1][0])


def _guarded(split: Any) -> Any:
    @functools.wraps(split)
    def try_loop_split(self: Any, nodes: list[Any]) -> list[Any]:
        before = [(node, node.snapshot_loop_state(), _iterations(node)) for node in nodes]
        nodes = split(self, nodes)
        if any(_iterations(node) != count for node, _, count in before):
            for node, state, _ in reversed(before):
                node.restore_loop_state(state)
        return nodes

    setattr(try_loop_split, _WRAPPED, True)
    return try_loop_split


def install() -> bool:
    """Guards Inductor's CPU loop split against dropping the tail of a loop (idempotent).

    Returns:
        ``True`` when the guard is in place (installed now or before), ``False`` when this torch
        has no such transformation or lacks the loop-state snapshots the guard restores from.

    References:
        Ansel et al., "PyTorch 2: Faster Machine Learning Through Dynamic Python Bytecode
        Transformation and Graph Compilation", 2024 (Inductor and its C++ backend).

    Example:
        >>> from afx.optim import inductor_fixes
        >>> inductor_fixes.install() == inductor_fixes.install()
        True
    """
    try:
        from torch._inductor.codegen.cpp import CppScheduling
        from torch._inductor.scheduler import SchedulerNode
    except ImportError:
        return False
    split = getattr(CppScheduling, "try_loop_split", None)
    if split is None or not hasattr(SchedulerNode, "snapshot_loop_state"):
        return False
    if not getattr(split, _WRAPPED, False):
        CppScheduling.try_loop_split = _guarded(split)
        config = torch.compiler.config
        tags = config.cache_key_tag
        if CACHE_TAG not in tags:
            config.cache_key_tag = f"{tags}+{CACHE_TAG}" if tags else CACHE_TAG
    return True
