"""afx.optim.presets.build_param_groups vs adafactor8bit 0.4.6: routing, errors, preset numerics."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import adafactor8bit
import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import afx
from afx.optim.presets import GROUPINGS, PRESETS, build_param_groups

GROUPING_NAMES = ("auto", *GROUPINGS, "G0", "G1", "G2")


# ------------------------------------------------------------------------------------ models --
def gpt2() -> nn.Module:
    """transformers' GPT-2 (wte tied to lm_head, wpe position table, Conv1D layers), tiny."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


class _Custom2DBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4, 4))  # 2-D but named bias: one_d


class ConvNet(nn.Module):
    """Conv kernels (nd), norms, a 0-d scale, a 3-D position table, a frozen layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, bias=False), nn.GroupNorm(4, 16),
                                   nn.ReLU(), nn.Conv1d(16, 16, 1))
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, 16, 4))
        self.scale = nn.Parameter(torch.ones(()))
        self.odd = _Custom2DBias()
        self.mlp = nn.Linear(16, 32)
        self.head = nn.Linear(32, 10)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(16)
        self.attn = nn.Linear(16, 16)
        self.mlp_in = nn.Linear(16, 32)
        self.mlp_out = nn.Linear(32, 16, bias=False)


class TiedLM(nn.Module):
    """A hand-tied embedding/lm_head, an untied second head, a time table, a module alias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tok = nn.Embedding(32, 16)
        self.time_embed = nn.Embedding(8, 16)
        self.layers = nn.ModuleList([Block(), Block()])
        self.shared = self.layers[0]
        self.lm_head = nn.Linear(16, 32, bias=False)
        self.lm_head.weight = self.tok.weight
        self.aux_lm_head = nn.Linear(16, 32)


MODELS: dict[str, Callable[[], nn.Module]] = {"gpt2": gpt2, "conv": ConvNet, "tied": TiedLM}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {name: make() for name, make in MODELS.items()}


# ---------------------------------------------------------------------------------- routing --
def assignment(groups: list[dict]) -> dict[int, dict]:
    """id(param) -> the options of its group (everything but ``params``); each param once."""
    out: dict[int, dict] = {}
    for group in groups:
        options = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            assert id(p) not in out, f"parameter placed twice ({options['group_name']})"
            out[id(p)] = options
    return out


def both(model: nn.Module, *args, **kwargs) -> tuple[list, list, list, list]:
    """Groups and warnings from the package's builder and from ours."""
    results = []
    for build in (adafactor8bit.build_param_groups, build_param_groups):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append((build(model, *args, **kwargs),
                            [w for w in caught if issubclass(w.category, UserWarning)]))
    (theirs, their_warnings), (ours, our_warnings) = results
    return theirs, ours, their_warnings, our_warnings


def assert_same_groups(model: nn.Module, *args, **kwargs) -> list:
    theirs, ours, their_warnings, our_warnings = both(model, *args, **kwargs)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(assignment(ours)) == trainable
    assert assignment(ours) == assignment(theirs)
    assert [g["group_name"] for g in ours] == [g["group_name"] for g in theirs]
    assert len(our_warnings) == len(their_warnings), (
        [str(w.message) for w in their_warnings], [str(w.message) for w in our_warnings])
    for w in our_warnings:
        assert w.filename == __file__, "warnings must point at the caller"
    return our_warnings


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("grouping", GROUPING_NAMES)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_groups_match_package(models, model_name, preset, grouping):
    """Every parameter gets the package's group name and option values (keyed by id(param)),
    for every preset × grouping spelling, and the same number of warnings (none here)."""
    assert assert_same_groups(models[model_name], preset, grouping) == []


OVERRIDE_CASES = [
    ("adafactor", "G2", dict(nd_factored=True)),
    ("came", "topology", dict(nd_factored=True, beta3=0.999, eps_came=1e-30)),
    ("apollo", "auto", dict(apollo_rank=16)),
    ("apollo", "G0", dict(apollo_rank=16)),
    ("apollo", "G2", dict(apollo_rank=16, apollo_targets=["attn", "wte", "tok", "lm_head"])),
    ("apollo", "G1", dict(apollo_rank=16, apollo_targets=("lm_head",))),
    ("apollo", "protected", dict(apollo_rank=8, apollo_min_dim_multiplier=4, beta3=0.999,
                                 apollo_eps=1e-5, beta1=0.8)),
    ("apollo", "G1", dict(apollo_rank=0, apollo_targets=["attn"])),
    ("adamw", "G1", dict(beta1=0.8, eps=(1e-7, 1e-3), one_d_lr=0.0, embedding_quantize=True,
                         other_m_quant_type="uf4", other_m_block_size=128,
                         lm_head_block_size=256, other_min_8bit_size=0)),
    ("rmsprop", "auto", dict(bias_correction=True, d=1.0, embedding_v_quant_type="al16")),
    ("sgd", "G0", dict(all_quantize=False, all_lr=0.1, matrix_lr=1e-3)),
    ("came", "auto", dict(one_d_c_quant_type="al16", other_c_quant_type="al16",
                          lm_head_lr=1e-4, embedding_quantize="auto",
                          stochastic_round_writeback=False, enable_fira_for_adafactor=True,
                          fira_margin=0.05)),
    ("adafactor", "G1", dict(other_m_quant_type="uf4", beta2_decay=-0.5, relative_step=True,
                             one_d_stochastic_round_writeback=True)),
    ("adamw", "G2", dict(matrix_c_quant_type="al16", nd_quantize=True, fallback_lr=1e-3,
                         momentum_only_1d=True, lag_norm=True, scale_parameter=True,
                         scale_weight_decay=True)),
]


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize(("preset", "grouping", "kwargs"), OVERRIDE_CASES)
def test_overrides_match_package(models, model_name, preset, grouping, kwargs):
    """With APOLLO arguments, nd_factored, shared/primary-only overrides and route options, each
    parameter's group and options equal the package's, and as many warnings are raised."""
    assert_same_groups(models[model_name], preset, grouping, **kwargs)


PIECES = ("attn", "mlp", "embed", "Embed", "wte", "wpe", "lm_head", "LM_Head", "pos_embed",
          "time", "norm", "bias", "proj", "x")


def _leaf(kind: str, a: int, b: int, bias: bool,
          shape: tuple[int, ...]) -> nn.Module | nn.Parameter:
    return {"linear": lambda: nn.Linear(a, b, bias=bias), "embedding": lambda: nn.Embedding(a, b),
            "layernorm": lambda: nn.LayerNorm(a), "rmsnorm": lambda: nn.RMSNorm(a),
            "batchnorm": lambda: nn.BatchNorm1d(a), "conv": lambda: nn.Conv1d(a, b, 3),
            "param": lambda: nn.Parameter(torch.zeros(shape))}[kind]()


@st.composite
def random_models(draw) -> nn.Module:
    """Two-level module trees whose names mix the words routing looks for, with tied weights,
    a module reachable under two names and frozen parameters."""
    dims = st.integers(1, 8)
    root, leaves = nn.Module(), []
    for i in range(draw(st.integers(1, 4))):
        container = nn.Module()
        root.add_module("_".join(draw(st.lists(st.sampled_from(PIECES), min_size=1,
                                               max_size=2))) + f"{i}", container)
        for j in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["linear", "embedding", "layernorm", "rmsnorm",
                                         "batchnorm", "conv", "param"]))
            shape = tuple(draw(st.lists(dims, max_size=3)))
            leaf = _leaf(kind, draw(dims), draw(dims), draw(st.booleans()), shape)
            name = draw(st.sampled_from(PIECES)) + ("" if draw(st.booleans()) else f"_{j}")
            if hasattr(container, name):
                continue
            if isinstance(leaf, nn.Parameter):
                container.register_parameter(name, leaf)
            else:
                container.add_module(name, leaf)
                leaves.append(leaf)
    weighted = [m for m in leaves if isinstance(getattr(m, "weight", None), nn.Parameter)]
    if len(weighted) >= 2 and draw(st.booleans()):
        source, target = draw(st.permutations(weighted))[:2]
        target.weight = source.weight  # tie, shapes need not agree: nothing runs forward
    children = list(root.named_children())
    if draw(st.booleans()):
        root.add_module("shared_" + draw(st.sampled_from(PIECES)), draw(st.sampled_from(
            [m for _, m in children])))
    params = list(root.parameters())
    if params and draw(st.booleans()):
        draw(st.sampled_from(params)).requires_grad_(False)
    return root


@st.composite
def arguments(draw) -> tuple[str, str, dict]:
    preset = draw(st.sampled_from([*PRESETS, "apollo", "apollo"]))  # apollo has most branches
    grouping = draw(st.sampled_from(GROUPING_NAMES))
    kwargs = dict(draw(st.sampled_from([
        {}, {"lm_head_lr": 1e-3}, {"one_d_m_quant_type": "uf4"}, {"other_c_quant_type": "al16"},
        {"matrix_quantize": True, "nd_block_size": 256}, {"beta1": 0.5}, {"beta3": 0.99},
        {"embedding_quantize": "auto", "embedding_v_quant_type": "al16"}])))
    if preset == "apollo":
        kwargs.update(apollo_rank=draw(st.sampled_from([None, 0, 1, 2, 4])),
                      apollo_targets=draw(st.sampled_from(
                          ["auto", ["attn"], ["embed", "lm_head"], ["wte"], ["LM_HEAD"], []])),
                      apollo_min_dim_multiplier=draw(st.sampled_from(["auto", 1, 2])))
    if GROUPINGS.get(grouping.lower()) == "G2" and preset in ("adafactor", "came"):
        kwargs["nd_factored"] = draw(st.sampled_from([None, True, False]))
    return preset, grouping, kwargs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=random_models(), args=arguments())
def test_random_models_match_package(model, args):
    """Property: on random module trees (keyword-laden names, ties, aliases, frozen and 0-d to
    3-D parameters) and random preset/grouping/APOLLO/route arguments, every parameter lands in
    a group with the package's name and options, and as many warnings are raised."""
    preset, grouping, kwargs = args
    assert_same_groups(model, preset, grouping, **kwargs)


def test_apollo_preset_routes(models):
    """The apollo preset with a small rank sends GPT-2's attention/MLP matrices (and nothing
    else) to an ``apollo`` group with that rank, which afx's optimizer accepts."""
    model = models["gpt2"]
    groups = build_param_groups(model, "apollo", apollo_rank=16)
    names = {id(p): n for n, p in model.named_parameters()}
    apollo = next(g for g in groups if g["group_name"] == "apollo")
    assert apollo["apollo_rank"] == 16 and apollo["apollo_cache_proj"] is True
    assert sorted(names[id(p)].split(".")[-2] for p in apollo["params"]) == sorted(
        ["c_attn", "c_proj", "c_fc", "c_proj"] * 2)
    assert all(g["apollo_rank"] == 0 for g in groups if g is not apollo)
    afx.Adafactor8Bit(groups, compile=False)
    # The default rank (256) exceeds every dimension of this model: no APOLLO group at all.
    assert "apollo" not in [g["group_name"] for g in build_param_groups(model, "apollo")]


def test_classification(models):
    """Roles under G2: 0-d/1-D/norm/`bias` -> one_d; Embedding or embed/wte names (not
    time/position) -> embedding, tied heads included; lm_head names -> lm_head; 2-D -> matrix;
    the rest -> nd. Frozen and aliased parameters: never / once."""
    def routes(model: nn.Module) -> dict[str, str]:
        by_id = {id(p): g["group_name"] for g in build_param_groups(model, "adamw", "G2")
                 for p in g["params"]}
        return {n: by_id.get(id(p), "-") for n, p in model.named_parameters()}

    tied, conv = routes(models["tied"]), routes(models["conv"])
    assert tied["tok.weight"] == "embedding" and "lm_head.weight" not in tied  # one name
    assert tied["time_embed.weight"] == "matrix" and tied["aux_lm_head.weight"] == "lm_head"
    assert tied["layers.0.norm.weight"] == "one_d" and tied["aux_lm_head.bias"] == "one_d"
    assert tied["layers.1.attn.weight"] == "matrix"
    assert conv["odd.bias"] == conv["scale"] == conv["bn.weight"] == "one_d"
    assert conv["stem.weight"] == conv["block.3.weight"] == conv["pos_embed"] == "nd"
    assert conv["frozen.weight"] == "-" and conv["mlp.weight"] == "matrix"
    gpt = routes(models["gpt2"])
    assert gpt["transformer.wte.weight"] == "embedding"
    assert gpt["transformer.wpe.weight"] == "matrix"


def test_afx_accepts_every_preset(models):
    """Every group of every preset × grouping is accepted by afx.Adafactor8Bit and takes one
    eager step on the tied model (APOLLO with rank 2 and with its default rank, which selects
    nothing on this model)."""
    base = models["tied"]
    runs = [(preset, {}) for preset in PRESETS] + [("apollo", dict(apollo_rank=2))]
    for preset, extra in runs:
        for grouping in ("auto", "G0", "G1", "G2"):
            model = copy.deepcopy(base)
            groups = build_param_groups(model, preset, grouping, **extra)
            opt = afx.Adafactor8Bit(groups, compile=False)
            sum(p.square().mean() for p in model.parameters()).backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
            assert all(moved), (preset, grouping)


def test_groups_are_fresh_and_model_untouched(models):
    """Groups are new mutable dicts (editing one changes neither another call's groups nor the
    preset table) and building them leaves the parameters unchanged."""
    model = models["conv"]
    before = [p.detach().clone() for p in model.parameters()]
    first = build_param_groups(model, "came", "G2")
    first[0]["beta1"] = 0.5
    first[0]["params"].clear()
    second = build_param_groups(model, "came", "G2")
    assert second[0]["beta1"] == 0.9 and second[0]["params"]
    assert PRESETS["came"].primary["beta1"] == 0.9
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert build_param_groups(nn.ReLU(), "adamw") == []


# ----------------------------------------------------------------------------------- errors --
ERROR_CASES = [
    (dict(preset="adam"), ValueError, "'adam'"),
    (dict(grouping="G3"), ValueError, "'G3'"),
    (dict(grouping=None), TypeError, "grouping=None"),
    (dict(factored=False), ValueError, "factored=False"),
    (dict(weight_decay=0.1), TypeError, "weight_decay=0.1"),
    (dict(lr=1e-3), TypeError, "lr=0.001"),
    (dict(momentum=0.9), TypeError, "'momentum'"),
    (dict(foo_lr=1e-3), TypeError, "'foo'"),
    (dict(one_d_lr=-1.0), ValueError, "one_d_lr=-1.0"),
    (dict(one_d_lr=True), ValueError, "one_d_lr=True"),
    (dict(other_quantize="yes"), ValueError, "other_quantize='yes'"),
    (dict(one_d_stochastic_round_writeback="yes"), ValueError, "writeback='yes'"),
    (dict(embedding_block_size=100), ValueError, "embedding_block_size=100"),
    (dict(all_m_block_size=30), ValueError, "all_m_block_size=30"),
    (dict(all_min_8bit_size=-1), ValueError, "all_min_8bit_size=-1"),
    (dict(all_min_8bit_size=1.5), ValueError, "all_min_8bit_size=1.5"),
    (dict(matrix_v_quant_type="al4"), ValueError, "matrix_v_quant_type='al4'"),
    (dict(all_m_quant_type="q8"), ValueError, "all_m_quant_type='q8'"),
    (dict(other_c_quant_type="uf8"), ValueError, "other_c_quant_type='uf8'"),
    (dict(apollo_rank=8), ValueError, "apollo_rank=8.*'adamw'"),
    (dict(preset="came", apollo_targets=["attn"]), ValueError, "apollo_targets.*'came'"),
    (dict(preset="sgd", apollo_min_dim_multiplier=2), ValueError, "multiplier=2.*'sgd'"),
    (dict(preset="apollo", apollo_rank=-1), ValueError, "apollo_rank=-1"),
    (dict(preset="apollo", apollo_rank=1.5), TypeError, "1.5"),
    (dict(preset="apollo", apollo_rank=True), TypeError, "True"),
    (dict(preset="apollo", apollo_targets="attn"), TypeError, "'attn'"),
    (dict(preset="apollo", apollo_targets=[""]), TypeError, "non-empty"),
    (dict(preset="apollo", apollo_targets=None), TypeError, "apollo_targets=None"),
    (dict(preset="apollo", apollo_min_dim_multiplier=0), ValueError, "multiplier=0"),
    (dict(nd_factored=True, grouping="G1"), ValueError, "nd_factored=True.*'G1'"),
    (dict(nd_factored=True, grouping="G2"), ValueError, "'adamw'"),
    (dict(nd_factored="yes", grouping="G2"), TypeError, "'yes'"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), ERROR_CASES)
def test_errors_name_the_offending_value(models, kwargs, error, match):
    """Bad arguments raise the stated error class with a message naming the value; the package
    refuses the same arguments (sometimes as TypeError where afx says ValueError)."""
    kwargs = {"preset": "adamw", **kwargs}
    model = models["tied"]
    with pytest.raises(error, match=match):
        build_param_groups(model, **kwargs)
    with pytest.raises((TypeError, ValueError)):
        adafactor8bit.build_param_groups(model, **kwargs)


def test_model_must_be_a_module(models):
    """Passing model.parameters() (or anything but an nn.Module) is a TypeError."""
    with pytest.raises(TypeError, match=r"model\.parameters"):
        build_param_groups(models["conv"].parameters(), "adamw")


def test_policy_is_refused(models):
    """policy= (the package's dictionary overlay) is not implemented: refused, not ignored."""
    with pytest.raises(NotImplementedError, match="policy"):
        build_param_groups(models["conv"], "adamw", policy={})


def test_afx_momentum_codes_accepted(models):
    """Route options accept afx's symmetric momentum codes (s4/s8) that afx's optimizer runs;
    every other value is the package's set."""
    groups = build_param_groups(models["conv"], "adamw", "G0", all_m_quant_type="s8")
    assert groups[0]["m_quant_type"] == "s8"


@pytest.mark.parametrize(("args", "kwargs", "words"), [
    (("came", "auto"), dict(one_d_m_quant_type="uf4"), "'one_d'.*one_d_quantize=True"),
    (("adafactor", "G1"), dict(other_m_quant_type="uf4"), "'other' has beta1=None"),
    (("adamw", "G1"), dict(other_c_quant_type="al16"), "'other' has beta3=None"),
    (("adamw", "G0"), dict(matrix_lr=1e-3), "'matrix'.*match no group"),
    (("adamw", "G1"), dict(lm_head_lr=1e-3), "tied to the token embedding"),
    (("apollo", "G1"), dict(apollo_rank=0, apollo_targets=["attn"]), "apollo_rank=0"),
    (("apollo", "G1"), dict(apollo_rank=8, apollo_targets=["lm_head"]), "only the lm_head"),
])
def test_warnings(models, args, kwargs, words):
    """Options that cannot take effect warn (UserWarning) with the route or value named."""
    with pytest.warns(UserWarning, match=words):
        build_param_groups(models["gpt2"], *args, **kwargs)


# --------------------------------------------------------------------------------- numerics --
class Small(nn.Module):
    """Embedding, LayerNorm, two Linear layers: G1 gives one_d/embedding (no decay) and other."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(12, 8)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(self.norm(self.embed(idx)))))


def compare(make_ours: Callable, make_ref: Callable, steps: int = 50,
            before_ref_step: Callable | None = None) -> float:
    """Trains two copies of Small; returns the max over steps and tensors of
    max|ours − ref| / max|ref|."""
    base = Small()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    opt, opt_ref = make_ours(ours), make_ref(ref)
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(steps):
        idx = torch.randint(0, 12, (16,), generator=gen)
        target = torch.randn(16, 4, generator=gen)
        for model, o in ((ours, opt), (ref, opt_ref)):
            o.zero_grad()
            (model(idx) - target).square().mean().backward()
        if before_ref_step is not None:
            before_ref_step(opt_ref)
        opt.step()
        opt_ref.step()
        worst = max(worst, *(((a - b).abs().max() / b.abs().max()).item()
                             for a, b in zip(ours.parameters(), ref.parameters())))
    return worst


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def same_gradients(make_ours: Callable, make_ref: Callable, steps: int = 50,
                   before_ref_step: Callable | None = None) -> dict[str, float]:
    """Runs ours, the reference optimizer in float32 and the reference in float64 on the
    gradients of our model (open loop: no feedback through the loss), and returns the max over
    steps and tensors of the relative differences between the three."""
    base = Small()
    ours, ref, exact = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base).double()
    opts = [make_ours(ours), make_ref(ref), make_ref(exact)]
    gen = torch.Generator().manual_seed(1)
    errors = dict.fromkeys(("ours_vs_ref", "ours_vs_exact", "ref_vs_exact"), 0.0)
    for _ in range(steps):
        idx = torch.randint(0, 12, (16,), generator=gen)
        target = torch.randn(16, 4, generator=gen)
        opts[0].zero_grad()
        (ours(idx) - target).square().mean().backward()
        for a, b, c in zip(ours.parameters(), ref.parameters(), exact.parameters()):
            b.grad, c.grad = a.grad.clone(), a.grad.double()
        for i, opt in enumerate(opts):
            if i and before_ref_step is not None:
                before_ref_step(opt)
            opt.step()
        for a, b, c in zip(ours.parameters(), ref.parameters(), exact.parameters()):
            for key, x, y in (("ours_vs_ref", a, b), ("ours_vs_exact", a, c),
                              ("ref_vs_exact", b, c)):
                errors[key] = max(errors[key], rel(x.detach(), y.detach()))
    return errors


def torch_groups(groups: list[dict], weight_decay: float) -> list[dict]:
    """The same partition for a torch optimizer, with each group's weight decay."""
    return [{"params": g["params"], "weight_decay": g.get("weight_decay", weight_decay)}
            for g in groups]


LR, WD = 1e-2, 0.1


def test_adamw_preset_is_torch_adamw():
    """Without weight decay the adamw preset (quantize=False) is torch.optim.AdamW with the same
    lr, betas and eps: max relative parameter difference ≤ 1e-6 over 50 training steps
    (measured 1.7e-7: fp32 rounding)."""
    worst = compare(
        lambda m: afx.Adafactor8Bit(build_param_groups(m, "adamw"), lr=LR, weight_decay=0.0,
                                    quantize=False, compile=False),
        lambda m: torch.optim.AdamW(m.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                    weight_decay=0.0))
    print(f"\nadamw preset vs torch.optim.AdamW, weight_decay=0: max rel diff {worst:.2e}")
    assert worst <= 1e-6


@pytest.mark.parametrize("grouping", ["auto", "G0"])
def test_adamw_preset_weight_decay(grouping):
    """With weight decay λ = 0.1 (lr = 1e-2; per group, so 0 on one_d/embedding under G1) the
    preset is decoupled AdamW. Fed the same gradients for 50 steps, afx stays within 1e-6
    relative of torch.optim.AdamW run in float64 (measured 3.9e-7), but float32
    torch.optim.AdamW itself drifts up to 1.3e-6 from it: it rounds p twice per step
    (p·fl32(1 − lr·λ), then the Adam step; fl32(0.999) alone is off by 1.3e-8 per step), where
    afx subtracts lr·λ·p together with the update (one rounding of p). So afx vs float32 torch
    is bounded by 1e-6 plus torch's own error (measured 1.7e-6 under G0, 8e-7 under G1)."""
    errors = same_gradients(
        lambda m: afx.Adafactor8Bit(build_param_groups(m, "adamw", grouping), lr=LR,
                                    weight_decay=WD, quantize=False, compile=False),
        lambda m: torch.optim.AdamW(torch_groups(build_param_groups(m, "adamw", grouping), WD),
                                    lr=LR, betas=(0.9, 0.999), eps=1e-8))
    print(f"\nadamw preset ({grouping}), weight_decay={WD}: vs float64 AdamW "
          f"{errors['ours_vs_exact']:.2e}; float32 AdamW vs float64 AdamW "
          f"{errors['ref_vs_exact']:.2e}; afx vs float32 AdamW {errors['ours_vs_ref']:.2e}")
    assert errors["ours_vs_exact"] <= 1e-6
    assert errors["ours_vs_ref"] <= 1e-6 + errors["ref_vs_exact"]


def decoupled(lr: float) -> Callable[[torch.optim.Optimizer], None]:
    """p ← p·(1 − lr·λ_group) before a weight-decay-free torch step (AdamW-style decay)."""
    def decay(opt: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    p.mul_(1 - lr * group["decay"])
    return decay


def rmsprop_ref(groups: list[dict], weight_decay: float, coupled: bool) -> torch.optim.RMSprop:
    return torch.optim.RMSprop(
        [{"params": g["params"], "decay": g.get("weight_decay", weight_decay),
          "weight_decay": g.get("weight_decay", weight_decay) if coupled else 0.0}
         for g in groups], lr=LR, alpha=0.99, eps=1e-8)


def test_rmsprop_preset_is_torch_rmsprop_with_decoupled_decay():
    """The rmsprop preset (β₂ = 0.99, eps1 = 1e-8, no momentum, no clipping, quantize=False) is
    torch.optim.RMSprop(alpha=0.99, eps=1e-8) step for step: both keep V ← αV + (1−α)g² from
    V₀ = 0 with no bias correction and divide by √V + eps (eps outside the root). The one
    difference is weight decay: the preset decouples it (p ← p − lr·λ·p − lr·g/(√V + eps), as
    AdamW; scale_weight_decay=False makes the factor lr), torch's RMSprop couples it (adds λp
    to the gradient, which then enters V and is normalised). So:

    * weight_decay = 0: equal to torch's RMSprop over 50 training steps, ≤ 1e-6 relative
      (measured 3.5e-7);
    * weight_decay = λ = 0.1: fed the same gradients, afx equals torch's
      RMSprop(weight_decay=0) preceded by p ← p(1 − lr·λ) each step, run in float64, to
      ≤ 1e-6 (measured 2.8e-7), and the float32 version of that reference to within 1e-6 plus
      the reference's own float32 error (it rounds p twice per step, 6.9e-7 here). The
      package's optimizer equals the float32 reference (same p·fl32(1 − lr·λ) rounding) to
      ≤ 1e-6 (measured 2.4e-7), so the relation is the package's, not an afx artefact;
    * torch's coupled RMSprop(weight_decay=λ) is another algorithm: the trajectories differ by
      more than 1e-3 relative (measured ~2), asserted so the test can tell them apart.
    """
    def ours(weight_decay: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
        return lambda m: afx.Adafactor8Bit(build_param_groups(m, "rmsprop"), lr=LR,
                                           weight_decay=weight_decay, quantize=False,
                                           compile=False)

    def ref(weight_decay: float, coupled: bool) -> Callable[[nn.Module], torch.optim.Optimizer]:
        return lambda m: rmsprop_ref(build_param_groups(m, "rmsprop"), weight_decay, coupled)

    def package(m: nn.Module) -> torch.optim.Optimizer:
        return adafactor8bit.Adafactor8Bit(adafactor8bit.build_param_groups(m, "rmsprop"),
                                           lr=LR, weight_decay=WD, quantize=False,
                                           use_cuda_kernel=False)

    plain = compare(ours(0.0), ref(0.0, coupled=False))
    coupled = compare(ours(WD), ref(WD, coupled=True))
    afx_wd = same_gradients(ours(WD), ref(WD, coupled=False), before_ref_step=decoupled(LR))
    package_wd = same_gradients(package, ref(WD, coupled=False), before_ref_step=decoupled(LR))
    print(f"\nrmsprop preset vs torch RMSprop: wd=0 {plain:.2e}; wd={WD}: afx vs float64 "
          f"decoupled RMSprop {afx_wd['ours_vs_exact']:.2e}, vs float32 decoupled "
          f"{afx_wd['ours_vs_ref']:.2e} (float32 vs float64 {afx_wd['ref_vs_exact']:.2e}); "
          f"package vs float32 decoupled {package_wd['ours_vs_ref']:.2e}; afx vs coupled "
          f"{coupled:.2e}")
    assert plain <= 1e-6
    assert afx_wd["ours_vs_exact"] <= 1e-6 and package_wd["ours_vs_ref"] <= 1e-6
    assert afx_wd["ours_vs_ref"] <= 1e-6 + afx_wd["ref_vs_exact"]
    assert coupled > 1e-3


def test_rmsprop_preset_bias_correction_is_adam_without_momentum():
    """afx only: with bias_correction=True the rmsprop preset corrects its second moment, which
    makes it torch.optim.AdamW(betas=(0, 0.99)) (m = g, û = g/(√(V/(1−β₂ᵗ)) + eps)), ≤ 1e-6.
    The package ignores bias_correction without beta1 (its first step is 10× Adam's here)."""
    worst = compare(
        lambda m: afx.Adafactor8Bit(build_param_groups(m, "rmsprop", bias_correction=True),
                                    lr=LR, weight_decay=WD, quantize=False, compile=False),
        lambda m: torch.optim.AdamW(torch_groups(build_param_groups(m, "rmsprop"), WD), lr=LR,
                                    betas=(0.0, 0.99), eps=1e-8))
    assert worst <= 1e-6


@pytest.mark.parametrize(("beta1", "weight_decay"), [(None, WD), (0.9, 0.0)])
def test_sgd_preset_is_torch_sgd(beta1, weight_decay):
    """The sgd preset is torch.optim.SGD: without momentum its decoupled decay p − lr·λ·p equals
    torch's coupled one; with beta1 the heavy-ball buffer b ← β₁b + g is torch's momentum
    (dampening 0). ≤ 1e-6 relative over 50 steps."""
    kwargs = {} if beta1 is None else {"beta1": beta1}
    worst = compare(
        lambda m: afx.Adafactor8Bit(build_param_groups(m, "sgd", **kwargs), lr=LR,
                                    weight_decay=weight_decay, quantize=False, compile=False),
        lambda m: torch.optim.SGD(torch_groups(build_param_groups(m, "sgd"), weight_decay),
                                  lr=LR, momentum=beta1 or 0.0))
    assert worst <= 1e-6
