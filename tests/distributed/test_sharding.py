"""afx.sharding and the adapter's storage rules, in one process (no collectives needed)."""

from __future__ import annotations

import pytest
import torch

import afx
from afx import sharding
from afx import transforms as T
from afx.optim import distributed
from afx.rounding import stochastic_round
from afx.tree import flatten_state


@pytest.mark.parametrize(("total", "world"), [(7, 2), (3, 2), (1, 2), (5, 4), (8, 3), (0, 2)])
def test_chunk_rows_follow_torch_chunk(total: int, world: int) -> None:
    """Offsets and row counts are torch.chunk's (FSDP2's split), ranks past the end empty."""
    sizes = [c.shape[0] for c in torch.arange(total).chunk(world)] if total else []
    sizes += [0] * (world - len(sizes))
    got = [sharding.chunk_rows(total, world, r) for r in range(world)]
    assert [rows for _, rows in got] == sizes
    assert [offset for offset, _ in got] == [sum(sizes[:r]) for r in range(world)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_of_a_shard_draws_the_single_process_bits(dtype) -> None:
    """Each shard of a parameter, rounded with its Sharding current, is bitwise the
    matching rows of the whole parameter rounded in one process (draws keyed by the global
    element index); without the offset the draws would differ."""
    x = torch.randn(7, 33, generator=torch.Generator().manual_seed(0)) * 1e-3 + 1.0
    seed, step = torch.tensor(5), torch.tensor(3.0)
    whole = stochastic_round(x, dtype, seed, step)
    for rank in range(2):
        offset, rows = sharding.chunk_rows(7, 2, rank)
        with sharding.active(sharding.Sharding("g", 2, (7, 33), offset, rows)):
            part = stochastic_round(x[offset:offset + rows], dtype, seed, step)
        assert torch.equal(part, whole[offset:offset + rows])
    assert not torch.equal(stochastic_round(x[4:], dtype, seed, step), whole[4:])


def _layout(tx, shape, rank, world=2):
    offset, rows = sharding.chunk_rows(shape[0], world, rank)
    with sharding.active(sharding.Sharding("g", world, shape, offset, rows)):
        local = torch.empty((rows, *shape[1:]), device="meta")
        flat, _ = flatten_state(tx.init(local))
        grown, _ = flatten_state(tx.init(torch.empty((rows + 1, *shape[1:]), device="meta")))
    return flat, distributed.storage(flat, grown, rows)


def test_quantized_states_are_sharded_only_where_blocks_align() -> None:
    """With 256-element momentum blocks: a (9, 512) momentum is encoded and its codes follow
    the rows (2 blocks per row); a (7, 600) one stays float32 under sharding although one
    process encodes it; whole factored statistics are encoded exactly as in one process."""
    tx = T.quantize_state(afx.chain(T.scale_by_factored_rms(), T.ema()),
                          {"v_row": "al8", "v_col": "al8", "m": ("uf8", 256)},
                          block_size=2048, min_numel=4096)
    flat, store = _layout(tx, (9, 512), rank=1)
    kinds = dict(zip(flat, store))
    assert kinds["1.m.codes"] == distributed.Storage((8, 256), 2)   # 4 rows x 2 blocks
    assert kinds["1.m.absmax"] == distributed.Storage((8,), 2)
    assert kinds["0.v_row.codes"].per_row is None and flat["0.v_row.codes"].shape == (1, 10)
    assert kinds["0.v_col.codes"].per_row is None
    flat, store = _layout(tx, (7, 600), rank=0)
    assert dict(zip(flat, store))["1.m"] == distributed.Storage((4, 600), 1)
    assert "1.m.codes" in flatten_state(tx.init(torch.empty(7, 600, device="meta")))[0]


def test_rank_without_rows_keeps_the_same_state_structure() -> None:
    """A rank holding no rows (a 1-row parameter on 2 ranks) gets the same state keys and the
    same whole statistics as the rank that holds the row, so both run the same collectives."""
    tx = T.quantize_state(T.scale_by_factored_rms(momentum=True), {"v_row": "al8", "m": "uf8"},
                          min_numel=1)
    first, _ = _layout(tx, (1, 8), rank=0)
    empty, store = _layout(tx, (1, 8), rank=1)
    assert list(first) == list(empty)
    kinds = {k: s.per_row for k, s in zip(empty, store)}
    assert kinds == {"rms.v_row": None, "rms.v_col": None, "m.codes": 1, "m.absmax": 1}
    assert tuple(empty["rms.v_row"].shape) == tuple(first["rms.v_row"].shape) == (1,)
    assert tuple(empty["m.codes"].shape) == (0, 8) and tuple(first["m.codes"].shape) == (1, 8)


def test_state_that_cannot_be_sharded_is_refused() -> None:
    """A state whose dim 0 grows with the shard but not by whole rows is an error, not a
    silently wrong layout."""
    with pytest.raises(RuntimeError, match="cannot shard"):
        distributed.storage({"x": torch.zeros(6)}, {"x": torch.zeros(8)}, 4)


def test_helpers_are_single_process_expressions_without_sharding() -> None:
    """Outside a Sharding context the numerics helpers are exactly the usual expressions."""
    from afx.numerics import all_finite, full_mean, norm, rms

    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(full_mean(x, -2), x.mean(dim=-2))
    assert torch.equal(rms(x), x.square().mean().sqrt())
    assert torch.equal(norm(x), torch.linalg.vector_norm(x))
    assert bool(all_finite(x)) and not bool(all_finite(x.log()))
