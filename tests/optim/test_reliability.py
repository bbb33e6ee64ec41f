"""Failure atomicity of afx.optim.Optimizer.step, and a long compiled run.

A step that raises must leave parameters, state and counters exactly as they were: always when
the failure is detectable before the first write (validation, state creation, the first run of
a bucket function, compilation included), and in every case with ``atomic=True``.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

import afx
from afx import transforms as T


class Injected(RuntimeError):
    """The failure the tests inject."""


def make_params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    """A vector and two matrices of one shape: two buckets, three bucket calls per step."""
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype))
            for shape in ((7,), (6, 5), (6, 5))]


def set_grads(params: list[torch.Tensor], step: int, nan_first: bool = False) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
    if nan_first:
        params[0].grad[0] = float("nan")


def capture(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict:
    """Bitwise copies of the parameters, every state tensor and the skipped-update count."""
    return {"params": [p.detach().clone() for p in params],
            "state": [{k: v.clone() for k, v in opt.state[p].items()} if p in opt.state
                      else None for p in params],
            "skipped": int(opt.skipped_updates)}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def assert_same(a: dict, b: dict) -> None:
    """Bitwise equality (NaN payloads included) of two captures."""
    assert a["skipped"] == b["skipped"]
    for x, y in zip(a["params"], b["params"]):
        assert x.dtype == y.dtype and torch.equal(bits(x), bits(y))
    for sa, sb in zip(a["state"], b["state"]):
        assert (sa is None) == (sb is None)
        if sa is not None:
            assert sa.keys() == sb.keys()
            for k in sa:
                assert sa[k].dtype == sb[k].dtype, k
                assert torch.equal(bits(sa[k]), bits(sb[k])), k


def failing_transform(armed: dict[str, bool]) -> afx.GradientTransformation:
    """Identity, except that it raises for a matrix while ``armed["on"]``.

    The shape is tested first, so the vector bucket's compiled graph never reads (nor guards on)
    the flag.
    """
    def update(updates, state, params=None, hyper=None):
        if updates.ndim == 2 and armed["on"]:
            raise Injected("injected failure in a transform")
        return updates, state

    return afx.GradientTransformation(lambda p: afx.EmptyState(), update)


def chain_with(armed: dict[str, bool]) -> afx.GradientTransformation:
    return afx.named_chain(("rms", T.scale_by_factored_rms()), ("fail", failing_transform(armed)),
                           ("clip", T.clip_by_rms(1.0)), ("momentum", T.ema(0.9)),
                           ("lr", T.scale_by_learning_rate(1e-2)))


class FlakyBackend:
    """A torch.compile backend that runs the traced graph as is, and fails its n-th compile."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at, self.compiles = fail_at, 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.compiles += 1
        if self.compiles == self.fail_at:
            raise Injected("injected compile failure")
        return gm.forward


def wrap_buckets(opt: afx.optim.Optimizer, fail_at: int,
                 error: type[BaseException]) -> dict[tuple, Callable]:
    """Makes the ``fail_at``-th bucket call from now on raise ``error`` *after* it has written
    its parameter and state; returns the original functions."""
    originals = dict(opt._buckets)
    calls = [0]

    def wrap(fn: Callable) -> Callable:
        def flaky(*args):
            fn(*args)
            calls[0] += 1
            if calls[0] == fail_at:
                raise error("injected failure after a bucket wrote its parameter")
        return flaky

    for key, fn in originals.items():
        opt._buckets[key] = wrap(fn)
    return originals


def test_eager_first_run_failure_in_a_later_bucket_changes_nothing() -> None:
    """Default mode, eager: a transform that raises for the second bucket on the first step
    leaves parameters untouched and creates no state; the next step equals that of an
    optimizer that never failed."""
    armed = {"on": True}
    params, ref_params = make_params(), make_params()
    opt = afx.optim.Optimizer(params, chain_with(armed), compile=False, skip_nonfinite=True)
    ref = afx.optim.Optimizer(ref_params, chain_with({"on": False}), compile=False,
                              skip_nonfinite=True)
    before = capture(opt, params)
    set_grads(params, 0, nan_first=True)
    with pytest.raises(Injected):
        opt.step()
    assert_same(capture(opt, params), before)
    assert len(opt.state) == 0 and not opt._skipped
    armed["on"] = False
    for step in range(3):
        set_grads(params, step, nan_first=step == 0)
        set_grads(ref_params, step, nan_first=step == 0)
        opt.step()
        ref.step()
    assert_same(capture(opt, params), capture(ref, ref_params))


def test_compile_failure_on_the_first_step_changes_nothing() -> None:
    """Default mode, compiled: the backend fails to compile the second bucket on the first step;
    nothing changes (no parameter, no state), and the next step compiles it and equals a run
    that never failed."""
    params, ref_params = make_params(), make_params()
    flaky = FlakyBackend(fail_at=2)
    opt = afx.Adafactor8Bit(params, beta1=0.9, min_8bit_size=0, block_size=128,
                            compile={"backend": flaky})
    ref = afx.Adafactor8Bit(ref_params, beta1=0.9, min_8bit_size=0, block_size=128,
                            compile={"backend": FlakyBackend(None)})
    before = capture(opt, params)
    set_grads(params, 0)
    with pytest.raises(Exception, match="injected compile failure"):
        opt.step()
    assert flaky.compiles == 2
    assert_same(capture(opt, params), before)
    assert len(opt.state) == 0
    for step in range(3):
        set_grads(params, step)
        set_grads(ref_params, step)
        opt.step()
        ref.step()
    assert flaky.compiles == 3  # the failed bucket compiled once more, nothing else
    assert_same(capture(opt, params), capture(ref, ref_params))


def test_state_creation_failure_rolls_back_created_state() -> None:
    """A transform whose init raises for the last parameter: the state already created for
    the others in that step is removed again, so the optimizer is as new."""
    armed = {"on": True}

    def init(p: torch.Tensor) -> afx.EmptyState:
        if p.ndim == 2 and armed["on"]:
            raise Injected("injected failure in init")
        return afx.EmptyState()

    tx = afx.chain(T.scale_by_factored_rms(), afx.GradientTransformation(
        init, lambda u, s, p=None, h=None: (u, s)), T.scale_by_learning_rate(1e-2))
    params = make_params(torch.bfloat16)
    opt = afx.optim.Optimizer(params, tx, compile=False, stochastic_rounding=True)
    set_grads(params, 0)
    with pytest.raises(Injected):
        opt.step()
    assert len(opt.state) == 0 and not opt._plans
    armed["on"] = False
    opt.step()
    assert [int(opt.state[p]["step"]) for p in params] == [1, 1, 1]
    assert all("sr_seed" in opt.state[p] for p in params)


def test_failed_rebuild_restores_state_of_the_old_structure(monkeypatch) -> None:
    """Switching momentum off drops the momentum state; if the new bucket then fails to build,
    the dropped entry is put back, and the optimizer trains on as one that never failed."""
    params, ref_params = make_params(), make_params()
    opt = afx.Adafactor(params, lr=1e-2, relative_step=False, beta1=0.9, compile=False)
    ref = afx.Adafactor(ref_params, lr=1e-2, relative_step=False, beta1=0.9, compile=False)
    for step in range(2):
        for ps, o in ((params, opt), (ref_params, ref)):
            set_grads(ps, step)
            o.step()
    before = capture(opt, params)
    assert "exp_avg" in before["state"][1]

    def broken(tag: str, compile: bool | dict, device_type: str = "cpu",
               cache_key: Callable | None = None, *, cpu_options: Any = None) -> Callable:
        def fn(*args):
            raise Injected("injected failure of a new bucket function")
        return fn

    monkeypatch.setattr(afx.optim.optimizer, "bucket_function", broken)
    opt.param_groups[0]["beta1"] = None
    set_grads(params, 2)
    with pytest.raises(Injected):
        opt.step()
    assert_same(capture(opt, params), before)
    monkeypatch.undo()
    opt.param_groups[0]["beta1"] = 0.9
    opt.step()
    set_grads(ref_params, 2)
    ref.step()
    assert int(opt.state[params[0]]["step"]) == 3
    assert_same(capture(opt, params), capture(ref, ref_params))


@pytest.mark.parametrize("compile, error", [(False, Injected), (False, KeyboardInterrupt),
                                            (True, Injected), (True, KeyboardInterrupt)],
                         ids=["eager-error", "eager-interrupt", "compiled-error",
                              "compiled-interrupt"])
def test_atomic_step_restores_everything(compile: bool, error: type[BaseException]) -> None:
    """atomic=True: a step that raises (an exception or a KeyboardInterrupt) after the third
    bucket call had written its parameter and state leaves parameters, every (quantized)
    state tensor, step counts and the skipped-update count bitwise as they were; the next
    steps equal those of an optimizer that never failed."""
    params, ref_params = make_params(), make_params()
    options = dict(beta1=0.9, lr=1e-2, relative_step=False, min_8bit_size=0, block_size=128,
                   m_block_size=32, compile=compile)
    opt = afx.Adafactor8Bit(params, atomic=True, **options)
    ref = afx.Adafactor8Bit(ref_params, **options)
    for step in range(2):
        for ps, o in ((params, opt), (ref_params, ref)):
            set_grads(ps, step)
            o.step()
    assert any(v.dtype == torch.uint8 for v in opt.state[params[1]].values())
    before = capture(opt, params)
    originals = wrap_buckets(opt, fail_at=3, error=error)
    set_grads(params, 2, nan_first=True)    # the first call counts a skipped update
    with pytest.raises(error):
        opt.step()
    assert_same(capture(opt, params), before)
    opt._buckets.update(originals)
    for step in range(2, 4):
        for ps, o in ((params, opt), (ref_params, ref)):
            set_grads(ps, step, nan_first=step == 2)
            o.step()
    after = capture(opt, params)
    assert after["skipped"] == 1
    assert_same(after, capture(ref, ref_params))


def test_without_atomic_a_mid_step_failure_is_reported() -> None:
    """Default mode: a failure after the second of three calls keeps the two written updates
    (parameter and state together), leaves the third parameter and its state untouched, and
    the exception says so and names atomic=True."""
    params = make_params()
    opt = afx.Adafactor8Bit(params, beta1=0.9, compile=False)
    set_grads(params, 0)
    opt.step()
    before = capture(opt, params)
    wrap_buckets(opt, fail_at=2, error=Injected)
    set_grads(params, 1)
    with pytest.raises(Injected) as info:
        opt.step()
    note = " ".join(getattr(info.value, "__notes__", []))
    assert "2 of 3" in note and "atomic=True" in note
    assert [int(opt.state[p]["step"]) for p in params] == [2, 2, 1]
    assert not torch.equal(params[1], before["params"][1])
    assert torch.equal(params[2], before["params"][2])
    assert all(torch.equal(v, before["state"][2][k]) for k, v in opt.state[params[2]].items())


def test_atomic_must_be_a_bool() -> None:
    """A non-boolean atomic is refused with an error naming the option."""
    with pytest.raises(ValueError, match="atomic"):
        afx.Adafactor(make_params(), atomic="yes")


# ------------------------------------------------------------------------------ long run --
def rss_mib() -> float:
    """Resident set size of this process (Linux /proc), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SmallNet(torch.nn.Module):
    """Two linear layers and a norm, two shapes (two buckets to compile): quantized states for
    the matrices, float32 states for the vectors."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(32, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.fc2 = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def test_two_thousand_compiled_steps_without_growth_or_recompiles() -> None:
    """Compiled Adafactor8Bit (quantized momentum and second moment), lr changed by a
    scheduler every step: 2,000 steps without a recompile after the first step and with RSS
    growth between step 200 and step 2,000 below 20 MiB; training reduces the loss."""
    model = SmallNet()
    opt = afx.Adafactor8Bit(model.parameters(), lr=3e-3, relative_step=False, beta1=0.9,
                            min_8bit_size=1024, block_size=128, m_block_size=32)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2000)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    target = torch.tanh(x.flip(1))
    lrs, losses, rss = set(), [], {}

    def step() -> None:
        opt.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        opt.step()
        sched.step()
        lrs.add(opt.param_groups[0]["lr"])
        losses.append(loss.item())

    threads = torch.get_num_threads()
    # One thread: on a loaded 2-core machine, OpenMP barriers between two threads made each
    # call of these tiny kernels ~50x slower (7 ms instead of 0.1 ms).
    torch.set_num_threads(1)
    try:
        step()
        graphs = counters["stats"]["unique_graphs"]
        with torch.compiler.set_stance("fail_on_recompile"):
            for i in range(2, 2001):
                step()
                if i in (200, 2000):
                    rss[i] = rss_mib()
    finally:
        torch.set_num_threads(threads)
    growth = rss[2000] - rss[200]
    print(f"\nRSS at step 200: {rss[200]:.1f} MiB, at 2000: {rss[2000]:.1f} MiB, "
          f"growth {growth:+.2f} MiB; loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert counters["stats"]["unique_graphs"] == graphs
    assert growth < 20.0
    assert len(lrs) > 1000
    assert losses[-1] < 0.5 * losses[0]
    assert any(v.dtype == torch.uint8 for v in opt.state[model.fc1.weight].values())


def test_capture_detects_a_one_ulp_change() -> None:
    """The comparison the tests above rely on sees a one-ulp change of one element."""
    params = make_params()
    opt = afx.Adafactor(params, compile=False)
    set_grads(params, 0)
    opt.step()
    a = capture(opt, params)
    with torch.no_grad():
        params[0][0] = torch.nextafter(params[0][0], torch.tensor(float("inf")))
    with pytest.raises(AssertionError):
        assert_same(capture(opt, params), a)
