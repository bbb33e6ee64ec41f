"""FSDP2 (``fully_shard``, DTensor parameters sharded on dim 0) against a single process.

Two gloo processes train :class:`dist_workers.Net` (uneven shards, a 2-D, a 3-D, a 1-D and a
one-row parameter) for 5 steps with each configuration; the single-process reference trains the
same model on the mean loss of both ranks' batches, which is what FSDP2's averaged gradients
are. Only the rounding of the cross-rank sums differs.
"""

from __future__ import annotations

import dist_workers as W
import pytest
import torch
from dist_launch import GLOO, SKIP_REASON, launch

pytestmark = pytest.mark.skipif(not GLOO, reason=SKIP_REASON)

UNQUANTIZED = ["adafactor", "adafactor_beta1", "8bit_fp32", "8bit_beta1_fp32", "came_fp32",
               "fira_fp32", "apollo_fp32", "apollo_came_fp32"]
QUANTIZED = ["8bit", "8bit_beta1", "came", "fira", "apollo", "apollo_came"]
COMPILED = ["8bit_beta1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    launch("dist_workers", "fsdp_runs", 2, out, names=UNQUANTIZED + QUANTIZED,
           compiled=COMPILED)
    return {"fsdp": torch.load(out / "fsdp.pt", weights_only=False),
            "unsupported": torch.load(out / "unsupported.pt", weights_only=False)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b|, over the tensor."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def same_layout(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    # Sharded codes are stored (R, k, block) where one process stores (R·k, block).
    assert got.numel() == ref.numel()
    return got.reshape(ref.shape)


@pytest.mark.parametrize("name", UNQUANTIZED)
def test_unquantized_matches_single_process(runs: dict, name: str) -> None:
    """With quantization off, every parameter and every optimizer state (factored row and
    column statistics, momentum, CAME confidences, Fira norms, APOLLO low-rank moments and
    projection counters) equals the single-process run within 1e-5 relative."""
    got, ref = runs["fsdp"][name], W.single_process(name)
    worst = max(rel(got["params"][n], p) for n, p in ref["params"].items())
    print(f"\n{name}: FSDP2 vs single process, max relative parameter difference {worst:.2g}")
    assert worst <= 1e-5, worst
    for n, state in ref["state"].items():
        assert set(got["state"][n]) == set(state), n
        for k, v in state.items():
            assert rel(same_layout(got["state"][n][k], v).float(), v.float()) <= 1e-5, (n, k)


def check_quantized(got: dict, ref: dict, ref_fp32: dict) -> None:
    """The bound for quantized states. FSDP2 and the single process run the same encoder on
    inputs that differ only by the rounding of cross-rank sums (~1e-7 relative), which can move
    a value across a rounding boundary of its code: at most 1 % of the codes may differ, none
    by more than one level. Sharded states whose rows are not whole blocks are kept in float32
    under FSDP2 (the single process quantizes them). So each parameter may differ from the
    single-process run by up to the quantization error of that run itself, measured as its
    distance from the same run with quantization off: asserted ``|p_fsdp − p| ≤
    2·max|p − p_fp32| + 1e-5·max|p|`` (the factor 2 leaves room for both runs' errors; 1e-5
    is the unquantized tolerance)."""
    for n, p in ref["params"].items():
        error = (p - ref_fp32["params"][n]).abs().max()
        assert (got["params"][n] - p).abs().max() <= 2 * error + 1e-5 * p.abs().max(), n
    for n, state in ref["state"].items():
        missing = [k for k in state if k not in got["state"][n]]
        for k in missing:
            # A sharded state whose rows are not whole blocks is kept in float32.
            assert k.rsplit(".", 1)[0] in got["state"][n], (n, k)
        if missing:
            continue  # the parameter's other states then differ by that quantization error
        for k, v in state.items():
            mine = same_layout(got["state"][n][k], v)
            if v.dtype == torch.uint8:
                diff = (mine.int() - v.int()).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01, (n, k)
            elif v.is_floating_point() and not k.endswith(("scale", "min_log", "absmax")):
                assert rel(mine.float(), v.float()) <= 1e-5, (n, k)


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_within_quantization_error(runs: dict, name: str) -> None:
    """With 8-bit states (Adafactor8Bit's default, beta1, CAME, Fira, APOLLO), FSDP2's codes
    are the single process's codes (up to a rare one-level flip from the rounding of cross-rank
    sums) and the parameters agree within that error (bound: see check_quantized)."""
    check_quantized(runs["fsdp"][name], W.single_process(name),
                    W.single_process(name + "_fp32"))


def test_compiled_matches_single_process(runs: dict) -> None:
    """compile=True under FSDP2 (functional collectives inside the compiled bucket graph)
    gives the single-process result within the quantization bound of check_quantized, and
    steps 2-5 run under fail_on_recompile (two parameters share a bucket)."""
    check_quantized(runs["fsdp"]["compiled:8bit_beta1"],
                    W.single_process("8bit_beta1", model_cls=W.Small),
                    W.single_process("8bit_beta1_fp32", model_cls=W.Small))


def test_state_is_stored_for_distributed_checkpointing(runs: dict) -> None:
    """States that follow the parameter's rows are Shard(0) DTensors of the global shape
    (quantized codes viewed (rows, blocks per row, block)); factored statistics and counters
    are whole plain tensors; a momentum whose rows are not whole 256-element blocks (600
    columns) is kept in float32 under FSDP2 while one process quantizes it."""
    stored = runs["fsdp"]["8bit_beta1"]["stored"]
    shard0 = "DTensor(Shard(dim=0),)"
    assert stored["w"]["factored.second_moment.m.codes"] == shard0 + "(9, 2, 256)"
    assert stored["w"]["factored.second_moment.m.absmax"] == shard0 + "(9, 2)"
    assert stored["k"]["factored.second_moment.m.codes"] == shard0 + "(5, 4, 256)"
    assert stored["w"]["factored.second_moment.rms.v_row.codes"] == "Tensor(1, 10)"
    assert stored["k"]["factored.second_moment.rms.v_col.codes"] == "Tensor(1, 640)"
    assert stored["w"]["step"] == "Tensor()"
    assert stored["b"]["elementwise.momentum.m"] == shard0 + "(7,)"
    assert stored["odd"]["factored.second_moment.m"] == shard0 + "(7, 600)"
    single = W.single_process("8bit_beta1")["state"]["odd"]
    assert "factored.second_moment.m.codes" in single and "factored.second_moment.m" not in single


def test_unsupported_placement_raises_before_any_change(runs: dict) -> None:
    """A parameter sharded on dim 1 (tensor parallelism) makes step() raise a ValueError that
    names the placement, with no state created and the parameter unchanged."""
    result = runs["unsupported"]
    assert result["message"] is not None and "Shard(dim=1)" in result["message"]
    assert "not supported" in result["message"]
    assert result["state"] == 0 and result["unchanged"]
