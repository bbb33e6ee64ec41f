"""Quantization codecs: how optimizer states are stored between steps.

A codec encodes an fp32 state into a NamedTuple of plain tensors (codes plus per-block statistics)
and decodes it back; ``quantize_state`` runs decode → update → encode inside one compiled step.

=========  ======  =====================================================  ======================
name       signed  format                                                 compatible with
=========  ======  =====================================================  ======================
``fp32``   yes     plain fp32                                             any
``bf16``   yes     bfloat16, round to nearest even                        —
``log8``   no      8-bit log2 code from 2^-126 to the block max           adafactor8bit 0.2.2 V
``al8``    no      8-bit log2 code over the block's range, exact zero     adafactor8bit 0.4.6 V/C
``al16``   no      16-bit variant of ``al8`` (int16 storage)              adafactor8bit 0.4.6 V/C
``uf8``    yes     8-bit uniform, levels absmax/128                       adafactor8bit 0.4.6 M
``uf4``    yes     4-bit uniform, levels absmax/8                         adafactor8bit 0.4.6 M
``s4``     yes     4-bit symmetric uniform, levels absmax/7               adafactor8bit 0.2.2 M
``s8``     yes     8-bit symmetric uniform, levels absmax/127             afx
``d8``     yes     8-bit dynamic codebook                                 adafactor8bit 0.4.6 M
``d4``     yes     4-bit dynamic codebook                                 adafactor8bit 0.4.6 M
=========  ======  =====================================================  ======================

References:
    Dettmers, Lewis, Shleifer and Zettlemoyer, 2022. "8-bit Optimizers via Block-wise
    Quantization" (ICLR 2022).
    adafactor8bit specification §3 (formats) and §4.2 (byte counts), the behaviour reference.

Example:
    >>> import torch
    >>> from afx.codecs import CODECS, get_codec
    >>> x = torch.linspace(-1.0, 1.0, 6)
    >>> for name in CODECS:
    ...     codec = get_codec(name)
    ...     y = codec.decode(codec.encode(x if codec.signed else x.abs(), 4), x.shape)
    ...     assert y.shape == x.shape and y.dtype == torch.float32
    >>> get_codec("al8", floor_log2=-60.0).name
    'al8'
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from afx.codecs.base import Codec
from afx.codecs.dynamic import make_dynamic
from afx.codecs.linear import make_symmetric, make_uniform
from afx.codecs.log_space import make_adaptive_log, make_log8
from afx.codecs.passthrough import make_plain

__all__ = ["CODECS", "Codec", "get_codec"]

# name -> (factory, keyword options it accepts)
_REGISTRY: dict[str, tuple[Callable[..., Codec], tuple[str, ...]]] = {
    "fp32": (functools.partial(make_plain, torch.float32), ()),
    "bf16": (functools.partial(make_plain, torch.bfloat16), ()),
    "log8": (make_log8, ()),
    "al8": (functools.partial(make_adaptive_log, 8), ("floor_log2",)),
    "al16": (functools.partial(make_adaptive_log, 16), ("floor_log2",)),
    "uf8": (functools.partial(make_uniform, 8), ()),
    "uf4": (functools.partial(make_uniform, 4), ()),
    "s4": (functools.partial(make_symmetric, 4), ()),
    "s8": (functools.partial(make_symmetric, 8), ()),
    "d8": (functools.partial(make_dynamic, 8), ()),
    "d4": (functools.partial(make_dynamic, 4), ()),
}

CODECS: tuple[str, ...] = tuple(_REGISTRY)
"""Names :func:`get_codec` accepts."""


@functools.cache
def _build(name: str, options: tuple[tuple[str, Any], ...]) -> Codec:
    factory, _ = _REGISTRY[name]
    return factory(**dict(options))


def get_codec(name: str, **options: Any) -> Codec:
    """Returns the codec called ``name``.

    The same name and options always return the same :class:`Codec` object, so compiled graphs
    that close over a codec see identical functions and do not recompile.

    Args:
        name: one of :data:`CODECS`.
        **options: static format options. ``al8`` and ``al16`` accept ``floor_log2`` (default
            -126.0, the lowest log2 a block's range may start at); the other codecs take none.

    Returns:
        The :class:`Codec`.

    Raises:
        ValueError: if ``name`` is unknown (the message lists the valid names) or an option value
            is invalid.
        TypeError: if an option is not accepted by that codec.

    References:
        adafactor8bit specification §3 for the formats.

    Example:
        >>> import torch
        >>> from afx.codecs import get_codec
        >>> get_codec("al8") is get_codec("al8")
        True
        >>> codec = get_codec("al16")
        >>> enc = codec.encode(torch.tensor([0.0, 1e-3, 2.5]), 2)
        >>> [tuple(t.shape) for t in enc], enc.codes.dtype
        ([(2, 2), (2,), (2,)], torch.int16)
        >>> get_codec("q3")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown codec 'q3'; valid names: fp32, bf16, log8, al8, al16, uf8, uf4, ...
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown codec {name!r}; valid names: {', '.join(CODECS)}")
    accepted = _REGISTRY[name][1]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        valid = ", ".join(accepted) if accepted else "none"
        raise TypeError(f"codec {name!r} got unexpected option(s) {', '.join(unknown)}; "
                        f"valid options: {valid}")
    key = tuple(sorted(options.items()))
    try:
        hash(key)
    except TypeError:
        # Not cacheable (and not a valid option value either): let the factory say why.
        return _REGISTRY[name][0](**options)
    return _build(name, key)
