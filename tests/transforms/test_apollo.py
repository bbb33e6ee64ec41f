"""scale_by_apollo: projection schedule, scaling rule, state, seeds, edge cases."""

from __future__ import annotations

import pytest
import torch

import afx
from afx import transforms as T
from afx.transforms.apollo import low_rank_shape, proj_shape


def run(tx: afx.GradientTransformation, grads: list[torch.Tensor], hyper: dict | None = None):
    """Applies ``count_steps(tx)`` to each gradient in turn; returns the updates and states."""
    tx = afx.count_steps(tx)
    state = tx.init(grads[0])
    updates, states = [], []
    for g in grads:
        u, state = tx.update(g, state, g, hyper or {})
        updates.append(u)
        states.append(state.inner)
    return updates, states


def gradients(shape: tuple[int, ...], n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def test_projection_is_redrawn_exactly_every_gap_steps() -> None:
    """Refreshes happen at t = 1, 1 + gap, 1 + 2·gap: the cached projection changes then and
    only then, and the draw counter counts them."""
    _, states = run(T.scale_by_apollo(3, proj_gap=4, beta2=0.9, cache_proj=True),
                    gradients((10, 6), 10))
    changed = [t + 1 for t in range(1, 10)
               if not torch.equal(states[t].proj, states[t - 1].proj)]
    assert changed == [5, 9]
    assert [int(s.draws) for s in states] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert [int(s.last_refresh) for s in states] == [1, 1, 1, 1, 5, 5, 5, 5, 9, 9]


def test_the_gap_is_a_hyperparameter() -> None:
    """Changing ``apollo_update_proj_gap`` at run time moves the next refresh (no rebuild)."""
    _, states = run(T.scale_by_apollo(2, proj_gap=100, beta2=0.9), gradients((8, 4), 4),
                    {"apollo_update_proj_gap": torch.tensor(2.0, dtype=torch.float64)})
    assert [int(s.draws) for s in states] == [1, 1, 2, 2]


def test_cached_and_regenerated_projections_give_the_same_updates() -> None:
    """``cache_proj`` only stores the projection: the updates are bitwise the same."""
    grads = gradients((12, 5), 7)
    cached, _ = run(T.scale_by_apollo(2, proj_gap=3, beta2=0.9, cache_proj=True), grads)
    fresh, _ = run(T.scale_by_apollo(2, proj_gap=3, beta2=0.9), grads)
    assert all(torch.equal(a, b) for a, b in zip(cached, fresh))


def test_moments_persist_across_a_refresh() -> None:
    """At a refresh the low-rank moments are not reset: v = lerp(v_prev, L², 1 − β₂) with L
    the gradient under the new projection (adafactor8bit 0.4.6 and official APOLLO)."""
    grads = gradients((9, 4), 3)
    _, states = run(T.scale_by_apollo(2, proj_gap=2, beta2=0.9, momentum=True,
                                      cache_proj=True), grads)
    low = grads[2] @ states[2].proj
    assert int(states[2].draws) == 2
    torch.testing.assert_close(states[2].v, torch.lerp(states[1].v, low.square(), 0.1))
    torch.testing.assert_close(states[2].m, torch.lerp(states[1].m, low, 0.1))


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (6, 2, 3)])
def test_channel_scaling_is_one_factor_per_channel(shape: tuple[int, ...]) -> None:
    """The update is ``S ⊙ G``: one positive factor per row of the matrix view when it has at
    least as many rows as columns, else per column; the output keeps the parameter's shape."""
    g = gradients(shape, 1)[0]
    (u,), _ = run(T.scale_by_apollo(2, beta2=0.9), [g])
    assert u.shape == g.shape
    ratio = (u / g).reshape(shape[0], -1)
    per_channel = ratio[:, :1] if ratio.shape[0] >= ratio.shape[1] else ratio[:1, :]
    torch.testing.assert_close(ratio, per_channel.expand_as(ratio))
    assert bool((ratio > 0).all())


def test_tensor_scaling_on_the_first_step_is_the_adam_rms() -> None:
    """First step, no momentum, β₂ = 0: ``U = L/(|L| + eps)`` is ±1 entry-wise, so the single
    scale is ``‖U‖/‖L‖ = √numel(L)/‖L‖``."""
    g = gradients((16, 4), 1)[0]
    (u,), states = run(T.scale_by_apollo(3, beta2=0.0, eps=0.0, scale_type="tensor",
                                         cache_proj=True), [g])
    low = g @ states[0].proj
    expected = low.numel() ** 0.5 / torch.linalg.vector_norm(low)
    torch.testing.assert_close(u, expected * g, rtol=1e-5, atol=0)


def test_projection_entries_are_normal_with_variance_one_over_rank() -> None:
    """P has i.i.d. N(0, 1/r) entries (checked on 64k draws, 5-sigma bounds)."""
    _, states = run(T.scale_by_apollo(8, beta2=0.9, cache_proj=True), [torch.ones(4, 8192)])
    p = states[0].proj * 8 ** 0.5
    n = p.numel()
    assert abs(p.mean().item()) < 5 / n ** 0.5
    assert abs(p.var().item() - 1.0) < 5 * (2 / n) ** 0.5
    assert abs((p.abs() < 1).float().mean().item() - 0.6827) < 5 * (0.25 / n) ** 0.5


def test_seeds_are_distinct_per_parameter_and_templates_use_none() -> None:
    """Parameters get seeds seed, seed+1, ... in init order (shape templates on the meta
    device take none), so same-shaped parameters get different projections."""
    tx = T.scale_by_apollo(2, beta2=0.9, seed=5)
    tx.init(torch.empty(6, 4, device="meta"))
    a, b = tx.init(torch.zeros(6, 4)), tx.init(torch.zeros(6, 4))
    assert (int(a.seed), int(b.seed)) == (5, 6)
    g = gradients((6, 4), 1)[0]
    ua, _ = tx.update(g, a, g, {"step": torch.tensor(1.0)})
    ub, _ = tx.update(g, b, g, {"step": torch.tensor(1.0)})
    assert not torch.equal(ua, ub)


def test_non_finite_gradient_entries_count_as_zero() -> None:
    """NaN/Inf entries of the gradient are replaced by 0 (adafactor8bit 0.4.6's APOLLO rule)."""
    g = gradients((8, 3), 1)[0]
    bad = g.clone()
    bad[0, 0], bad[3, 1] = float("nan"), float("inf")
    clean = g.clone()
    clean[0, 0] = clean[3, 1] = 0.0
    (u_bad,), _ = run(T.scale_by_apollo(2, beta2=0.9), [bad])
    (u_clean,), _ = run(T.scale_by_apollo(2, beta2=0.9), [clean])
    assert torch.equal(torch.nan_to_num(u_bad, posinf=0.0), u_clean)


def test_finite_grads_uses_the_gradient_as_it_is() -> None:
    """``finite_grads=True`` skips the NaN/Inf -> 0 copy: a finite gradient gets exactly the
    default update, a non-finite entry reaches the update (the caller discards it)."""
    g = gradients((8, 3), 2)
    (u, u2), _ = run(T.scale_by_apollo(2, beta2=0.9), g)
    (v, v2), _ = run(T.scale_by_apollo(2, beta2=0.9, finite_grads=True), g)
    assert torch.equal(u, v) and torch.equal(u2, v2)
    bad = g[0].clone()
    bad[0, 0] = float("nan")
    (w,), _ = run(T.scale_by_apollo(2, beta2=0.9, finite_grads=True), [bad])
    assert w.isnan().any()


@pytest.mark.parametrize("variant", [dict(factorize=True), dict(momentum=True, confidence=True),
                                     dict(momentum=True, confidence=True, factorize=True)])
def test_state_fields_and_low_rank_shapes(variant: dict) -> None:
    """Each variant keeps exactly its statistics, in the low-rank shape (r, C) or (R, r)."""
    _, states = run(T.scale_by_apollo(3, beta2=0.9, **variant), gradients((5, 20), 2))
    state = states[-1]
    low = low_rank_shape((5, 20), 3)
    assert low == (3, 20) and proj_shape((5, 20), 3) == (3, 5)
    fields = set(state._fields) - {"seed", "draws", "last_refresh"}
    if variant.get("factorize"):
        assert tuple(state.v_low_row.shape) == low[:1] and tuple(state.v_low_col.shape) == low[1:]
    else:
        assert tuple(state.v.shape) == low
    if variant.get("confidence"):
        assert fields >= ({"m", "c_row", "c_col"} if variant.get("factorize") else {"m", "res"})
    assert all(bool(torch.isfinite(getattr(state, f)).all()) for f in fields)


def test_bad_options_name_the_option() -> None:
    """Rank, scale type and CAME-without-momentum are refused with the option's name."""
    with pytest.raises(ValueError, match="apollo_rank"):
        T.scale_by_apollo(0)
    with pytest.raises(ValueError, match="apollo_scale_type"):
        T.scale_by_apollo(2, scale_type="row")
    with pytest.raises(ValueError, match="momentum"):
        T.scale_by_apollo(2, confidence=True)
    with pytest.raises(ValueError, match=">= 2 dims"):
        T.scale_by_apollo(2).init(torch.zeros(5))
