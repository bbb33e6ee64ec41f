"""APOLLO's random projection, timed alone: the matrix products no fusion can remove.

Each step, APOLLO (``afx.transforms.scale_by_apollo``) projects the gradient of every matrix to
rank ``r``: ``G P`` with ``P`` of shape ``(C, r)`` when the matrix has at least as many rows
as columns, ``P G`` with ``P`` of shape ``(r, R)`` otherwise. On CPU Inductor hands these
products to ATen's matrix multiply, so timing that call on each of a model's matrix shapes
gives the part of the step that no fusion of afx's element-wise loops can shorten.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from typing import Any


def time_projection(shapes: list[tuple[int, ...]], rank: int, reps: int) -> dict[str, Any]:
    """Times the rank-``rank`` projection of one gradient of each shape in ``shapes``.

    Args:
        shapes: the model's tensor shapes; those with fewer than two dimensions are skipped
            (APOLLO leaves them to another route) and the rest are viewed as ``(R, C)`` with
            ``C`` the product of the trailing dimensions, as APOLLO does.
        rank: the projection's rank.
        reps: timed products per distinct shape, after two untimed ones.

    Returns:
        ``ms`` (the sum over ``shapes`` of each shape's median time), ``gflop`` (floating-point
        operations of one step's products, in 1e9) and ``gflops`` (their rate), and per shape
        its count and median ``ms``.
    """
    import torch

    per_shape, total_s, flop = [], 0.0, 0
    for shape, count in Counter(tuple(s) for s in shapes if len(s) >= 2).items():
        rows, cols = shape[0], math.prod(shape[1:])
        g = torch.randn(rows, cols)
        left, right = ((g, torch.randn(cols, rank)) if rows >= cols
                       else (torch.randn(rank, rows), g))
        for _ in range(2):
            torch.mm(left, right)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            torch.mm(left, right)
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        per_shape.append({"shape": list(shape), "count": count, "ms": 1e3 * median})
        total_s += count * median
        flop += count * 2 * rows * cols * rank
    return {"rank": rank, "ms": 1e3 * total_s, "gflop": flop / 1e9,
            "gflops": flop / total_s / 1e9 if total_s else 0.0, "shapes": per_shape}
