"""APOLLO's random projection, timed alone: the matrix products no fusion can remove.

Each step, APOLLO (``afx.transforms.scale_by_apollo``) projects the gradient of every matrix to
rank ``r``: ``G P`` with ``P`` of shape ``(C, r)`` when the matrix has at least as many rows
as columns, ``P G`` with ``P`` of shape ``(r, R)`` otherwise. A compiled afx step hands these
products to oneDNN (``afx.matmul.cpu_mm``), eager code to torch's ``mm`` (MKL in the x86
builds); timing both libraries on each of a model's matrix shapes gives the part of the step
that no fusion of afx's element-wise loops can shorten: the faster library's time.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable
from typing import Any

from afxbench.primitives import timed_calls


def _median_ms(product: Callable[..., Any], operands: tuple, reps: int) -> float:
    for _ in range(2):
        product(*operands)
    return 1e3 * statistics.median(timed_calls(product, operands, reps))


def time_projection(shapes: list[tuple[int, ...]], rank: int, reps: int) -> dict[str, Any]:
    """Times the rank-``rank`` projection of one gradient of each shape in ``shapes``.

    Args:
        shapes: the model's tensor shapes; those with fewer than two dimensions are skipped
            (APOLLO leaves them to another route) and the rest are viewed as ``(R, C)`` with
            ``C`` the product of the trailing dimensions, as APOLLO does.
        rank: the projection's rank.
        reps: timed products per distinct shape and library, after two untimed ones.

    Returns:
        ``libraries``: for ``torch.mm`` and ``afx.matmul.cpu_mm``, the sum over ``shapes`` of
        each shape's median ms; ``ms``, the faster library's sum; ``gflop`` (floating-point
        operations of one step's products, in 1e9) and ``gflops`` (their rate at ``ms``); and
        per shape its count and median ms with each library.
    """
    import torch

    from afx.matmul import cpu_mm

    libraries = {"torch.mm": torch.mm, "afx.matmul.cpu_mm": cpu_mm}
    per_shape, totals, flop = [], dict.fromkeys(libraries, 0.0), 0
    for shape, count in Counter(tuple(s) for s in shapes if len(s) >= 2).items():
        rows, cols = shape[0], math.prod(shape[1:])
        g = torch.randn(rows, cols)
        left, right = ((g, torch.randn(cols, rank)) if rows >= cols
                       else (torch.randn(rank, rows), g))
        ms = {name: _median_ms(f, (left, right), reps) for name, f in libraries.items()}
        per_shape.append({"shape": list(shape), "count": count, "ms": ms})
        for name in libraries:
            totals[name] += count * ms[name]
        flop += count * 2 * rows * cols * rank
    fastest = min(totals.values())
    return {"rank": rank, "libraries": totals, "ms": fastest, "gflop": flop / 1e9,
            "gflops": flop / fastest / 1e6 if fastest else 0.0, "shapes": per_shape}
