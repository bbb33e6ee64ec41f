"""How the parameter being updated is sharded, and the collectives its whole-tensor math needs.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) each rank holds rows
``[offset, offset + rows)`` of every parameter (a ``DTensor`` placed ``Shard(0)`` on a 1-D
mesh; the rows follow ``torch.chunk``). The optimizer adapter runs a bucket function on the
local rows and, around the call, makes the parameter's :class:`Sharding` current with
:func:`active`. Transforms never look at it directly: the helpers of :mod:`afx.numerics`
(``full_mean``, ``sum_squares``, ``rms``, ...) and :func:`full_shape` read it, so a reduction
that spans the sharded dim is summed over all ranks (a functional collective inside the
compiled graph) and divided by the global count, and one that does not stays local.

Outside such a context (a single process, DDP, a replicated parameter) every helper is the
identity or its single-process expression, and the traced graphs do not change. The context is
a plain module attribute set outside the compiled function; Dynamo reads it at trace time
only (bucket functions keep no guard on module globals), so the adapter gives every distinct
sharding its own bucket function and always calls it under that sharding. The attribute is
process-wide: optimizers stepping in several threads at once would see each other's.

References:
    Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", 2023:
    the dim-0 sharding this module describes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

Tensor = torch.Tensor


class Sharding(NamedTuple):
    """This rank's share of a parameter sharded on dim 0 over a process group.

    Attributes:
        group: the name of the process group (``ProcessGroup.group_name``) the shards live on.
        world_size: number of ranks of ``group``.
        global_shape: the logical (unsharded) shape of the parameter.
        offset: index of this rank's first row in the logical parameter.
        rows: number of rows this rank holds (possibly 0).

    References:
        Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", 2023.

    Example:
        >>> from afx.sharding import Sharding, chunk_rows
        >>> chunk_rows(7, world_size=2, rank=1)
        (4, 3)
        >>> Sharding("0", 2, (7, 5), 4, 3).row_elements
        5
    """

    group: str
    world_size: int
    global_shape: tuple[int, ...]
    offset: int
    rows: int

    @property
    def row_elements(self) -> int:
        """Number of elements in one row (one index of dim 0) of the parameter."""
        return math.prod(self.global_shape[1:])


def chunk_rows(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(offset, rows)`` of ``rank``'s chunk when ``total`` rows are split like ``torch.chunk``.

    Args:
        total: size of the sharded dim.
        world_size: number of ranks.
        rank: this rank, ``0 <= rank < world_size``.

    Returns:
        The first row and the number of rows (0 for ranks past the last chunk).

    References:
        ``torch.chunk``, the split FSDP2 uses for ``Shard(0)``.

    Example:
        >>> from afx.sharding import chunk_rows
        >>> [chunk_rows(5, 4, r) for r in range(4)]
        [(0, 2), (2, 2), (4, 1), (5, 0)]
    """
    size = -(-total // world_size) if total else 0
    start = min(rank * size, total)
    return start, min(size, total - start)


_ACTIVE: Sharding | None = None


@contextlib.contextmanager
def active(sharding: Sharding | None) -> Iterator[None]:
    """Makes ``sharding`` describe the parameter that ``init`` or ``update`` runs on.

    Args:
        sharding: the parameter's sharding, or ``None`` for an unsharded parameter.

    Yields:
        Nothing; the previous value is restored when the block ends (also on error).

    References:
        None; part of afx's optimizer adapter.

    Example:
        >>> import torch
        >>> from afx import sharding
        >>> with sharding.active(sharding.Sharding("0", 2, (7, 5), 4, 3)):
        ...     sharding.full_shape(torch.zeros(3, 5))
        (7, 5)
        >>> sharding.full_shape(torch.zeros(3, 5))
        (3, 5)
    """
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, sharding
    try:
        yield
    finally:
        _ACTIVE = previous


def current() -> Sharding | None:
    """The sharding made current by :func:`active`, or ``None``.

    Returns:
        The :class:`Sharding` of the parameter being updated, or ``None``.

    References:
        None; part of afx's optimizer adapter.

    Example:
        >>> from afx import sharding
        >>> sharding.current() is None
        True
    """
    return _ACTIVE


def full_shape(x: Tensor) -> tuple[int, ...]:
    """The logical shape of ``x``, a tensor laid out like the current parameter.

    Args:
        x: the local rows of a parameter-shaped tensor (dim 0 is the sharded one).

    Returns:
        ``x.shape`` with dim 0 replaced by the parameter's global size when sharded.

    References:
        None; a helper of afx's sharded updates.

    Example:
        >>> import torch
        >>> from afx.sharding import full_shape
        >>> full_shape(torch.zeros(3, 5))
        (3, 5)
    """
    s = _ACTIVE
    if s is None or x.ndim == 0:
        return tuple(x.shape)
    return (s.global_shape[0], *x.shape[1:])


def full_numel(x: Tensor) -> int:
    """Number of elements of the logical tensor whose local rows are ``x``.

    Args:
        x: a parameter-shaped tensor.

    Returns:
        ``math.prod(full_shape(x))``.

    References:
        None; a helper of afx's sharded updates.

    Example:
        >>> import torch
        >>> from afx.sharding import full_numel
        >>> full_numel(torch.zeros(3, 5))
        15
    """
    return math.prod(full_shape(x))


def element_offset(x: Tensor) -> int:
    """Flat (row-major) index, in the logical tensor, of the first element of ``x``.

    Counter-based randomness keyed by this index (stochastic rounding) draws on every rank
    exactly what a single process draws for the same elements.

    Args:
        x: a parameter-shaped tensor.

    Returns:
        ``offset * prod(x.shape[1:])``, 0 when unsharded.

    References:
        Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011.

    Example:
        >>> import torch
        >>> from afx.sharding import element_offset
        >>> element_offset(torch.zeros(3, 5))
        0
    """
    s = _ACTIVE
    if s is None or x.ndim == 0:
        return 0
    return s.offset * math.prod(x.shape[1:])


def all_reduce(x: Tensor, op: str = "sum") -> Tensor:
    """``x`` reduced over the ranks holding the current parameter (unchanged when unsharded).

    A functional collective, so it traces into the compiled step.

    Args:
        x: a tensor of the same shape on every rank.
        op: ``"sum"``, ``"max"`` or ``"min"``.

    Returns:
        The reduced tensor (the same on every rank).

    References:
        ``torch.distributed._functional_collectives``.

    Example:
        >>> import torch
        >>> from afx.sharding import all_reduce
        >>> all_reduce(torch.ones(2))
        tensor([1., 1.])
    """
    s = _ACTIVE
    if s is None:
        return x
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_reduce(x, op, s.group)


def gather_rows(x: Tensor) -> Tensor:
    """The whole tensor whose local rows (dim 0) are ``x``: every rank's rows, in order.

    Args:
        x: this rank's rows of a tensor sharded like the current parameter.

    Returns:
        A tensor of ``full_shape(x)``, the same on every rank (``x`` when unsharded).

    References:
        ``torch.distributed._functional_collectives.all_gather_single``.

    Example:
        >>> import torch
        >>> from afx.sharding import gather_rows
        >>> gather_rows(torch.arange(3.0))
        tensor([0., 1., 2.])
    """
    s = _ACTIVE
    if s is None:
        return x
    from torch.distributed import _functional_collectives as funcol

    total = s.global_shape[0]
    chunk = -(-total // s.world_size)
    if x.shape[0] < chunk:
        # torch.chunk gives every rank but the last non-empty ones `chunk` rows, so after
        # padding each rank's piece to `chunk` rows the logical rows are the first `total`.
        pad = x.new_zeros((chunk - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad])
    return funcol.all_gather_single(x.contiguous(), 0, s.group)[:total]


def local_rows(x: Tensor, dim: int = 0) -> Tensor:
    """This rank's rows of a whole tensor whose ``dim`` indexes the parameter's dim 0.

    Args:
        x: a replicated tensor.
        dim: the dim of ``x`` that indexes the parameter's rows.

    Returns:
        ``x.narrow(dim, offset, rows)`` (``x`` when unsharded).

    References:
        None; a helper of afx's sharded updates.

    Example:
        >>> import torch
        >>> from afx.sharding import local_rows
        >>> local_rows(torch.arange(3.0))
        tensor([0., 1., 2.])
    """
    s = _ACTIVE
    if s is None:
        return x
    return x.narrow(dim, s.offset, s.rows)
