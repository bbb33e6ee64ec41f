"""Quantized state storage: any transform's state fields kept in a codec between steps."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from afx import sharding
from afx.base import GradientTransformation, Hyper, PyTree, per_leaf
from afx.codecs import Codec, get_codec
from afx.tree import flatten_state

Tensor = torch.Tensor
FieldSpec = str | Codec | tuple[str | Codec, int]


def _is_namedtuple(node: Any) -> bool:
    return isinstance(node, tuple) and hasattr(node, "_fields")


def _map_fields(node: Any, fn: Callable[[str, str, Any], Any], names: Mapping[str, Any],
                path: str = "") -> Any:
    """Rebuilds ``node`` with ``fn(path, field, value)`` applied to NamedTuple fields in ``names``.

    ``path`` is the field's dotted name, as :func:`afx.tree.flatten_state` spells it.
    """
    def join(key: Any) -> str:
        return f"{path}.{key}" if path else str(key)

    if _is_namedtuple(node):
        return type(node)(*(fn(join(f), f, v) if f in names else
                            _map_fields(v, fn, names, join(f))
                            for f, v in zip(node._fields, node)))
    if isinstance(node, dict):
        return {k: _map_fields(v, fn, names, join(k)) for k, v in node.items()}
    if isinstance(node, (tuple, list)):
        return type(node)(_map_fields(v, fn, names, join(i)) for i, v in enumerate(node))
    return node


def quantize_state(inner: GradientTransformation, fields: Mapping[str, FieldSpec], *,
                   block_size: int = 256, min_numel: int = 4096) -> GradientTransformation:
    """Stores chosen fields of ``inner``'s state in a codec between steps.

    Per parameter: ``decode → inner.update → encode``, all in the caller's graph, so under the
    compiled optimizer no float32 copy of a quantized state outlives the step. Whether a field
    is stored encoded is decided at ``init``: the parameter must have at least ``min_numel``
    elements (adafactor8bit's ``min_8bit_size``), and the state's own encoded form must be
    smaller than its float32 form. A state shorter than a block gets one block of its own
    length (rounded up to even), which gives the same codes as a zero-padded block without
    storing the padding: a 64-element row statistic never costs a 2048-byte block.

    For a parameter sharded on dim 0 (:mod:`afx.sharding`) the decisions are the single
    process's, made from the whole parameter. A state sharded with it is encoded with the
    same blocks only if its rows are a whole number of blocks, so that no block straddles two
    shards and each rank's codes are exactly its rows of the single-process codes; otherwise
    that state stays in float32. Whole (replicated) states are encoded as in one process.

    Args:
        inner: the transformation whose state to store; applied one parameter at a time.
        fields: state field name -> codec (a name from :mod:`afx.codecs` or a
            :class:`~afx.codecs.Codec`), or ``(codec, block size)``; e.g.
            ``{"v": "al8", "m": ("uf8", 256)}``. Fields of any NamedTuple in the
            state with these names are stored encoded.
        block_size: default number of elements per block of statistics.
        min_numel: parameters with fewer elements keep all their states in float32.

    Returns:
        The transformation; an encoded field holds the codec's NamedTuple (e.g. ``codes``,
        ``scale``) in place of the tensor.

    References:
        Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022.

    Example:
        >>> import torch, afx
        >>> from afx import transforms as T
        >>> tx = T.quantize_state(T.ema(0.9), {"m": "uf8"})
        >>> state = tx.init(torch.zeros(4096))
        >>> type(state.m).__name__, state.m.codes.dtype
        ('AbsmaxEncoded', torch.uint8)
        >>> u, state = tx.update(torch.ones(4096), state, torch.zeros(4096), {})
        >>> round(u[0].item(), 4)
        0.1
    """
    codecs: dict[str, tuple[Codec, int]] = {}
    for name, spec in fields.items():
        codec, block = spec if isinstance(spec, tuple) and not isinstance(spec, Codec) else (
            spec, block_size)
        codecs[name] = (codec if isinstance(codec, Codec) else get_codec(codec), block)
    layouts: dict[tuple, tuple[dict[str, tuple[int, ...]], dict[str, int | None]]] = {}

    def block_of(field: str, numel: int) -> int:
        return min(codecs[field][1], numel + numel % 2)

    def worth_encoding(field: str, numel: int) -> bool:
        codec = codecs[field][0]
        return 0 < numel and codec.nbytes(numel, block_of(field, numel)) < 4 * numel

    def layout(p: Tensor) -> tuple[dict[str, tuple[int, ...]], dict[str, int | None]]:
        # Each field's logical shape (decoding needs it; the codes do not carry it) and its
        # block size, or None to keep it in float32. Both depend only on the parameter's
        # shape and sharding, so they are read once from inner.init on meta tensors.
        where = sharding.current()
        key = (tuple(p.shape), p.dtype, where)
        if key in layouts:
            return layouts[key]
        meta = torch.empty_like(p, device="meta")
        local, _ = flatten_state(inner.init(meta))
        shape = sharding.full_shape(p)
        with sharding.active(None):
            # The decision is the single process's, made from the whole parameter.
            whole, _ = flatten_state(inner.init(meta.new_empty(shape)))
        big_enough = math.prod(shape) >= min_numel
        if where is not None:
            grown, _ = flatten_state(inner.init(meta.new_empty((p.shape[0] + 1,
                                                                *p.shape[1:]))))
        blocks: dict[str, int | None] = {}
        for path, x in local.items():
            field = path.rsplit(".", 1)[-1]
            numel = whole[path].numel()
            block = (block_of(field, numel) if field in codecs and big_enough
                     and worth_encoding(field, numel) else None)
            if block is not None and where is not None and grown[path].shape != x.shape:
                # A state sharded with the parameter: its codes are sharded too, which is
                # exact only if no block straddles two rows (hence two shards). Otherwise
                # the state stays in float32 (see the README, distributed training).
                rows = whole[path].shape[0]
                if rows == 0 or (numel // rows) % block:
                    block = None
            blocks[path] = block
        layouts[key] = ({path: tuple(x.shape) for path, x in local.items()}, blocks)
        return layouts[key]

    def init_leaf(p: Tensor) -> PyTree:
        _, blocks = layout(p)
        if p.ndim == 0:
            # per_leaf updates a 0-d parameter as a 1-element vector: read that layout here,
            # outside any compiled graph (inner.init cannot be traced for every state).
            layout(p.reshape(1))
        return _map_fields(inner.init(p), lambda path, f, x: codecs[f][0].encode(
            x.float(), blocks[path]) if blocks.get(path) else x, codecs)

    def update_leaf(u: Tensor, state: PyTree, p: Tensor | None, hyper: Hyper | None):
        if p is None:
            raise ValueError("quantize_state needs the parameters: pass params to update")
        shapes_of, blocks = layout(p)
        encoded: set[str] = set()

        def decode(path: str, field: str, value: Any) -> Tensor:
            if isinstance(value, Tensor):
                return value
            encoded.add(path)
            return codecs[field][0].decode(value, shapes_of[path])

        u, new_state = inner.update(u, _map_fields(state, decode, codecs), p, hyper)
        return u, _map_fields(new_state, lambda path, f, x: codecs[f][0].encode(
            x.float(), blocks[path]) if path in encoded else x, codecs)

    return per_leaf(init_leaf, update_leaf, inner.hyperparams)
