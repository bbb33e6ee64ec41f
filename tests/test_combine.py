"""chain, named_chain, partition, masked and rename_hyperparams."""

from __future__ import annotations

import pytest
import torch

import afx
from afx import transforms as T


def test_chain_applies_in_order_and_keeps_each_state() -> None:
    """chain(a, b) = b(a(u)); the state is the tuple of the parts' states."""
    tx = afx.chain(T.ema(0.5), T.scale(3.0))
    u, state = tx.update(torch.ones(2), tx.init(torch.zeros(2)), None, {})
    torch.testing.assert_close(u, torch.full((2,), 1.5))
    assert isinstance(state, tuple) and len(state) == 2
    torch.testing.assert_close(state[0].m, torch.full((2,), 0.5))


def test_named_chain_names_its_states_and_rejects_bad_names() -> None:
    """State keys are the part names; duplicate or dotted names raise."""
    tx = afx.named_chain(("mom", T.ema()), ("lr", T.scale_by_learning_rate()))
    assert list(tx.init(torch.zeros(1))) == ["mom", "lr"]
    with pytest.raises(ValueError, match="unique"):
        afx.named_chain(("a", T.ema()), ("a", T.scale(1.0)))
    with pytest.raises(ValueError, match="dot"):
        afx.named_chain(("a.b", T.ema()))


def test_hyperparameters_are_merged_and_conflicts_rejected() -> None:
    """Same name with different defaults is an error that suggests renaming."""
    assert set(afx.chain(T.ema(0.9), T.clip_by_rms()).hyperparams) == {"beta1", "clip_threshold"}
    with pytest.raises(ValueError, match="rename_hyperparams"):
        afx.chain(T.ema(0.9), T.ema(0.99))
    renamed = afx.chain(T.ema(0.9), afx.rename_hyperparams(T.ema(0.99), {"beta1": "beta_slow"}))
    assert set(renamed.hyperparams) == {"beta1", "beta_slow"}


def test_renamed_hyperparameter_is_read_under_its_new_name() -> None:
    """A renamed transform ignores the old name and reads the new one."""
    tx = afx.rename_hyperparams(T.ema(0.9), {"beta1": "slow"})
    u, _ = tx.update(torch.ones(1), tx.init(torch.zeros(1)), None,
                     {"beta1": torch.tensor(0.0), "slow": torch.tensor(0.75)})
    assert u.item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="not among"):
        afx.rename_hyperparams(T.ema(), {"lr": "x"})


def test_partition_routes_by_shape_and_by_name() -> None:
    """Each leaf is handled by the transform its label names; its state records the route."""
    params = {"w": torch.ones(2, 2), "b": torch.ones(2), "embed": torch.ones(3, 2)}
    tx = afx.partition({"matrix": T.scale(2.0), "vector": T.scale(-1.0), "frozen": T.scale(0.0)},
                       lambda name, p: "frozen" if name == "embed" else
                       ("matrix" if p.ndim == 2 else "vector"))
    state = tx.init(params)
    assert list(state["w"]) == ["matrix"] and list(state["embed"]) == ["frozen"]
    u, _ = tx.update(params, state, params, {})
    assert u["w"].eq(2).all() and u["b"].eq(-1).all() and u["embed"].eq(0).all()
    with pytest.raises(ValueError, match="label"):
        afx.partition({"a": T.scale(1.0)}, lambda n, p: "b").init(params)


def test_masked_leaves_unselected_parameters_alone() -> None:
    """Unselected leaves pass through unchanged and carry no state."""
    params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    tx = afx.masked(T.ema(0.5), lambda name, p: p.ndim == 2)
    state = tx.init(params)
    assert isinstance(state["b"], afx.Skipped)
    u, _ = tx.update(params, state, params, {})
    assert u["w"].eq(0.5).all() and u["b"].eq(1).all()


def test_pytree_updates_are_pure() -> None:
    """update over a dict of params leaves updates, state and params untouched."""
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    tx = afx.count_steps(afx.chain(T.scale_by_factored_rms(), T.ema(), T.clip_by_rms()))
    state = tx.init(params)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    copies = [t.clone() for t in (*grads.values(), *params.values())]
    _, new_state = tx.update(grads, state, params, {})
    for before, after in zip(copies, (*grads.values(), *params.values())):
        assert torch.equal(before, after)
    assert int(state.step) == 0 and int(new_state.step) == 1


def test_apply_updates_rounds_to_the_parameter_dtype() -> None:
    """apply_updates adds in float32 and returns each parameter's dtype."""
    p = {"w": torch.ones(2, dtype=torch.bfloat16)}
    out = afx.apply_updates(p, {"w": torch.full((2,), 1e-3)})
    assert out["w"].dtype == torch.bfloat16 and p["w"].eq(1).all()
