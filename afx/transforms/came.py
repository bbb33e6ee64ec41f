"""CAME's confidence-guided momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from afx.base import (
    NON_NEGATIVE,
    GradientTransformation,
    Hyper,
    Hyperparam,
    hyper_value,
    hyperparams,
    per_leaf,
)
from afx.numerics import factored_rsqrt, fp32_zeros, full_mean
from afx.sharding import full_shape
from afx.transforms.momentum import EmaState, lerp_momentum, momentum_blocks

Tensor = torch.Tensor


class CameState(NamedTuple):
    """Momentum ``m`` and the row/column EMAs of the residual ``(u − m)² + eps_came``.

    Attributes:
        m: the EMA of the (normalised, clipped) updates, the parameter's shape.
        c_row: shape ``(..., R)``.
        c_col: shape ``(..., C)``.

    References:
        Luo et al., "CAME: Confidence-guided Adaptive Memory Efficient Optimization", 2023.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> T.came_confidence().init(torch.zeros(2, 3))
        CameState(m=tensor([[0., 0., 0.],
                [0., 0., 0.]]), c_row=tensor([0., 0.]), c_col=tensor([0., 0., 0.]))
    """

    m: Tensor
    c_row: Tensor
    c_col: Tensor


def residual_means(u: Tensor, m: Tensor, eps: Any, *, sharded: bool = True,
                   block: int | None = None) -> tuple[Tensor, Tensor]:
    """Row and column means of CAME's residual ``(u − m)² + eps`` (whole when sharded).

    The column mean's residual is written as ``(m − u)²`` (equal bits): as one expression
    feeding two reductions over different axes, the compiler stores it whole (a
    parameter-sized float32 temporary) for the second; as two, the column pass recomputes it
    from ``m``, which is stored anyway, and reads the same number of bytes.

    Args:
        u: the normalised update, shape ``(..., R, C)``.
        m: the new momentum, the same shape.
        eps: added to the residual (``eps_came``).
        sharded: ``False`` if ``u`` is the same whole tensor on every rank.
        block: sum the row means block by block (see :func:`afx.numerics.full_mean`), for a
            momentum created in blocks of this length.

    Returns:
        ``(mean over C, mean over R)``.

    References:
        Luo et al., "CAME: Confidence-guided Adaptive Memory Efficient Optimization", 2023.

    Example:
        >>> import torch
        >>> from afx.transforms.came import residual_means
        >>> residual_means(torch.ones(2, 3), torch.zeros(2, 3), 0.0)
        (tensor([1., 1.]), tensor([1., 1., 1.]))
    """
    rows = full_mean((u - m).square() + eps, -1, sharded=sharded, block=block)
    cols = full_mean((m - u).square() + eps, -2, sharded=sharded)
    return rows, cols


def came_confidence(beta1: float = 0.9, beta3: float = 0.9999, eps_came: float = 1e-16,
                    eps1: float = 1e-30, *,
                    momentum_block: int | None = None) -> GradientTransformation:
    """Momentum scaled by CAME's confidence in it (official CAME, adafactor8bit 0.4.6).

    For a normalised update ``u`` (Adafactor's ``g/√V̂``, clipped) of shape ``(..., R, C)``:
    ``m ← lerp(m, u, 1 − β₁)``; ``r = (u − m)² + eps_came``;
    ``c_row ← lerp(c_row, mean_C(r), 1 − β₃)``, ``c_col ← lerp(c_col, mean_R(r), 1 − β₃)``;
    output ``m / √Ĉ`` with ``Ĉ = c_row c_colᵀ / max(mean(c_row), eps1)``. Tensors with fewer
    than two dims get the momentum alone (``u ← m``), as in the official algorithm.

    The confidence starts at zero without bias correction, so the first steps are about
    ``1/√(1 − β₃)`` (100× at β₃ = 0.9999) larger than later ones; use a warmup.

    Args:
        beta1: momentum coefficient, hyperparameter ``"beta1"``.
        beta3: confidence EMA coefficient, hyperparameter ``"beta3"``.
        eps_came: added to the residual, hyperparameter ``"eps_came"``.
        eps1: floor of the row mean, hyperparameter ``"eps1"``.
        momentum_block: the block length ``m`` is encoded in, if it is: a compiled step then
            creates ``m`` and sums the residual's row means in those blocks
            (:func:`afx.transforms.momentum.lerp_momentum`), so the encoder's block absmax
            shares their loop. Same values, up to the order of the row sums' additions.

    Returns:
        The transformation, state :class:`CameState` (≥2-D) or ``EmaState``.

    References:
        Luo et al., "CAME: Confidence-guided Adaptive Memory Efficient Optimization", 2023.

    Example:
        >>> import torch
        >>> from afx import transforms as T
        >>> tx = T.came_confidence(beta1=0.5, beta3=0.5, eps_came=0.0)
        >>> u, state = tx.update(torch.ones(2, 3), tx.init(torch.zeros(2, 3)), None, {})
        >>> state.m[0], state.c_row
        (tensor([0.5000, 0.5000, 0.5000]), tensor([0.1250, 0.1250]))
    """
    unit = dict(low=0.0, high=1.0, high_inclusive=False)
    specs = hyperparams(beta1=Hyperparam(beta1, **unit), beta3=Hyperparam(beta3, **unit),
                        eps_came=NON_NEGATIVE._replace(default=eps_came),
                        eps1=NON_NEGATIVE._replace(default=eps1))

    def init_leaf(p: Tensor):
        if p.ndim < 2:
            return EmaState(fp32_zeros(p.shape, p))
        shape = full_shape(p)  # whole statistics, as in scale_by_factored_rms
        return CameState(fp32_zeros(p.shape, p), fp32_zeros(shape[:-1], p),
                         fp32_zeros(shape[:-2] + shape[-1:], p))

    def update_leaf(u: Tensor, state, p, hyper: Hyper | None):
        u = u.float()
        blocks = momentum_blocks(u, momentum_block)
        m = lerp_momentum(state.m, u, 1.0 - hyper_value(hyper, "beta1", beta1), blocks)
        if isinstance(state, EmaState):
            return m, EmaState(m)
        row_mean, col_mean = residual_means(u, m, hyper_value(hyper, "eps_came", eps_came),
                                            block=blocks)
        weight = 1.0 - hyper_value(hyper, "beta3", beta3)
        c_row = torch.lerp(state.c_row, row_mean, weight)
        c_col = torch.lerp(state.c_col, col_mean, weight)
        inv = factored_rsqrt(c_row, c_col, hyper_value(hyper, "eps1", eps1))
        return m * inv, CameState(m, c_row, c_col)

    return per_leaf(init_leaf, update_leaf, specs)
