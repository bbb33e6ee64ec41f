"""DDP: every rank ends with the same parameters and optimizer state."""

from __future__ import annotations

import pytest
import torch
from dist_launch import GLOO, SKIP_REASON, launch

pytestmark = pytest.mark.skipif(not GLOO, reason=SKIP_REASON)


def test_ddp_ranks_hold_identical_parameters_and_state(tmp_path) -> None:
    """Two DDP ranks, each with its own data and a different torch seed, train bfloat16
    parameters with Adafactor8Bit (APOLLO with cached projections refreshed every 2 steps,
    momentum, 8-bit states, stochastic rounding) for 5 steps: every parameter and every
    state tensor, the projections and rounding seeds included, is bitwise identical on both
    ranks, and stochastic rounding really ran (parameters are bfloat16 with a seed)."""
    launch("dist_workers", "ddp_run", 2, tmp_path, name="apollo_cached")
    first, second = (torch.load(tmp_path / f"ddp-{r}.pt", weights_only=False) for r in (0, 1))
    init = __import__("dist_workers").Net(torch.bfloat16).state_dict()
    for n, p in first["params"].items():
        assert p.dtype == torch.bfloat16 and not torch.equal(p, init[n]), n
        assert torch.equal(p, second["params"][n]), n
        assert set(first["state"][n]) == set(second["state"][n]), n
        for k, v in first["state"][n].items():
            assert torch.equal(v, second["state"][n][k]), (n, k)
    assert "apollo.low_rank.proj" in first["state"]["w"]
    assert int(first["state"]["w"]["apollo.low_rank.draws"]) == 3  # refreshed at steps 1, 3, 5
    assert "sr_seed" in first["state"]["w"]
