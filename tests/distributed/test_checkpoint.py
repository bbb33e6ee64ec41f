"""torch.distributed.checkpoint: optimizer state saved by 2 ranks loads into 1 rank and back."""

from __future__ import annotations

import pytest
import torch
from dist_launch import GLOO, SKIP_REASON, launch

pytestmark = pytest.mark.skipif(not GLOO, reason=SKIP_REASON)

NAMES = ["8bit_beta1", "apollo_cached", "adafactor_beta1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("dcp")
    # a: 2 ranks train 3 steps, save, train 2 more (the uninterrupted run);
    # b: 1 rank loads a's checkpoint, saves it again, trains 2 steps;
    # c: 2 ranks load b's checkpoint, train 2 steps.
    launch("dist_workers", "dcp_runs", 2, out, names=NAMES, steps=3, more=2, tag="a")
    launch("dist_workers", "dcp_runs", 1, out, names=NAMES, steps=3, more=2, tag="b",
           load_from="a")
    launch("dist_workers", "dcp_runs", 2, out, names=NAMES, steps=3, more=2, tag="c",
           load_from="b")
    return lambda name, what: torch.load(out / f"{what}-{name}.pt", weights_only=False)


def assert_identical(x: dict, y: dict) -> None:
    for n, p in x["params"].items():
        assert torch.equal(p, y["params"][n]), n
        assert set(x["state"][n]) == set(y["state"][n]), n
        for k, v in x["state"][n].items():
            assert v.shape == y["state"][n][k].shape and torch.equal(v, y["state"][n][k]), (n, k)


@pytest.mark.parametrize("name", NAMES)
def test_two_ranks_to_one_rank_and_back_is_exact(run, name: str) -> None:
    """Adafactor8Bit with 8-bit momentum (sharded codes, whole factored statistics, a float32
    momentum whose rows are not whole blocks), APOLLO (cached projection) and afx.Adafactor
    (transformers' state names, loaded into a fresh optimizer via init_state): the state one
    rank loads from a 2-rank DCP checkpoint into a fresh optimizer, gathered, is bitwise the
    state the 2 ranks saved; saved again from 1 rank and loaded into 2 ranks it is still
    bitwise the same; and 2 ranks continuing from it for 2 steps end bitwise where the
    uninterrupted run ends."""
    assert_identical(run(name, "saved-a"), run(name, "loaded-b"))
    assert_identical(run(name, "saved-b"), run(name, "loaded-c"))
    assert_identical(run(name, "after-a"), run(name, "after-c"))


@pytest.mark.parametrize("name", NAMES)
def test_one_rank_continues_like_two(run, name: str) -> None:
    """The single rank that loaded the 2-rank checkpoint trains on: after 2 steps its
    parameters equal the uninterrupted 2-rank run's within 1e-5 relative (only the rounding
    of cross-rank sums differs)."""
    two, one = run(name, "after-a"), run(name, "after-b")
    for n, p in two["params"].items():
        assert ((one["params"][n] - p).abs().max() <= 1e-5 * p.abs().max()), n
