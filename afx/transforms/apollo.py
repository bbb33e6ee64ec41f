"""APOLLO: Adam-like step sizes estimated in a random low-rank projection of the gradient."""

from __future__ import annotations

import itertools
import math
from collections import namedtuple
from typing import Any

import torch

from afx import sharding
from afx.base import (
    NON_NEGATIVE,
    GradientTransformation,
    Hyper,
    Hyperparam,
    hyper_value,
    hyperparams,
    per_leaf,
    step_count,
)
from afx.counter_rng import normal
from afx.matmul import matmul
from afx.numerics import (
    channel_norms,
    clip_rms,
    factored_rsqrt,
    fp32_zeros,
    full_mean,
    hoisted,
    norm,
)
from afx.transforms.came import residual_means
from afx.tree import current_param_index

Tensor = torch.Tensor
FLT_MIN = torch.finfo(torch.float32).tiny
# Keeps APOLLO's projections out of the streams other users of afx.counter_rng draw with the
# same small seeds (stochastic rounding seeds parameters by position).
_SALT = 0x41504F4C


def _state_type(fields: tuple[str, ...]) -> type:
    """The ``ApolloState`` named tuple with these fields (they depend on the options).

    One class per set of fields, named after the optional ones and kept as an attribute of
    this module, so that pickle finds it by reference: a saved compiled function's guards
    (:mod:`afx.optim.precompiled`) must name the very class a later process passes in. A
    class made anew in each call (or one whose ``__qualname__`` differs from its name) is
    rebuilt when the guards are loaded and never matches.
    """
    name = "_".join(("ApolloState", *fields[3:]))  # seed, draws, last_refresh: always there
    cls = globals().get(name)
    if cls is None:
        cls = globals()[name] = namedtuple(name, fields, module=__name__)
    return cls


def low_rank_shape(shape: tuple[int, ...], rank: int) -> tuple[int, int]:
    """Shape of the projected gradient of a parameter of ``shape`` (≥ 2 dims).

    The parameter is viewed as ``(shape[0], prod(shape[1:]))``; the longer side is kept and the
    shorter one compressed to ``rank``.

    Example:
        >>> from afx.transforms.apollo import low_rank_shape
        >>> low_rank_shape((1024, 4096), 16), low_rank_shape((64, 3, 3, 3), 4)
        ((16, 4096), (64, 4))
    """
    rows, cols = shape[0], math.prod(shape[1:])
    return (rows, rank) if rows >= cols else (rank, cols)


def proj_shape(shape: tuple[int, ...], rank: int) -> tuple[int, int]:
    """Shape of the projection that multiplies the matrix view ``G`` of a parameter.

    ``(C, r)`` (``L = G @ P``) when ``R ≥ C``, else ``(r, R)`` (``L = P @ G``): adafactor8bit's
    ``apollo_proj_matrix_T`` layout.
    """
    rows, cols = shape[0], math.prod(shape[1:])
    return (cols, rank) if rows >= cols else (rank, rows)


def scale_by_apollo(
    rank: int,
    *,
    proj_gap: int = 200,
    scale_type: str = "channel",
    decay_rate: float = -0.8,
    beta2: float | None = None,
    momentum: bool = False,
    beta1: float = 0.9,
    eps: float = 1e-6,
    factorize: bool = False,
    confidence: bool = False,
    beta3: float = 0.9999,
    eps_came: float = 1e-16,
    clip_threshold: float = 1.0,
    cache_proj: bool = False,
    seed: int = 1,
    finite_grads: bool = False,
) -> GradientTransformation:
    """Scales the full-rank gradient by step sizes an Adam-like rule finds in a projection.

    A parameter is viewed as a matrix ``G`` of shape ``(R, C) = (shape[0], rest)``. With a
    random Gaussian ``P`` (entries ``N(0, 1/r)``), redrawn every ``proj_gap`` steps, the
    shorter side is projected to rank ``r``: ``L = G Pᵀ`` (``R ≥ C``) or ``L = Pᵀ G``. In that
    space an Adam-like update is formed (no bias correction; weight ``w_t = t^decay_rate`` or
    ``1 − beta2``):

    * ``V ← lerp(V, L², w_t)``, ``U = M / (√V + eps)`` with ``M ← lerp(M, L, 1 − β₁)`` if
      ``momentum``, else ``L / (√V + eps)``;
    * ``factorize``: ``V`` replaced by Adafactor's factored estimate of ``L² + 2⁻¹²⁶`` (row and
      column EMAs, the row mean floored at ``eps``);
    * ``confidence`` (CAME in the projection, needs ``momentum``): ``U₀ = L / √max(V, eps²)``
      clipped to RMS ``d``, ``M ← lerp(M, U₀, 1 − β₁)``, the residual
      ``Res ← lerp(Res, (U₀ − M)² + eps_came, 1 − β₃)`` (factored with ``factorize``), and
      ``U = M / √max(Res, eps²)``.

    The output is the gradient scaled per channel, ``S ⊙ G`` with
    ``S_i = ‖U_i‖ / (‖L_i‖ + 1e-8)`` over the rows (``R ≥ C``) or columns of ``L``, or one
    ``S = ‖U‖ / (‖L‖ + 1e-8)`` for ``scale_type="tensor"``. Non-finite gradient entries count as
    zero, unless ``finite_grads`` says the caller discards such updates. Moments persist across
    projection refreshes.

    The projection is a counter-based function of the parameter's seed and how many times it
    was redrawn (:func:`afx.counter_rng.normal`), so it is regenerated inside the compiled step
    at the cost of one elementwise pass over ``P`` and never needs storing. ``cache_proj``
    keeps it in the state anyway (as ``proj``, the matrix that multiplies ``G``), which lets a
    checkpoint carry a projection made elsewhere; the numbers are the same either way.
    Inside an optimizer, a parameter's seed is ``seed − 1`` plus its 1-based position in
    ``param_groups``; elsewhere parameters get ``seed, seed + 1, ...`` in the order they are
    initialised.

    Args:
        rank: ``r ≥ 1``, the projection rank.
        proj_gap: steps between projection refreshes (hyperparameter
            ``"apollo_update_proj_gap"``); the first refresh is at step 1.
        scale_type: ``"channel"`` or ``"tensor"``.
        decay_rate: exponent of the weight schedule (hyperparameter ``"decay_rate"``).
        beta2: a fixed EMA coefficient instead (hyperparameter ``"beta2"``).
        momentum: keep a low-rank momentum (hyperparameter ``"beta1"``).
        beta1: default of ``"beta1"``.
        eps: hyperparameter ``"apollo_eps"``.
        factorize: factor the low-rank second moment.
        confidence: CAME's confidence in the projection (hyperparameters ``"beta3"``,
            ``"eps_came"``, ``"clip_threshold"``).
        beta3: default of ``"beta3"``.
        eps_came: default of ``"eps_came"``.
        clip_threshold: default of ``"clip_threshold"`` (``d``; 0 disables the clip of ``U₀``).
        cache_proj: store the projection in the state.
        seed: the first parameter's seed.
        finite_grads: use ``G`` as it is, without replacing its NaN and ±Inf entries by zero:
            for callers that throw away the update of a non-finite gradient anyway (an
            :class:`afx.optim.Optimizer` with ``skip_nonfinite=True``). Saves a float32 copy of
            the gradient, the largest temporary of the step.

    Returns:
        The transformation (≥ 2-D parameters; needs ``hyper["step"]``), state a NamedTuple
        ``ApolloState`` with ``seed``, ``draws``, ``last_refresh``, optionally ``proj``, and the
        low-rank statistics ``v`` (or ``v_low_row``, ``v_low_col``), ``m``, ``res`` (or
        ``c_row``, ``c_col``).

    References:
        Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", 2024;
        Luo et al., "CAME: Confidence-guided Adaptive Memory Efficient Optimization", 2023.

    Example:
        >>> import torch, afx
        >>> from afx import transforms as T
        >>> tx = afx.count_steps(T.scale_by_apollo(2, beta2=0.999, scale_type="tensor"))
        >>> g = torch.randn(8, 16)
        >>> state = tx.init(g)
        >>> u, state = tx.update(g, state, g, {})
        >>> tuple(state.inner.v.shape), torch.allclose(u / g, (u / g)[0, 0])
        ((2, 16), True)
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Invalid apollo_rank: {rank!r} (must be an int >= 1)")
    if scale_type not in ("channel", "tensor"):
        raise ValueError(f"Invalid apollo_scale_type: {scale_type!r} ('channel' or 'tensor')")
    if confidence and not momentum:
        raise ValueError("scale_by_apollo: confidence (CAME) needs momentum")
    unit = dict(low=0.0, high=1.0, high_inclusive=False)
    specs: dict[str, Hyperparam] = {
        "apollo_update_proj_gap": Hyperparam(proj_gap, 1.0),
        "apollo_eps": NON_NEGATIVE._replace(default=eps),
    }
    if beta2 is None:
        specs["decay_rate"] = Hyperparam(decay_rate, high=0.0)
    else:
        specs["beta2"] = Hyperparam(beta2, **unit)
    if momentum:
        specs["beta1"] = Hyperparam(beta1, **unit)
    if confidence:
        specs.update(beta3=Hyperparam(beta3, **unit),
                     eps_came=NON_NEGATIVE._replace(default=eps_came),
                     clip_threshold=NON_NEGATIVE._replace(default=clip_threshold))

    fields = ["seed", "draws", "last_refresh"] + (["proj"] if cache_proj else [])
    fields += ["v_low_row", "v_low_col"] if factorize else ["v"]
    fields += ["m"] if momentum else []
    if confidence:
        fields += ["c_row", "c_col"] if factorize else ["res"]
    state_type = _state_type(tuple(fields))
    seeds = itertools.count(seed)

    def init_leaf(p: Tensor) -> Any:
        if p.ndim < 2:
            raise ValueError(f"scale_by_apollo needs parameters with >= 2 dims, got shape "
                             f"{tuple(p.shape)}; route smaller ones elsewhere (afx.partition)")
        shape = sharding.full_shape(p)
        low = low_rank_shape(shape, rank)
        # Sharded on dim 0 with R >= C, the low-rank tensors (R, r) are sharded with the
        # parameter (this rank's rows); their row statistics are kept whole, like Adafactor's.
        # With R < C they are (r, C), the same on every rank.
        local = (p.shape[0], rank) if shape[0] >= math.prod(shape[1:]) else low
        # Inside an optimizer the seed is the parameter's position (unique, the same on every
        # rank). Meta tensors are shape templates, not parameters: they use up no seed.
        position = current_param_index()
        first = (0 if p.device.type == "meta" else
                 seed - 1 + position if position is not None else next(seeds))
        values: dict[str, Tensor] = {
            "seed": torch.tensor(first, dtype=torch.int64, device=p.device),
            "draws": fp32_zeros((), p), "last_refresh": fp32_zeros((), p),
            "proj": fp32_zeros(proj_shape(shape, rank), p),
            "v": fp32_zeros(local, p), "v_low_row": fp32_zeros(low[:1], p),
            "v_low_col": fp32_zeros(low[1:], p), "m": fp32_zeros(local, p),
            "res": fp32_zeros(local, p), "c_row": fp32_zeros(low[:1], p),
            "c_col": fp32_zeros(low[1:], p)}
        return state_type(**{f: values[f] for f in fields})

    def projection(state: Any, t: Tensor, hyper: Hyper | None,
                   shape: tuple[int, int], device: torch.device) -> tuple[Tensor, dict]:
        gap = hyper_value(hyper, "apollo_update_proj_gap", proj_gap)
        refresh = (state.draws == 0) | (t - state.last_refresh >= gap)
        draws = torch.where(refresh, state.draws + 1, state.draws)
        last = torch.where(refresh, t, state.last_refresh)
        fresh = normal(state.seed ^ _SALT, draws, shape, device) * rank ** -0.5
        proj = torch.where(refresh, fresh, state.proj) if cache_proj else fresh
        kept = {"draws": draws, "last_refresh": last.float()}
        if cache_proj:
            kept["proj"] = proj
        return proj, kept

    def update_leaf(g: Tensor, state: Any, p: Tensor | None, hyper: Hyper | None):
        local_shape = g.shape
        shape = sharding.full_shape(g)
        g = g.float()
        if not finite_grads:
            g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        g = g.reshape(g.shape[0], math.prod(shape[1:]))  # explicit: a shard may hold no rows
        right = shape[0] >= g.shape[1]
        t = step_count(hyper)
        proj, new = projection(state, t, hyper, proj_shape(shape, rank), g.device)
        if right:
            low = matmul(g, proj)   # this rank's rows of L when sharded
        else:
            # L = P G sums over the parameter's rows: this rank's columns of P times its rows
            # of G, summed over the ranks.
            low = sharding.all_reduce(matmul(sharding.local_rows(proj, 1), g))
        # With R >= C, L is sharded like the parameter; otherwise it is whole on every rank.
        rows = sharding.local_rows if right else (lambda x: x)
        weight = hoisted(1.0 - hyper_value(hyper, "beta2", beta2) if beta2 is not None
                         else t ** hyper_value(hyper, "decay_rate", decay_rate))
        e = hyper_value(hyper, "apollo_eps", eps)
        floor = torch.clamp(torch.as_tensor(e) ** 2, min=FLT_MIN)
        b1 = hyper_value(hyper, "beta1", beta1)

        def ema(old: Tensor, target: Tensor, w: Any) -> Tensor:
            """``lerp(old, target, w)`` for a low-rank state, in ``target``'s shape."""
            if right:
                return torch.lerp(old, target, w)
            # L = P G is (r, C): its rows rarely line up with the blocks an 8-bit state is
            # encoded in, and Inductor's loop over the matrix then fetches every element's
            # block statistics one by one. Over the flat state it splits the index by the
            # block length and reads them once per block (one 768×3072 parameter, the kernel
            # after the product: 4.7 -> 3.3 ms).
            return torch.lerp(old.reshape(-1), target.reshape(-1), w).view(target.shape)

        if factorize:
            sq = low.square()
            v_row = torch.lerp(state.v_low_row, full_mean(sq, -1, sharded=right) + FLT_MIN,
                               weight)
            v_col = torch.lerp(state.v_low_col, full_mean(sq, -2, sharded=right) + FLT_MIN,
                               weight)
            new.update(v_low_row=v_row, v_low_col=v_col)
        else:
            v = ema(state.v, low.square(), weight)
            new["v"] = v

        if confidence:
            inv = (factored_rsqrt(v_row, v_col, FLT_MIN, sharded=right) if factorize
                   else torch.maximum(v, floor).rsqrt())
            u0 = clip_rms(low * inv, hyper_value(hyper, "clip_threshold", clip_threshold),
                          sharded=right)
            m = ema(state.m, u0, 1.0 - b1)
            eps_c = hyper_value(hyper, "eps_came", eps_came)
            c_weight = 1.0 - hyper_value(hyper, "beta3", beta3)
            if factorize:
                row_mean, col_mean = residual_means(u0, m, eps_c, sharded=right)
                c_row = torch.lerp(state.c_row, row_mean, c_weight)
                c_col = torch.lerp(state.c_col, col_mean, c_weight)
                new.update(c_row=c_row, c_col=c_col)
                scaled = m * factored_rsqrt(c_row, c_col, FLT_MIN, sharded=right)
            else:
                res = ema(state.res, (u0 - m).square() + eps_c, c_weight)
                new["res"] = res
                scaled = m * torch.maximum(res, floor).rsqrt()
            new["m"] = m
        else:
            if factorize:
                row_mean = torch.clamp(v_row.mean(), min=e)
                root = torch.sqrt(rows(v_row)[:, None] * v_col[None, :] / row_mean)
            else:
                root = v.sqrt()
            numerator = low
            if momentum:
                numerator = new["m"] = ema(state.m, low, 1.0 - b1)
            scaled = numerator / (root + e)

        if scale_type == "tensor":
            s = norm(scaled, sharded=right) / (norm(low, sharded=right) + 1e-8)
        else:
            dim = -1 if right else -2
            s = channel_norms(scaled, dim) / (channel_norms(low, dim) + 1e-8)
        # Built by calling the class, not with _replace: Dynamo would guard the identity of
        # _replace's helper functions, which a saved compiled function cannot keep.
        new_state = type(state)(*(new.get(f, getattr(state, f)) for f in state._fields))
        # S is one factor per row or column: computed once, not with two square roots and a
        # division for every element of G.
        return (hoisted(s) * g).reshape(local_shape), new_state

    return per_leaf(init_leaf, update_leaf, hyperparams(**specs))
