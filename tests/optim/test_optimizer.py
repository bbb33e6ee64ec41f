"""afx.optim.Optimizer: torch.optim behaviour, hyperparameter mirroring, compile discipline."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from afx_testing import Tiny, batches, max_rel_diff, train
from torch._dynamo.utils import counters

import afx
from afx import transforms as T


def adafactor_chain(beta1: float = 0.9) -> afx.GradientTransformation:
    """afx.Adafactor(relative_step=False, scale_parameter=True, beta1=...) from public parts."""
    alpha = T.learning_rate(1e-2) * T.param_rms(1e-3)
    return afx.named_chain(
        ("rms", T.scale_by_factored_rms(decay_rate=-0.8, eps1=1e-30)),
        ("clip", T.clip_by_rms(1.0)),
        ("step_size", T.scale_by_step_size(alpha)),
        ("momentum", afx.rename_hyperparams(T.ema(beta1), {"beta1": "momentum"})),
        ("weight_decay", T.add_decayed_weights(0.0, alpha)),
        ("descent", T.scale(-1.0)),
    )


def test_custom_chain_rebuilds_adafactor() -> None:
    """The README's chain of public transforms gives afx.Adafactor's numbers exactly."""
    a, b = Tiny(), Tiny()
    data = batches(40)
    train([a], afx.Adafactor(a.parameters(), lr=1e-2, relative_step=False, beta1=0.9,
                             weight_decay=0.01, compile=False), data)
    opt = afx.optim.Optimizer(b.parameters(), adafactor_chain(), momentum=0.9,
                              weight_decay=0.01, compile=False)
    train([b], opt, data)
    assert max_rel_diff(b, a) == 0.0


def test_param_groups_carry_the_declared_hyperparameters() -> None:
    """A chain's numbers appear in param_groups with their defaults; groups override them."""
    m = Tiny()
    opt = afx.optim.Optimizer([{"params": [m.weight], "lr": 0.5}, {"params": [m.bias]}],
                              adafactor_chain(), compile=False)
    assert opt.param_groups[0]["lr"] == 0.5
    assert opt.param_groups[1]["lr"] == 1e-2
    assert opt.param_groups[1]["momentum"] == 0.9
    assert set(opt.defaults) >= {"lr", "eps1", "eps2", "decay_rate", "clip_threshold",
                                 "momentum", "weight_decay"}


def test_state_is_a_flat_dict_with_dotted_names() -> None:
    """state[p] holds tensors only, named after the named_chain parts and state fields."""
    m = Tiny()
    opt = afx.optim.Optimizer(m.parameters(), adafactor_chain(), compile=False)
    train([m], opt, batches(1))
    assert set(opt.state[m.weight]) == {"step", "rms.v_row", "rms.v_col", "momentum.m"}
    assert set(opt.state[m.bias]) == {"step", "rms.v", "momentum.m"}
    assert all(isinstance(v, torch.Tensor) for v in opt.state[m.kernel].values())


def test_compiled_equals_eager() -> None:
    """compile=True and compile=False run the same chain: ≤ 1e-5 relative after 30 steps."""
    a, b = Tiny(), Tiny()
    data = batches(30)
    train([a], afx.optim.Optimizer(a.parameters(), adafactor_chain(), compile=False), data)
    train([b], afx.optim.Optimizer(b.parameters(), adafactor_chain(), compile=True), data)
    assert max_rel_diff(b, a) <= 1e-5


SCHEDULERS = {
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50),
    "onecycle_beta1": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.05, total_steps=60, cycle_momentum=True, base_momentum=0.8,
        max_momentum=0.95),
    "plateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0,
                                                                      factor=0.9),
    "lambda_float": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_schedulers_never_recompile(name: str) -> None:
    """One compiled graph per bucket, then 50 scheduled steps under fail_on_recompile."""
    m = Tiny()
    opt = afx.optim.Optimizer(m.parameters(), adafactor_chain())
    sched = SCHEDULERS[name](opt)
    data = batches(51)
    before = counters["stats"]["unique_graphs"]
    train([m], opt, data[:1])
    graphs = counters["stats"]["unique_graphs"] - before
    assert graphs == len(opt._buckets) == 4  # 0-d, 1-D, 2-D and 4-D parameters

    seen = set()

    def on_step(i: int) -> None:
        if name == "plateau":
            sched.step(float(i % 3))
        else:
            sched.step()
        seen.add((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))

    with torch.compiler.set_stance("fail_on_recompile"):
        train([m], opt, data[1:], on_step)
    assert counters["stats"]["unique_graphs"] - before == graphs
    assert len(seen) > 10  # the hyperparameters really changed
    if name == "onecycle_beta1":
        assert len({beta for _, beta in seen}) > 10


def test_hyperparameter_changes_reach_the_compiled_graph() -> None:
    """Writing a float into param_groups changes the next compiled update (lr=0 freezes)."""
    m = Tiny()
    opt = afx.optim.Optimizer(m.parameters(), adafactor_chain(beta1=0.0))
    train([m], opt, batches(2))
    opt.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in m.parameters()]
    train([m], opt, batches(1, seed=5))
    assert max_rel_diff(list(m.parameters()), before) == 0.0


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-d", "1", "1x1"])
def test_tensor_lr_is_mirrored(shape: tuple[int, ...]) -> None:
    """A tensor lr of any one-element shape is read every step: a run whose lr tensor is
    edited in place after step 2 equals, bit for bit, a run given the same values as Python
    floats (the float32 tensor's values, which are not exactly 0.02 and 0.005)."""
    lr = torch.full(shape, 0.02)
    first, later = float(lr), float(torch.tensor(0.005))
    a, b = Tiny(), Tiny()
    data = batches(5)
    opt_a = afx.optim.Optimizer(a.parameters(), adafactor_chain(), lr=first, compile=False)
    opt_b = afx.optim.Optimizer(b.parameters(), adafactor_chain(), lr=lr, compile=False)

    def change_a(i: int) -> None:
        if i == 1:
            opt_a.param_groups[0]["lr"] = later

    def change_b(i: int) -> None:
        if i == 1:
            lr.fill_(0.005)

    train([a], opt_a, data, change_a)
    train([b], opt_b, data, change_b)
    assert max_rel_diff(b, a) == 0.0
    moved = Tiny()
    train([moved], afx.optim.Optimizer(moved.parameters(), adafactor_chain(), lr=first,
                                       compile=False), data)
    assert max_rel_diff(moved, a) > 0.0  # the edit took effect


@pytest.mark.parametrize("compile, dtype", [(False, torch.float32), (False, torch.bfloat16),
                                            (True, torch.float32)],
                         ids=["eager-fp32", "eager-bf16", "compiled-fp32"])
def test_resume_from_checkpoint_equals_uninterrupted_run(compile: bool,
                                                         dtype: torch.dtype) -> None:
    """Save at step 25, load into a fresh optimizer: the next 25 steps equal an unbroken run."""
    data = batches(50)
    whole = Tiny(dtype)
    opt = afx.Adafactor(whole.parameters(), beta1=0.9, weight_decay=0.01, compile=compile)
    train([whole], opt, data)

    first = Tiny(dtype)
    opt1 = afx.Adafactor(first.parameters(), beta1=0.9, weight_decay=0.01, compile=compile)
    train([first], opt1, data[:25])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    second = Tiny(dtype)
    second.load_state_dict(ckpt["model"])
    opt2 = afx.Adafactor(second.parameters(), beta1=0.9, weight_decay=0.01, compile=compile)
    opt2.load_state_dict(ckpt["opt"])
    for p in second.parameters():
        assert all(v.dtype == torch.float32 for v in opt2.state[p].values())
    train([second], opt2, data[25:])
    assert max_rel_diff(second, whole) <= (0.0 if not compile else 1e-6)


def test_load_keeps_fp32_state_for_bf16_parameters() -> None:
    """torch.optim would cast state to bf16 on load; afx restores the saved fp32 tensors."""
    m = Tiny(torch.bfloat16)
    opt = afx.Adafactor(m.parameters(), beta1=0.9, compile=False)
    train([m], opt, batches(3))
    saved = copy.deepcopy(opt.state_dict())
    opt2 = afx.Adafactor(m.parameters(), beta1=0.9, compile=False)
    opt2.load_state_dict(saved)
    for i, p in enumerate(m.parameters()):
        for k, v in opt2.state[p].items():
            assert v.dtype == torch.float32
            assert torch.equal(v, saved["state"][i][k])


def test_bad_gradients_raise_before_anything_changes() -> None:
    """A sparse gradient on the last parameter raises; earlier parameters stay untouched."""
    m = Tiny()
    opt = afx.Adafactor(m.parameters(), compile=False)
    train([m], opt, batches(1))
    params = [p.detach().clone() for p in m.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in m.parameters()]
    m(batches(1, seed=3)[0]).backward()
    m.kernel.grad = m.kernel.grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert max_rel_diff(list(m.parameters()), params) == 0.0
    for p, saved in zip(m.parameters(), state):
        assert opt.state[p].keys() == saved.keys()
        assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items())


def test_invalid_group_value_written_later_raises_before_the_step() -> None:
    """A negative lr written into a group after construction is caught before any update."""
    m = Tiny()
    opt = afx.optim.Optimizer(m.parameters(), adafactor_chain(), compile=False)
    train([m], opt, batches(1))
    opt.param_groups[0]["lr"] = -1.0
    params = [p.detach().clone() for p in m.parameters()]
    m(batches(1, seed=3)[0]).backward()
    with pytest.raises(ValueError, match=r"Invalid lr: -1\.0"):
        opt.step()
    assert max_rel_diff(list(m.parameters()), params) == 0.0


def test_complex_parameters_are_rejected() -> None:
    """Complex parameters raise at construction, naming the dtype."""
    with pytest.raises(ValueError, match="complex"):
        afx.Adafactor([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])


def test_parameters_without_gradients_are_skipped() -> None:
    """A parameter with grad=None gets no update and its step does not advance."""
    m = Tiny()
    opt = afx.Adafactor(m.parameters(), compile=False)
    train([m], opt, batches(2))
    before = m.bias.detach().clone()
    m(batches(1, seed=7)[0]).backward()
    m.bias.grad = None
    opt.step()
    assert torch.equal(m.bias, before)
    assert int(opt.state[m.bias]["step"]) == 2 and int(opt.state[m.weight]["step"]) == 3


def test_closure_runs_with_gradients_enabled() -> None:
    """step(closure) evaluates the closure with autograd on and returns its loss."""
    m = Tiny()
    opt = afx.Adafactor(m.parameters(), compile=False)
    x = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = m(x)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and int(opt.state[m.weight]["step"]) == 1


def test_add_param_group_after_training() -> None:
    """A group added mid-training starts its own state; existing state continues."""
    m, extra = Tiny(), torch.nn.Parameter(torch.ones(4, 3))
    opt = afx.Adafactor(list(m.parameters()), compile=False)
    train([m], opt, batches(2))
    opt.add_param_group({"params": [extra], "weight_decay": 0.1})
    m(batches(1)[0]).backward()
    extra.sum().backward()
    opt.step()
    assert int(opt.state[extra]["step"]) == 1 and int(opt.state[m.weight]["step"]) == 3


def test_deepcopy_and_hooks_behave_like_torch_optim() -> None:
    """deepcopy gives an independent optimizer; step pre/post hooks run."""
    m = Tiny()
    opt = afx.Adafactor(m.parameters(), compile=False)
    train([m], opt, batches(2))
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    clone = copy.deepcopy(opt)
    train([m], opt, batches(1))
    assert calls == ["pre", "post"]
    assert int(opt.state[m.weight]["step"]) == 3
    cloned_steps = [int(s["step"]) for s in clone.state.values()]
    assert cloned_steps == [2, 2, 2, 2]
    assert "Adafactor" in repr(opt)
    # The copy is a working optimizer of its own parameters (deepcopy copied them too).
    params = [p for g in clone.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    clone.step()
    assert [int(clone.state[p]["step"]) for p in params] == [3, 3, 3, 3]


def test_partition_routes_by_parameter_name() -> None:
    """With model.named_parameters(), name predicates see module paths (no decay on 'bias')."""
    m = Tiny()
    decay = afx.masked(T.add_decayed_weights(0.5), lambda name, p: name != "bias")
    tx = afx.chain(decay, T.scale_by_learning_rate(1.0))
    opt = afx.optim.Optimizer(m.named_parameters(), tx, compile=False)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(m.bias, before["bias"])
    assert torch.allclose(m.weight, 0.5 * before["weight"])
    assert set(opt.state[m.bias]) == {"step"}


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_non_finite_gradients_skip_the_parameter(compile: bool) -> None:
    """A NaN/Inf gradient leaves that parameter and its state (step included) untouched, other
    parameters update, and the skipped-update counter counts it, with no host sync."""
    m = Tiny()
    opt = afx.optim.Optimizer(m.parameters(), adafactor_chain(), compile=compile,
                              skip_nonfinite=True)
    train([m], opt, batches(2))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    state = {k: v.clone() for k, v in opt.state[m.weight].items()}
    m(batches(1, seed=4)[0]).backward()
    m.weight.grad[0, 0] = float("nan")
    m.bias.grad[1] = float("inf")
    opt.step()
    assert torch.equal(m.weight, before["weight"]) and torch.equal(m.bias, before["bias"])
    assert all(torch.equal(opt.state[m.weight][k], v) for k, v in state.items())
    assert not torch.equal(m.kernel, before["kernel"])
    assert int(opt.state[m.kernel]["step"]) == 3 and int(opt.state[m.weight]["step"]) == 2
    assert int(opt.skipped_updates) == 2


def test_grad_scaler_drives_the_optimizer() -> None:
    """torch.amp.GradScaler.step(opt) works: it unscales, skips steps with overflow, and the
    optimizer trains normally otherwise."""
    m = Tiny()
    opt = afx.Adafactor8Bit(m.parameters(), lr=1e-2, relative_step=False, compile=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    start = [p.detach().clone() for p in m.parameters()]
    for i, x in enumerate(batches(5)):
        opt.zero_grad()
        scaler.scale(m(x)).backward()
        if i == 2:
            m.weight.grad[0, 0] = float("inf")   # an overflow: the scaler skips this step
        scaler.step(opt)
        scaler.update()
    assert int(opt.state[m.weight]["step"]) == 4
    assert scaler.get_scale() < 2.0**10
    assert max_rel_diff(list(m.parameters()), start) > 1e-4


# ------------------------------------------------------------- torch.optim conventions --
def _adamw_pair() -> tuple[torch.nn.Linear, afx.Adafactor8Bit, torch.nn.Linear,
                           torch.optim.AdamW]:
    a = torch.nn.Linear(6, 3)
    b = copy.deepcopy(a)
    ours = afx.Adafactor8Bit(afx.build_param_groups(a, "adamw", "G0"), lr=1e-2,
                             weight_decay=0.1, quantize=False, compile=False)
    ref = torch.optim.AdamW(b.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.1)
    return a, ours, b, ref


def test_zero_grad_and_zero_gradients_behave_like_torch_optim() -> None:
    """zero_grad() (set_to_none) makes the next step skip every parameter, step counts
    included; zero_grad(set_to_none=False) leaves zero gradients that are stepped on (decay
    and momentum still move the parameters), exactly as torch.optim.AdamW does (≤ 1e-6)."""
    a, ours, b, ref = _adamw_pair()
    x = batches(1)[0][:6]
    for _ in range(3):
        for m, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    for m, opt in ((a, ours), (b, ref)):
        opt.zero_grad()
        assert all(p.grad is None for p in m.parameters())
        before = [p.detach().clone() for p in m.parameters()]
        opt.step()
        assert max_rel_diff(list(m.parameters()), before) == 0.0
        assert all(int(opt.state[p]["step"]) == 3 for p in m.parameters())
        m(x).square().sum().backward()
        opt.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
        opt.step()
        assert all(int(opt.state[p]["step"]) == 4 for p in m.parameters())
        assert max_rel_diff(list(m.parameters()), before) > 1e-4
    assert max_rel_diff(a, b) <= 1e-6


def test_repr_lists_group_options_like_torch_optim() -> None:
    """repr(opt) has torch.optim's layout ("Name (", "Parameter Group i", one "    key: value"
    line per option but params, a blank line between groups, ")") and shows no internal
    object."""
    m = Tiny()
    opt = afx.Adafactor8Bit([{"params": [m.weight, m.kernel]},
                             {"params": [m.bias, m.scalar], "lr": 0.5}], compile=False)
    lines = repr(opt).splitlines()
    assert lines[0] == "Adafactor8Bit (" and lines[-1] == ")"
    expected = []
    for i, group in enumerate(opt.param_groups):
        expected += [""] * (i > 0) + [f"Parameter Group {i}"]
        expected += [f"    {k}: {group[k]}" for k in sorted(group) if k != "params"]
    assert lines[1:-1] == expected
    assert "    lr: 0.5" in lines and not any("function" in line for line in lines)


def test_load_hooks_and_no_cast_through_torch(monkeypatch) -> None:
    """A load pre-hook may replace the state dict (as in torch); a post-hook sees the loaded
    fp32 state of bf16 parameters; torch's cast-to-parameter-dtype policy is never used."""
    m = Tiny(torch.bfloat16)
    opt = afx.Adafactor(m.parameters(), beta1=0.9, compile=False)
    train([m], opt, batches(2))
    saved = copy.deepcopy(opt.state_dict())
    assert sorted(saved["state"]) == [0, 1, 2, 3]
    assert [g["params"] for g in saved["param_groups"]] == [[0, 1, 2, 3]]

    def replace(o, sd):
        sd = copy.deepcopy(sd)
        sd["state"][2]["exp_avg"].fill_(0.25)
        return sd

    seen = {}
    opt2 = afx.Adafactor(m.parameters(), beta1=0.9, compile=False)
    opt2.register_load_state_dict_pre_hook(replace)
    opt2.register_load_state_dict_post_hook(
        lambda o: seen.update({k: v.dtype for k, v in o.state[m.weight].items()}))

    def refuse(*args, **kwargs):
        raise AssertionError("torch's dtype policy was used")

    monkeypatch.setattr(torch.optim.Optimizer, "_process_value_according_to_param_policy",
                        staticmethod(refuse))
    opt2.load_state_dict(saved)
    assert (opt2.state[m.weight]["exp_avg"] == 0.25).all()
    assert torch.equal(opt2.state[m.bias]["exp_avg"], saved["state"][1]["exp_avg"])
    assert seen and set(seen.values()) == {torch.float32}


@pytest.mark.parametrize("fault, match", [("shape", "exp_avg_sq_row"),
                                          ("option", "relative_step")])
def test_a_checkpoint_that_does_not_fit_changes_nothing(fault: str, match: str) -> None:
    """A checkpoint with a wrongly shaped state, or with group options the optimizer refuses,
    raises a ValueError naming the culprit; the optimizer keeps its groups and state."""
    m = Tiny()
    opt = afx.Adafactor(m.parameters(), beta1=0.9, compile=False)
    train([m], opt, batches(2))
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["weight_decay"] = 0.5
    if fault == "shape":
        bad["state"][2]["exp_avg_sq_row"] = torch.zeros(4)
    else:
        bad["param_groups"][0]["lr"] = 0.5  # with relative_step=True
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                            for g in opt.param_groups])
    state = {p: dict(s) for p, s in opt.state.items()}
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    assert {p: dict(s) for p, s in opt.state.items()} == state


def test_init_state_creates_the_first_steps_state_without_stepping() -> None:
    """init_state() creates exactly the state (keys, shapes, dtypes, zero step count, SR
    seeds) that the first step finds, leaves parameters untouched, and a run that starts from
    it equals one that does not, bitwise."""
    torch.manual_seed(0)
    model = Tiny(torch.bfloat16)
    other = copy.deepcopy(model)
    opt = afx.Adafactor8Bit(model.parameters(), beta1=0.9, compile=False,
                            stochastic_round_writeback=True, min_8bit_size=16)
    ref = afx.Adafactor8Bit(other.parameters(), beta1=0.9, compile=False,
                            stochastic_round_writeback=True, min_8bit_size=16)
    before = [p.detach().clone() for p in model.parameters()]
    opt.init_state()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(int(opt.state[p]["step"]) == 0 and "sr_seed" in opt.state[p]
               for p in model.parameters())
    data = batches(3)
    train([model], opt, data)
    train([other], ref, data)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == ref.state[q].keys()
        assert all(torch.equal(opt.state[p][k], ref.state[q][k]) for k in opt.state[p])


def test_steps_run_parameters_of_one_kind_back_to_back() -> None:
    """A step calls the bucket functions grouped by parameter kind (options, state, shape,
    dtype) in order of first appearance, keeping the parameters' order within a kind, and the
    order changes no result: each parameter ends as when stepped alone."""
    torch.manual_seed(0)
    shapes = [(4, 3), (3,), (4, 3), (5,), (3,), (4, 3)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    alone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for q, p in zip(alone, params):
        q.grad = p.grad.clone()
    opt = afx.Adafactor(params, compile=False)
    position = {id(p): i for i, p in enumerate(params)}
    order = [position[id(call.param)] for call in opt._prepare([])]
    assert order == [0, 2, 5, 1, 4, 3]
    opt.step()
    for q in alone:
        afx.Adafactor([q], compile=False).step()
    for p, q in zip(params, alone):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
