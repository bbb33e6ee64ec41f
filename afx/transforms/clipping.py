"""Update clipping by root mean square."""

from __future__ import annotations

import torch

from afx.base import NON_NEGATIVE, GradientTransformation, hyper_value, hyperparams, stateless
from afx.numerics import clip_rms

Tensor = torch.Tensor


def clip_by_rms(clip_threshold: float = 1.0) -> GradientTransformation:
    """Scales each update down so its root mean square is at most ``d``.

    ``u ← u / max(1, RMS(u) / d)`` per parameter tensor; ``d = 0`` disables clipping.

    Args:
        clip_threshold: ``d ≥ 0`` (hyperparameter ``"clip_threshold"``).

    Returns:
        A stateless transformation.

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018
        (section 5, update clipping).

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> tx = T.clip_by_rms(1.0)
        >>> tx.update(torch.tensor([3.0, 4.0]), tx.init(torch.zeros(2)), None)[0]
        tensor([0.8485, 1.1314])
    """

    def clip(u: Tensor, p: Tensor | None, hyper) -> Tensor:
        return clip_rms(u, hyper_value(hyper, "clip_threshold", clip_threshold))

    specs = hyperparams(clip_threshold=NON_NEGATIVE._replace(default=clip_threshold))
    return stateless(clip, specs)
