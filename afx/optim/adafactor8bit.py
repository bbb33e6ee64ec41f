"""``afx.Adafactor8Bit``: a drop-in replacement for the ``adafactor8bit`` package's optimizer."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch

from afx.base import NON_NEGATIVE, GradientTransformation, hyper_value, hyperparams
from afx.codecs import get_codec
from afx.combine import named_chain, partition
from afx.optim.optimizer import Optimizer, StepLayout, is_off
from afx.optim.package_checkpoint import apollo_v_floor, from_package, is_package_state_dict
from afx.transforms import (
    StepSize,
    adam_bias_correction,
    add_decayed_weights,
    came_confidence,
    clip_by_rms,
    ema,
    fira_limit,
    heavy_ball,
    learning_rate,
    param_rms,
    quantize_state,
    relative_step,
    scale,
    scale_by_apollo,
    scale_by_factored_rms,
    scale_by_rms,
    scale_by_step_size,
    second_moment_correction,
)

#: adafactor8bit 0.4.6's options and defaults (0.2.2's 25 options are a subset).
DEFAULTS: Mapping[str, Any] = MappingProxyType(dict(
    lr=1e-2, beta1=None, beta2=None, beta2_decay=-0.8, beta3=None, eps_came=1e-16,
    eps=(1e-30, 1e-3), weight_decay=0.0, d=1.0, maximize=False, relative_step=True,
    scale_parameter=True, factored=True, quantize=True, block_size=2048, m_block_size=256,
    m_quant_type="uf8", v_quant_type="al8", c_quant_type=None, min_8bit_size=4096,
    use_cuda_kernel=True, stochastic_round_writeback=False, apollo_rank=0,
    apollo_update_proj_gap=200, apollo_scale_type="channel", apollo_scale=1.0,
    apollo_scale_front=False, apollo_eps=1e-6, apollo_factorize=False, apollo_cache_proj=False,
    enable_fira_for_apollo=True, scale_weight_decay=True, enable_fira_for_adafactor=False,
    fira_margin=0.01, lag_norm=False, momentum_only_1d=None, bias_correction=None,
    warmup_multiplier=0.0,
))

# s4/s8 are afx's symmetric codes (both extremes exact); the others are the package's.
M_TYPES = ("uf4", "uf8", "d4", "d8", "fp32", "s4", "s8")
V_TYPES = ("al8", "al16", "fp32")

#: Inductor options on CPU for a factored bucket with 8-bit momentum of at least
#: 8M elements (``Adafactor8Bit.cpu_inductor_options``): the momentum is computed in every loop
#: that reads it instead of being stored as a parameter-sized fp32 buffer.
RECOMPUTE_MOMENTUM_OPTIONS = MappingProxyType({"realize_opcount_threshold": 100,
                                               "realize_reads_threshold": 16})
#: Inductor options on CPU for an element-wise (Adam-like) bucket with 8-bit first and second
#: moments of at least 8M elements: a node of up to 40 operations is computed in each loop
#: that reads it, so the step stores the new second moment alone (whose decoder has a 2^y),
#: not the new first moment or the update.
ELEMENTWISE_MOMENTS_OPTIONS = MappingProxyType({"realize_opcount_threshold": 40})
_FRESH_MAPPING_NUMEL = 8 * 2**20  # fp32 elements in 32 MiB
_FACTORED_MOMENTUM = "factored.second_moment.m.codes"
#: The codes of a factored route's 8-bit momentum: Adam-style, and CAME's.
_FACTORED_MOMENTUM_CODES = (_FACTORED_MOMENTUM, "factored.momentum.m.codes")
_ELEMENTWISE_MOMENTS = ("elementwise.second_moment.m.codes",
                        "elementwise.second_moment.rms.v.codes")


def _fail(option: str, value: Any, rule: str) -> None:
    raise ValueError(f"Invalid {option}: {value!r} ({rule})")


def check_options(group: Mapping[str, Any]) -> None:
    """Validates one param group's options like adafactor8bit 0.4.6 validates its constructor.

    afx applies the checks to every group (the package checks only constructor arguments).
    Numeric ranges of the schedulable hyperparameters (``lr``, betas, ``eps``, ``d``,
    ``weight_decay``) are checked by the adapter on every step as well.

    Raises:
        ValueError: naming the option and its value.
    """
    sgd = group["beta2"] is None and group["beta2_decay"] is None
    if group["beta2_decay"] is not None and group["beta2_decay"] > 0:
        _fail("beta2_decay", group["beta2_decay"], "must be <= 0, or None")
    if sgd and group["relative_step"]:
        _fail("relative_step", True, "must be False when beta2 and beta2_decay are both None "
              "(SGD mode has no second moment to normalise the relative step)")
    if sgd and group["apollo_rank"] > 0:
        _fail("apollo_rank", group["apollo_rank"], "APOLLO needs a second moment: set beta2 "
              "or beta2_decay")
    if sgd and group["beta3"] is not None:
        _fail("beta3", group["beta3"], "CAME needs both beta1 and a second moment")
    eps = group["eps"]
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        _fail("eps", eps, "expected a pair (eps1, eps2)")
    # Checked here too because a path that reads neither (SGD mode) declares no eps.
    if eps[0] is not None and not eps[0] >= 0:
        _fail("eps", eps, "eps1 must be >= 0 or None")
    if not eps[1] >= 0:
        _fail("eps", eps, "eps2 must be >= 0")
    for name in ("quantize", "factored", "relative_step", "maximize", "scale_parameter",
                 "scale_weight_decay", "apollo_factorize", "apollo_cache_proj",
                 "apollo_scale_front", "enable_fira_for_apollo", "enable_fira_for_adafactor",
                 "stochastic_round_writeback"):
        if not isinstance(group[name], bool):
            _fail(name, group[name], "expected True or False")
    if group["quantize"]:
        bs = group["block_size"]
        if not isinstance(bs, int) or bs < 128 or bs % 128:
            _fail("block_size", bs, "must be a multiple of 128, at least 128")
    mbs = group["m_block_size"]
    if not isinstance(mbs, int) or mbs < 32 or mbs % 4:
        _fail("m_block_size", mbs, "must be a multiple of 4, at least 32")
    if group["m_quant_type"] not in M_TYPES:
        _fail("m_quant_type", group["m_quant_type"], f"one of {M_TYPES}")
    if group["v_quant_type"] not in V_TYPES:
        _fail("v_quant_type", group["v_quant_type"], f"one of {V_TYPES}")
    if group["c_quant_type"] not in (None, *V_TYPES):
        _fail("c_quant_type", group["c_quant_type"], f"None or one of {V_TYPES}")
    if not isinstance(group["min_8bit_size"], int) or group["min_8bit_size"] < 0:
        _fail("min_8bit_size", group["min_8bit_size"], "must be an int >= 0")
    rank = group["apollo_rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        _fail("apollo_rank", rank, "must be an int >= 0 (0 turns APOLLO off)")
    gap = group["apollo_update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, (int, float)) or not gap >= 1:
        _fail("apollo_update_proj_gap", gap, "must be a number of steps >= 1")
    if group["apollo_rank"] > 0 and group["apollo_scale_type"] not in ("channel", "tensor"):
        _fail("apollo_scale_type", group["apollo_scale_type"], "'channel' or 'tensor'")
    if group["apollo_scale"] < 0:
        _fail("apollo_scale", group["apollo_scale"], "must be >= 0")
    if group["fira_margin"] < 0:
        _fail("fira_margin", group["fira_margin"], "must be >= 0")
    for option in ("momentum_only_1d", "bias_correction"):
        if group[option] not in (None, True, False):
            _fail(option, group[option], "None, True or False")
    if group["beta3"] is not None:
        if not 0.0 <= group["beta3"] < 1.0:
            _fail("beta3", group["beta3"], "must be in [0, 1)")
        if group["beta1"] is None:
            _fail("beta3", group["beta3"], "CAME (beta3) needs momentum: set beta1")
        if group["beta1"] == 0:
            # Stricter than the package: the residual (u − m)² would be identically zero, and
            # the confidence (then eps_came-sized) would blow the update up by ~1e8.
            _fail("beta1", 0.0, "CAME (beta3) needs beta1 > 0")
        if group["apollo_rank"] == 0 and not group["factored"]:
            _fail("beta3", group["beta3"], "CAME (beta3) needs factored=True without APOLLO")


def adafactor8bit(group: Mapping[str, Any], *, finite_grads: bool = False
                  ) -> GradientTransformation:
    """The chain adafactor8bit 0.4.6 runs for one param group.

    Per parameter, with ``ρ_t = min(lr, 1/√t)`` (``relative_step``) or ``lr``, the step size
    ``α_t = ρ_t · max(eps2, RMS(p))`` (``scale_parameter``) times Adam's bias correction where
    it applies, and ``D = max(1, RMS(u)/d)`` (``d = 0``: no clipping):

    * factored path (≥2-D, ``factored``): ``u = M / √V̂`` (``M`` the EMA of ``g`` with
      ``beta1``, else ``g``), ``V̂`` Adafactor's factored estimate, weights ``t^beta2_decay``
      or ``1 − beta2``; ``p ← p − α u / D − w λ p``;
    * element-wise path: Adafactor's ``V`` (``g² + eps1`` averaged, floored), or in Adam mode
      (``factored=False`` with a fixed ``beta2``) ``1/(√V + eps1)``; momentum either
      Adafactor-style (EMA of the clipped normalised gradient, no final clip; default outside
      Adam mode) or Adam-style;
    * CAME (``beta3`` with ``beta1``, ≥2-D factored parameters): the clipped ``g/√V̂`` goes
      through :func:`afx.transforms.came_confidence`; other parameters ignore ``beta3``;
    * SGD mode (``beta2 = beta2_decay = None``): ``u = g`` or the heavy-ball buffer.

    ``w`` is ``α_t`` (``scale_weight_decay``) or ``ρ_t``. With ``enable_fira_for_adafactor``
    the final update (before the RMS clip, whose denominator uses the same unlimited norm)
    passes through :func:`afx.transforms.fira_limit`. Second-moment and momentum states are
    stored in ``v_quant_type`` / ``m_quant_type`` when ``quantize`` and the parameter has at
    least ``min_8bit_size`` elements (and the encoded state is smaller than float32).

    Args:
        group: a param group with adafactor8bit's options.
        finite_grads: the caller discards updates of non-finite gradients (``skip_nonfinite``),
            so APOLLO need not replace their NaN/Inf entries by zero first.

    Returns:
        The chain, routed per parameter by shape.

    References:
        Shazeer & Stern, "Adafactor", 2018; Kingma & Ba, "Adam", 2015; Dettmers et al.,
        "8-bit Optimizers via Block-wise Quantization", 2022.

    Example:
        >>> import afx
        >>> from afx.optim.adafactor8bit import DEFAULTS, adafactor8bit
        >>> sorted(adafactor8bit(dict(DEFAULTS)).hyperparams)
        ['clip_threshold', 'decay_rate', 'eps1', 'eps2', 'lr', 'weight_decay']
    """
    check_options(group)
    beta1, beta2 = group["beta1"], group["beta2"]
    sgd = beta2 is None and group["beta2_decay"] is None
    adam_mode = not group["factored"] and beta2 is not None
    bias_correction = adam_mode if group["bias_correction"] is None else group["bias_correction"]
    corrected = beta1 is not None and not group["relative_step"] and not sgd and bias_correction
    # The package never corrects a momentum-free second moment; afx does when asked explicitly
    # (bias_correction=True), so "Adam without momentum" routes start at Adam's step size.
    corrected_v = (beta1 is None and group["bias_correction"] is True and beta2 is not None
                   and not group["relative_step"])
    momentum_only = (not adam_mode if group["momentum_only_1d"] is None
                     else group["momentum_only_1d"])
    eps1 = 1e-30 if group["eps"][0] is None else group["eps"][0]

    rho = (relative_step(capped_by_lr=True, lr=group["lr"]) if group["relative_step"]
           else learning_rate(group["lr"]))
    alpha = base_alpha = rho * param_rms(group["eps"][1]) if group["scale_parameter"] else rho
    if corrected:
        alpha = alpha * adam_bias_correction(beta2 is not None, beta1, beta2 or 0.999)
    elif corrected_v:
        alpha = alpha * second_moment_correction(beta2)
    decay_step = alpha if group["scale_weight_decay"] else rho
    fira = group["enable_fira_for_adafactor"]
    # Defaults of hyperparameters the graph reads from the group anyway; None means "unused".
    decay_rate = -0.8 if group["beta2_decay"] is None else group["beta2_decay"]
    beta1_default = 0.9 if beta1 is None else beta1
    # d = 0 is static (off_at_zero_options): the chain then has no clip. Its norm of the
    # update, a reduction over the whole parameter, makes a compiled step keep the update
    # for the loop after it (a float32 copy of the parameter) even when it scales by one.
    clip = [] if is_off(group["d"]) else [("clip", clip_by_rms(group["d"]))]

    def route(second_moment: GradientTransformation | None,
              momentum_after_clip: GradientTransformation | None,
              heavy: bool = False, clipped: bool = False) -> GradientTransformation:
        parts = [("maximize", scale(-1.0))] if group["maximize"] else []
        clip_here = [] if clipped else clip
        if heavy:
            parts.append(("momentum", ema(beta1)))
            parts.append(("heavy_ball", scale_by_step_size(heavy_ball(beta1))))
        if second_moment is not None:
            parts.append(("second_moment", second_moment))
        if momentum_after_clip is not None:
            # Clip the normalised gradient, average it (Adafactor-style or CAME), and limit
            # (Fira) without a final clip.
            parts += [*clip_here, ("momentum", momentum_after_clip)]
            if fira:
                parts.append(("fira", fira_limit(group["fira_margin"])))
        elif fira:
            parts.append(("fira", fira_limit(group["fira_margin"], group["d"])))
        else:
            parts += clip_here
        parts += [("step_size", scale_by_step_size(alpha)),
                  ("weight_decay", add_decayed_weights(group["weight_decay"], decay_step)),
                  ("descent", scale(-1.0))]
        return _quantized(named_chain(*parts), group)

    def apollo_route() -> GradientTransformation:
        # adafactor8bit 0.4.6: the scaled full-rank gradient goes through the optional front
        # scale, Fira (or the plain clip; both measure the norm before Fira), the back scale,
        # then α_t·κ. Weight decay uses α_t without the bias correction κ.
        front = group["apollo_scale_front"]
        root_scale = scale_by_step_size(_square_root_of("apollo_scale", group["apollo_scale"]))
        parts = [("maximize", scale(-1.0))] if group["maximize"] else []
        parts.append(("low_rank", scale_by_apollo(
            group["apollo_rank"], proj_gap=group["apollo_update_proj_gap"],
            scale_type=group["apollo_scale_type"], decay_rate=decay_rate, beta2=beta2,
            momentum=beta1 is not None, beta1=beta1_default, eps=group["apollo_eps"],
            factorize=group["apollo_factorize"], confidence=group["beta3"] is not None,
            beta3=group["beta3"] or 0.9999, eps_came=group["eps_came"],
            clip_threshold=group["d"], cache_proj=group["apollo_cache_proj"],
            finite_grads=finite_grads)))
        if front:
            parts.append(("apollo_scale", root_scale))
        parts += ([("fira", fira_limit(group["fira_margin"], group["d"]))]
                  if group["enable_fira_for_apollo"] else clip)
        if not front:
            parts.append(("apollo_scale", root_scale))
        step = base_alpha
        if (beta1 is not None and not group["relative_step"]
                and group["bias_correction"] is not False):
            step = step * adam_bias_correction(beta2 is not None, beta1, beta2 or 0.999)
        parts += [("step_size", scale_by_step_size(step)),
                  ("weight_decay", add_decayed_weights(
                      group["weight_decay"], base_alpha if group["scale_weight_decay"] else rho)),
                  ("descent", scale(-1.0))]
        return _quantized(named_chain(*parts), group, apollo=True)

    if sgd:
        routes = {"sgd": route(None, None, heavy=beta1 is not None)}
    else:
        inner_momentum = beta1 is not None and not momentum_only
        if adam_mode:
            elementwise = scale_by_rms(beta2, eps1, eps_correction=corrected or corrected_v,
                                       momentum=inner_momentum, beta1=beta1_default)
        else:
            elementwise = scale_by_factored_rms(decay_rate, eps1, beta2=beta2,
                                                factored=False, momentum=inner_momentum,
                                                beta1=beta1_default)
        came = group["beta3"] is not None
        # The factored second moment clips its own output where the clip follows it, so a
        # compiled step takes RMS(u) from its column sums (see afx.transforms.preconditioner).
        own_clip = bool(clip) and (came or not fira)
        m_block = _momentum_block(group)
        factored_rms = scale_by_factored_rms(
            decay_rate, eps1, beta2=beta2, momentum=beta1 is not None and not came,
            beta1=beta1_default, clip_threshold=group["d"] if own_clip else None,
            momentum_block=m_block)
        factored_route = route(
            factored_rms, came_confidence(beta1, group["beta3"], group["eps_came"], eps1,
                                          momentum_block=m_block)
            if came else None, clipped=own_clip)
        routes = {
            "factored": factored_route,
            "elementwise": route(elementwise, ema(beta1) if beta1 is not None and momentum_only
                                 else None),
        }
    if group["apollo_rank"] > 0:
        routes["apollo"] = apollo_route()
    apollo = group["apollo_rank"] > 0
    factored = group["factored"] and not sgd
    return partition(routes, lambda name, p: "sgd" if sgd else
                     "apollo" if apollo and p.ndim >= 2 else
                     "factored" if factored and p.ndim >= 2 else "elementwise")


def _square_root_of(name: str, default: float) -> StepSize:
    """``√hyper[name]`` as a step size."""
    return StepSize(lambda p, h: hyper_value(h, name, default) ** 0.5,
                    hyperparams(**{name: NON_NEGATIVE._replace(default=default)}))


def _momentum_block(group: Mapping[str, Any]) -> int | None:
    """The block length the group's momentum is encoded in, or None if it stays fp32."""
    quantized = group["quantize"] and group["m_quant_type"] != "fp32"
    return group["m_block_size"] if quantized else None


def _quantized(tx: GradientTransformation, group: Mapping[str, Any], *,
               apollo: bool = False) -> GradientTransformation:
    if not group["quantize"]:
        return tx
    fields: dict[str, tuple[Any, int]] = {}
    if group["v_quant_type"] != "fp32":
        for name in ("v_row", "v_col", "v"):
            fields[name] = (group["v_quant_type"], group["block_size"])
        if apollo:
            # The package floors the codes of APOLLO's low-rank V at apollo_eps² (values
            # below it are dominated by apollo_eps anyway).
            fields["v"] = (get_codec(group["v_quant_type"], floor_log2=apollo_v_floor(group)),
                           group["block_size"])
    c_type = group["c_quant_type"] or group["v_quant_type"]
    if c_type != "fp32":
        for name in ("c_row", "c_col", "res"):
            fields[name] = (c_type, group["block_size"])
    if group["m_quant_type"] != "fp32":
        fields["m"] = (group["m_quant_type"], group["m_block_size"])
    return quantize_state(tx, fields, min_numel=group["min_8bit_size"]) if fields else tx


class Adafactor8Bit(Optimizer):
    """adafactor8bit's ``Adafactor8Bit`` (0.4.6 options; 0.2.2 code runs unchanged), compiled.

    Every option of the package's constructor is accepted and can be overridden per param
    group; options are validated for every group, before any state or parameter changes.
    ``use_cuda_kernel``, ``lag_norm`` and ``warmup_multiplier`` are accepted and have no
    effect: afx runs its compiled chain on every device. ``stochastic_round_writeback`` rounds
    bfloat16/float16 parameters with :func:`afx.rounding.stochastic_round` (deterministic
    from the parameter's seed, the step and the element index). ``apollo_rank > 0`` runs the
    group's matrices through :func:`afx.transforms.scale_by_apollo` (projections drawn by a
    counter-based hash, so they match across processes and checkpoints, not the package's).

    Differences from the package (see the README): states are quantized by their own size (a
    short factored vector is never padded to a full block; small parameters keep float32
    states as in the package), weight decay is applied as ``p − wλp`` instead of
    ``p · fl(1 − wλ)``, and the block-size / m_block-size divisibility rule of the package's
    CUDA kernel is not required.

    Args:
        params: parameters or param groups.
        compile: see :class:`afx.optim.Optimizer`.
        skip_nonfinite: skip (and count) the update of a parameter whose gradient has a NaN or
            Inf, leaving its parameter and state untouched (default on; the package's CPU
            path would write NaN into the parameter).
        atomic: undo a step that raises completely, at the cost of a copy of the parameters
            and state during each step; see :class:`afx.optim.Optimizer`.
        **options: adafactor8bit's options (see :data:`DEFAULTS` for names and defaults).

    References:
        Shazeer & Stern, "Adafactor", 2018; Dettmers et al., "8-bit Optimizers via Block-wise
        Quantization", 2022.

    Example:
        >>> import torch, afx
        >>> model = torch.nn.Linear(128, 64)
        >>> opt = afx.Adafactor8Bit(model.parameters(), beta1=0.9, compile=False)
        >>> model(torch.randn(4, 128)).sum().backward()
        >>> opt.step()
        >>> opt.state[model.weight]["factored.second_moment.m.codes"].dtype
        torch.uint8
    """

    option_names = MappingProxyType({"eps1": "eps[0]", "eps2": "eps[1]", "decay_rate":
                                     "beta2_decay", "clip_threshold": "d"})
    # Numbers the chain is built from: state layouts (block sizes, the 8-bit threshold, the
    # APOLLO rank) and the floor of APOLLO's V codes.
    structural_options = ("block_size", "m_block_size", "min_8bit_size", "apollo_rank",
                          "apollo_eps")
    # d = 0 means no update clipping: such a group's chain has no clip at all.
    off_at_zero_options = ("d",)
    precompile = True  # the chain is afx's, built from the static options

    def __init__(self, params: Iterable, *, compile: bool | dict = True,
                 skip_nonfinite: bool = True, atomic: bool = False, **options: Any) -> None:
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise TypeError(f"Adafactor8Bit got unknown options {unknown}")
        # Skipped updates never use a non-finite gradient: APOLLO can read it without the
        # NaN -> 0 copy.
        chain = functools.partial(adafactor8bit, finite_grads=skip_nonfinite)
        super().__init__(params, chain, compile=compile, skip_nonfinite=skip_nonfinite,
                         atomic=atomic, **{**DEFAULTS, **options})

    def stochastic_rounding(self, group: Mapping[str, Any]) -> bool:
        return bool(group["stochastic_round_writeback"])

    def cpu_inductor_options(self, state_keys: tuple[str, ...],
                             numel: int) -> Mapping[str, Any]:
        # APOLLO's 8-bit states are low-rank, so computing them once buys little; Inductor's
        # default realizes fewer nodes, so its long element-wise chain S ⊙ G -> parameter is
        # fused instead of stored whole (147 MiB on GPT-2's embedding), and measured faster.
        if any(key.startswith("apollo.") for key in state_keys):
            return {}
        # A factored bucket with 8-bit momentum stores the new momentum in fp32 for the loop
        # that encodes it and writes the parameter (step_layout). Beyond 32 MiB (glibc's
        # largest heap-served block) that buffer is a fresh mapping every step, and faulting
        # its pages in costs more than computing the momentum again in each loop that reads it
        # (GPT-2's 50257×768 embedding, in-process A/B: about 400 -> 330 ms a step). Smaller
        # ones are reused from the heap and stay faster stored (with the rows layout, 124M
        # one thread, beta1 with all factored-momentum buckets recomputing: about 372 -> 407 ms).
        if numel >= _FRESH_MAPPING_NUMEL and _FACTORED_MOMENTUM in state_keys:
            return RECOMPUTE_MOMENTUM_OPTIONS
        # The AdamW-like route on GPT-2's embedding (in-process A/B runs, one thread): about
        # 1,070 ms and 294 MiB of temporaries with afx's CPU options, 885 ms and 147 MiB with
        # these, same results. On a 768×3072 matrix (heap-served buffers) afx's are faster
        # (33 vs 39 ms).
        if numel >= _FRESH_MAPPING_NUMEL and all(k in state_keys for k in _ELEMENTWISE_MOMENTS):
            return ELEMENTWISE_MOMENTS_OPTIONS
        return super().cpu_inductor_options(state_keys, numel)

    def step_layout(self, group: Mapping[str, Any], state_keys: tuple[str, ...],
                    param: torch.Tensor) -> StepLayout:
        if param.ndim < 2 or not param.is_contiguous():
            return StepLayout()
        # The element-wise (Adam-like) route encodes its moments in blocks of 256 and 2048,
        # which span rows of GPT-2's 768-wide matrices. Flat, every loop over the parameter
        # runs over the same range, so the new momentum is computed in the loop that updates
        # the parameter rather than one of its own (one pass fewer), and a block statistic is
        # one scalar per vector instead of a per-lane gather where Inductor recomputes a
        # moment (AdamW-like preset, one thread, in-process A/B: four 3072×768 matrices
        # 46.2 -> 36.8 ms, bitwise equal).
        # A padded last block is fine since afx.optim.inductor_fixes guards the loop split
        # that left the tail of such a flat loop unwritten.
        if state_keys and all(key.startswith("elementwise.") for key in state_keys):
            return StepLayout(flat=True)
        # A compiled factored route creates an 8-bit momentum in its codec's blocks
        # (afx.transforms.momentum.lerp_momentum). The parameter's update reads that momentum
        # too, so written in the same blocks it shares the loop that encodes the momentum.
        block = _momentum_block(group)
        if (block is not None and param.shape[-1] % block == 0 and param.ndim == 2
                and any(key in state_keys for key in _FACTORED_MOMENTUM_CODES)):
            return StepLayout(rows=block)
        return StepLayout()

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a checkpoint saved by afx or by adafactor8bit 0.4.6's ``Adafactor8Bit``.

        A package checkpoint's states are decoded with the package's block layout and
        re-encoded in afx's; its group options replace the current ones (as torch does).
        APOLLO: a cached package projection (``apollo_cache_proj=True``) is used until afx's
        next refresh, which then draws afx's own (the two random streams differ).
        """
        if is_package_state_dict(state_dict):
            state_dict = from_package(self, state_dict)
        super().load_state_dict(state_dict)

    def hyper_values(self, group: Mapping[str, Any]) -> Mapping[str, Any]:
        eps1, eps2 = group["eps"]
        return {**group, "eps1": 1e-30 if eps1 is None else eps1, "eps2": eps2,
                "decay_rate": group["beta2_decay"], "clip_threshold": group["d"]}
