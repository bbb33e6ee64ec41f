"""DTensor parameters in the optimizer adapter: which ones are supported, and how their state is
stored so that ``torch.distributed.checkpoint`` can save and reshard it.

An FSDP2 parameter is a ``DTensor`` placed ``Shard(0)`` on a 1-D mesh. The adapter runs the
bucket function on its local rows (``to_local()``, an alias, so in-place writes update the
DTensor) with the parameter's :class:`afx.sharding.Sharding` current. Each state tensor the
transformation creates is either

* *sharded* with the parameter: its dim 0 follows the parameter's rows (``k`` entries per row:
  1 for a momentum, ``row length / block`` for the codes of a quantized one). It is stored as
  a ``DTensor`` placed ``Shard(0)`` whose global shape is ``(R, *rest)`` (or ``(R, k, *rest)``),
  a view of the local tensor the compiled step writes; or
* *whole* (replicated): the same tensor on every rank (factored row/column statistics, the step,
  APOLLO's projection, Fira's norm), stored as a plain tensor.

Which is which is found from the shapes ``init`` gives a shard and a shard one row longer.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import torch

from afx import sharding as _sharding

Tensor = torch.Tensor


@functools.cache  # called for every tensor of every bucket call: import once
def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``.

    Args:
        t: any object.

    Returns:
        ``True`` for a DTensor (``False`` where ``torch.distributed`` is unavailable).

    References:
        ``torch.distributed.tensor``.

    Example:
        >>> import torch
        >>> from afx.optim.distributed import is_dtensor
        >>> is_dtensor(torch.zeros(2))
        False
    """
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The local tensor of a DTensor (an alias of its storage), or ``t`` itself.

    Args:
        t: a tensor or DTensor.

    Returns:
        A plain tensor.

    References:
        ``torch.distributed.tensor.DTensor.to_local``.

    Example:
        >>> import torch
        >>> from afx.optim.distributed import local
        >>> t = torch.zeros(2)
        >>> local(t) is t
        True
    """
    return t.to_local() if is_dtensor(t) else t


def sharding_of(p: Tensor, what: str) -> _sharding.Sharding | None:
    """The :class:`afx.sharding.Sharding` of a parameter, checking that afx supports it.

    Args:
        p: a parameter (plain tensor or DTensor).
        what: how to name the parameter in an error message.

    Returns:
        ``None`` for a plain or replicated parameter; the sharding of a ``Shard(0)`` DTensor on
        a 1-D mesh.

    Raises:
        ValueError: for any other placement (tensor parallelism, ``Shard(d)`` with ``d > 0``,
            ``Partial``, meshes with more than one dim), naming it.

    References:
        Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", 2023.

    Example:
        >>> import torch
        >>> from afx.optim.distributed import sharding_of
        >>> sharding_of(torch.zeros(3), "bias") is None
        True
    """
    if not is_dtensor(p):
        return None
    mesh, placements = p.device_mesh, tuple(p.placements)
    supported = mesh.ndim == 1 and len(placements) == 1 and (
        placements[0].is_replicate() or (placements[0].is_shard() and placements[0].dim == 0
                                          and p.ndim > 0))
    if not supported:
        raise ValueError(
            f"{what} is a DTensor placed {placements} on a {mesh.ndim}-D device mesh; afx "
            "supports DTensor parameters sharded on dim 0 of a 1-D mesh (FSDP2's "
            "fully_shard) or replicated. Tensor parallelism (Shard(1), Partial), 2-D meshes "
            "(HSDP, FSDP + TP) and other placements are not supported.")
    if placements[0].is_replicate():
        return None
    offset, rows = _sharding.chunk_rows(p.shape[0], mesh.size(), mesh.get_local_rank())
    if p.to_local().shape[0] != rows:
        raise ValueError(f"{what}: this rank holds {p.to_local().shape[0]} rows of dim 0, but "
                         f"torch.chunk would give it {rows} (of {p.shape[0]}); afx needs "
                         "FSDP2's even chunking")
    found = _sharding.Sharding(mesh.get_group().group_name, mesh.size(), tuple(p.shape),
                               offset, rows)
    # One object per distinct sharding, so equal shardings are one bucket key and one context
    # object (a bucket function is traced under it once and keeps no guard on it).
    return _INTERNED.setdefault(found, found)


_INTERNED: dict[_sharding.Sharding, _sharding.Sharding] = {}


class Storage(NamedTuple):
    """How one state tensor of a DTensor parameter is stored.

    Attributes:
        shape: the local shape the bucket function reads and writes.
        per_row: ``None`` for a whole (replicated) tensor, else the number of entries of its
            dim 0 per row of the parameter.

    References:
        None; part of afx's optimizer adapter.

    Example:
        >>> from afx.optim.distributed import Storage
        >>> Storage((8, 256), 2).per_row
        2
    """

    shape: tuple[int, ...]
    per_row: int | None


def storage(local_template: dict[str, Tensor], grown_template: dict[str, Tensor],
            rows: int) -> tuple[Storage, ...]:
    """Classifies state tensors as sharded or whole from the templates of two shard sizes.

    Args:
        local_template: ``{name: tensor}`` the state of this rank's shard (``rows`` rows).
        grown_template: the same for a shard of ``rows + 1`` rows (same global shape).
        rows: this rank's rows.

    Returns:
        One :class:`Storage` per entry, in order.

    Raises:
        RuntimeError: for a state whose dim 0 neither stays fixed nor grows by a whole number
            of entries per row (a transform whose state afx cannot shard).

    References:
        None; part of afx's optimizer adapter.

    Example:
        >>> import torch
        >>> from afx.optim.distributed import storage
        >>> storage({"m": torch.zeros(4, 5), "v_col": torch.zeros(5)},
        ...         {"m": torch.zeros(5, 5), "v_col": torch.zeros(5)}, 4)
        (Storage(shape=(4, 5), per_row=1), Storage(shape=(5,), per_row=None))
    """
    out = []
    for name, t in local_template.items():
        a, b = tuple(t.shape), tuple(grown_template[name].shape)
        if a == b:
            out.append(Storage(a, None))
            continue
        per_row = b[0] - a[0] if len(a) == len(b) and a and a[1:] == b[1:] else 0
        if per_row <= 0 or a[0] != rows * per_row:
            raise RuntimeError(f"state {name!r} has shape {a} for a shard of {rows} rows and "
                               f"{b} for {rows + 1}: it neither stays whole nor follows the "
                               "parameter's rows, so afx cannot shard it")
        out.append(Storage(a, per_row))
    return tuple(out)


def global_shape(store: Storage, s: _sharding.Sharding) -> tuple[int, ...]:
    """The shape a state tensor has in the optimizer's state dict (and in a DCP checkpoint).

    Args:
        store: the tensor's :class:`Storage`.
        s: the parameter's sharding.

    Returns:
        The local shape of a whole tensor; ``(R, *rest)`` or ``(R, k, *rest)`` for one sharded
        with ``k`` entries per row.

    References:
        None; part of afx's optimizer adapter.

    Example:
        >>> from afx.optim.distributed import Storage, global_shape
        >>> from afx.sharding import Sharding
        >>> global_shape(Storage((6, 256), 2), Sharding("0", 2, (7, 512), 4, 3))
        (7, 2, 256)
    """
    if store.per_row is None:
        return store.shape
    rest = store.shape[1:]
    return (s.global_shape[0], *rest) if store.per_row == 1 else (
        s.global_shape[0], store.per_row, *rest)


def wrap(t: Tensor, store: Storage, s: _sharding.Sharding, mesh: Any) -> Tensor:
    """Stores a local state tensor: a ``Shard(0)`` DTensor view of it, or itself if whole.

    Args:
        t: the local tensor (of ``store.shape``).
        store: its :class:`Storage`.
        s: the parameter's sharding.
        mesh: the parameter's device mesh.

    Returns:
        The tensor to keep in ``optimizer.state[p]``.

    References:
        ``torch.distributed.tensor.DTensor.from_local``.

    Example:
        >>> import torch
        >>> from afx.optim.distributed import Storage, wrap
        >>> from afx.sharding import Sharding
        >>> wrap(torch.zeros(5), Storage((5,), None), Sharding("0", 2, (7, 5), 4, 3), None)
        tensor([0., 0., 0., 0., 0.])
    """
    if store.per_row is None:
        return t
    from torch.distributed.tensor import DTensor, Shard

    shape = global_shape(store, s)
    view = t.view(s.rows, *shape[1:])
    stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return DTensor.from_local(view, mesh, [Shard(0)], run_check=False, shape=shape,
                              stride=stride)


def unwrap(t: Tensor, store: Storage) -> Tensor:
    """The local tensor the bucket function reads and writes in place (an alias of ``t``).

    Args:
        t: the stored tensor (see :func:`wrap`).
        store: its :class:`Storage`.

    Returns:
        A plain tensor of ``store.shape``.

    References:
        None; part of afx's optimizer adapter.

    Example:
        >>> import torch
        >>> from afx.optim.distributed import Storage, unwrap
        >>> unwrap(torch.zeros(3, 2), Storage((6,), 1)).shape
        torch.Size([6])
    """
    x = local(t)
    return x if tuple(x.shape) == store.shape else x.view(store.shape)


def loaded(value: Tensor, store: Storage, s: _sharding.Sharding, mesh: Any, key: str,
           dtype: torch.dtype, device: torch.device) -> Tensor:
    """A loaded state tensor in the stored form: checked, cast and, if whole, cut to this
    rank's rows.

    Accepts what ``torch.distributed.checkpoint`` loads (the stored form), and plain whole
    tensors of a sharded state (a full state dict, or a single-process checkpoint with the
    same layout), of which this rank keeps its rows.

    Args:
        value: the loaded tensor.
        store: the entry's :class:`Storage`.
        s: the parameter's sharding.
        mesh: the parameter's device mesh.
        key: the state key, for error messages.
        dtype: the dtype the state has.
        device: the parameter's local device.

    Returns:
        The tensor to keep in ``optimizer.state[p]``.

    Raises:
        ValueError: if the value's shape does not fit.

    References:
        ``torch.distributed.checkpoint``.

    Example:
        >>> import torch
        >>> from afx.optim.distributed import Storage, loaded
        >>> from afx.sharding import Sharding
        >>> loaded(torch.ones(5), Storage((5,), None), Sharding("0", 2, (7, 5), 4, 3), None,
        ...        "v_col", torch.float32, torch.device("cpu"))
        tensor([1., 1., 1., 1., 1.])
    """
    shape = global_shape(store, s)
    if tuple(value.shape) != shape and value.numel() != math.prod(shape):
        raise ValueError(f"checkpoint state {key!r} has shape {tuple(value.shape)}, "
                         f"expected {shape}")
    if is_dtensor(value):
        placements = tuple(value.placements)
        if store.per_row is not None and placements == (_shard0(),) and \
                tuple(value.shape) == shape and value.device_mesh == mesh:
            return wrap(value.to_local().to(device=device, dtype=dtype).contiguous()
                        .view(store.shape), store, s, mesh)
        value = value.full_tensor()
    value = value.to(device=device, dtype=dtype)
    if store.per_row is None:
        return value.reshape(shape)
    rows = value.reshape(shape).narrow(0, s.offset, s.rows)
    return wrap(rows.contiguous().view(store.shape), store, s, mesh)


def _shard0() -> Any:
    from torch.distributed.tensor import Shard

    return Shard(0)
