"""Independent float64 NumPy statements of the transforms' math, for comparison."""

from __future__ import annotations

import numpy as np


def factored_rms_steps(grads: list[np.ndarray], decay_rate: float = -0.8, eps1: float = 1e-30,
                       factored: bool = True) -> list[np.ndarray]:
    """Adafactor's g / sqrt(V_hat) for a sequence of gradients (paper, algorithm 4)."""
    out, row, col, full = [], None, None, None
    for t, g in enumerate(grads, start=1):
        w = t ** decay_rate
        sq = g * g + eps1
        if factored and g.ndim >= 2:
            r, c = sq.mean(axis=-1), sq.mean(axis=-2)
            row = r if row is None else (1 - w) * row + w * r
            col = c if col is None else (1 - w) * col + w * c
            v_hat = row[..., :, None] * col[..., None, :] / row.mean(axis=-1)[..., None, None]
        else:
            full = sq if full is None else (1 - w) * full + w * sq
            v_hat = full
        out.append(g / np.sqrt(v_hat))
    return out
