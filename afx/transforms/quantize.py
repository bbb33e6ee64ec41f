"""Quantized state storage: any transform's state fields kept in a codec between steps."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

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
    shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}

    def template_shapes(p: Tensor) -> dict[str, tuple[int, ...]]:
        # Decoding needs each field's logical shape, which the codes do not carry. It depends
        # only on the parameter's shape, so it is read once from inner.init on a meta tensor.
        key = (tuple(p.shape), p.dtype)
        if key not in shapes:
            flat, _ = flatten_state(inner.init(torch.empty_like(p, device="meta")))
            shapes[key] = {name: tuple(t.shape) for name, t in flat.items()}
        return shapes[key]

    def block_of(field: str, numel: int) -> int:
        return min(codecs[field][1], numel + numel % 2)

    def worth_encoding(field: str, x: Tensor) -> bool:
        codec = codecs[field][0]
        return 0 < x.numel() and codec.nbytes(x.numel(), block_of(field, x.numel())) < 4 * x.numel()

    def encode(field: str, x: Tensor) -> Any:
        return codecs[field][0].encode(x.float(), block_of(field, x.numel()))

    def init_leaf(p: Tensor) -> PyTree:
        template_shapes(p)
        big_enough = p.numel() >= min_numel
        return _map_fields(inner.init(p), lambda path, f, x: encode(f, x)
                           if big_enough and worth_encoding(f, x) else x, codecs)

    def update_leaf(u: Tensor, state: PyTree, p: Tensor | None, hyper: Hyper | None):
        if p is None:
            raise ValueError("quantize_state needs the parameters: pass params to update")
        shapes_of = template_shapes(p)
        encoded: set[str] = set()

        def decode(path: str, field: str, value: Any) -> Tensor:
            if isinstance(value, Tensor):
                return value
            encoded.add(path)
            return codecs[field][0].decode(value, shapes_of[path])

        u, new_state = inner.update(u, _map_fields(state, decode, codecs), p, hyper)
        return u, _map_fields(new_state, lambda path, f, x: encode(f, x) if path in encoded
                              else x, codecs)

    return per_leaf(init_leaf, update_leaf, inner.hyperparams)
