"""Every transform gives the same numbers compiled (fullgraph, dynamic=False) and eager."""

from __future__ import annotations

import torch

import afx
from afx import transforms as T

CASES = {
    "factored_rms": T.scale_by_factored_rms(),
    "factored_rms_beta2_bc": T.scale_by_factored_rms(beta2=0.99, bias_correction=True),
    "clip_by_rms": T.clip_by_rms(0.5),
    "relative_step": T.scale_by_relative_step(),
    "relative_step_warmup": T.scale_by_relative_step(warmup_init=True),
    "param_rms": T.scale_by_param_rms(),
    "learning_rate": T.scale_by_learning_rate(0.1),
    "ema": T.ema(0.9),
    "fira_clip": T.fira_limit(0.01, clip_threshold=0.5),
    "rms_adam": T.scale_by_rms(momentum=True, eps_correction=True),
    "factored_rms_momentum": T.scale_by_factored_rms(momentum=True),
    # Compiled, its RMS comes from column sums (eager: from the update itself).
    "factored_rms_clip": T.scale_by_factored_rms(clip_threshold=0.5),
    "factored_rms_momentum_clip": T.scale_by_factored_rms(momentum=True, clip_threshold=0.5),
    # Compiled, the momentum of the 6×4 matrix is created in blocks of 2 and the clip's mean
    # square summed over them; blocks of 3 do not divide its rows, so that one stays a matrix.
    "factored_rms_momentum_blocks": T.scale_by_factored_rms(momentum=True, clip_threshold=0.5,
                                                            momentum_block=2),
    "factored_rms_momentum_blocks_3": T.scale_by_factored_rms(momentum=True,
                                                              clip_threshold=0.5,
                                                              momentum_block=3),
    "came_blocks": T.came_confidence(0.5, 0.9, momentum_block=2),
    "decay_coupled": T.add_decayed_weights(0.1, T.learning_rate() * T.param_rms()),
    "partition": afx.partition({"m": T.ema(0.5), "v": T.scale(2.0)},
                               lambda n, p: "m" if p.ndim >= 2 else "v"),
}


def three_steps(txs: dict, states: dict, params: dict, grads: list[dict], hyper: dict) -> dict:
    out = {}
    for name, tx in txs.items():
        for pname, p in params.items():
            state = states[name, pname]
            for g in grads:
                u, state = tx.update(g[pname], state, p, hyper)
            out[f"{name}/{pname}"] = u
    return out


def test_compiled_equals_eager_for_every_transform() -> None:
    """One compiled function runs all transforms on a matrix, a vector and a scalar: ≤ 1e-5."""
    txs = {k: afx.count_steps(v) for k, v in CASES.items()}
    gen = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(6, 4, generator=gen), "b": torch.randn(5, generator=gen),
              "s": torch.randn((), generator=gen)}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()}
             for _ in range(3)]
    hyper = {"lr": torch.tensor(0.05), "decay_rate": torch.tensor(-0.8)}
    # init is eager by contract (it may read parameter names); only updates are traced.
    states = {(n, k): tx.init(p) for n, tx in txs.items() for k, p in params.items()}
    eager = three_steps(txs, states, params, grads, hyper)
    compiled = torch.compile(three_steps, fullgraph=True, dynamic=False)(
        txs, states, params, grads, hyper)
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-7, msg=key)
