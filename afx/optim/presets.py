"""Presets and automatic parameter grouping for :class:`afx.Adafactor8Bit`.

:func:`build_param_groups` looks at a model, sorts its trainable parameters into *routes* (norms,
biases and vectors; token embeddings; output heads; other matrices; N-D tensors; APOLLO targets)
and returns ordinary param-group dicts that carry a preset's options. The result is the same,
parameter for parameter and option for option, as adafactor8bit 0.4.6's ``build_param_groups``
(minus its ``policy=`` argument), so code written for the package works unchanged.

A preset fixes only the options that make an algorithm what it is (moments, factoring, clipping,
step-size scaling); the learning rate, the weight decay and the state formats stay the
optimizer constructor's, unless a route overrides them (``<route>_lr``, ``<route>_quantize``, ...).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from torch import nn

from afx.optim.adafactor8bit import M_TYPES, V_TYPES

__all__ = ["GROUPINGS", "PRESETS", "ROUTES", "Preset", "build_param_groups"]


def _options(**values: Any) -> Mapping[str, Any]:
    return MappingProxyType(values)


@dataclass(frozen=True)
class Preset:
    """What a preset sets in the groups :func:`build_param_groups` returns.

    Attributes:
        primary: options of the preset's own route (every route but APOLLO's fallback ones).
        fallback: options of the parameters an APOLLO preset does not project (``None``: the
            same as ``primary``).
        apollo_rank: default APOLLO rank; a preset with a positive rank is APOLLO-capable.
        apollo_targets: default substrings of parameter names that select APOLLO targets.
        apollo_min_dim_multiplier: a target needs ``min(shape) >= rank * multiplier``.
        nd_factored: whether ``nd_factored=True`` (factored N-D route under G2) is allowed.
        grouping: the topology ``grouping="auto"`` stands for (G1 for every built-in preset;
            "auto" differs from explicit G1 only in the default state precision).

    References:
        adafactor8bit 0.4.6's presets, the behaviour reference; Zhu et al., "APOLLO: SGD-like
        Memory, AdamW-level Performance", 2024, for the APOLLO fields.

    Example:
        >>> from afx.optim.presets import PRESETS
        >>> PRESETS["apollo"].apollo_rank, PRESETS["adamw"].primary["beta2"]
        (256, 0.999)
    """

    primary: Mapping[str, Any]
    fallback: Mapping[str, Any] | None = None
    apollo_rank: int = 0
    apollo_targets: tuple[str, ...] = ()
    apollo_min_dim_multiplier: int = 1
    nd_factored: bool = False
    grouping: str = "G1"


# Plain step: the update is scaled by lr alone and weight decay by lr·λ (decoupled).
_PLAIN_STEP = dict(relative_step=False, scale_parameter=False, scale_weight_decay=False)
# Adam-style moments with a fixed beta2 and no CAME confidence.
_ADAM_MOMENTS = dict(beta1=0.9, beta2=0.999, beta2_decay=None, beta3=None)
_APOLLO_DEFAULTS = dict(
    apollo_eps=1e-6, apollo_factorize=False, apollo_update_proj_gap=200,
    apollo_scale_type="channel", apollo_scale=1.0, apollo_scale_front=False,
    apollo_cache_proj=True, enable_fira_for_apollo=True,
)

#: The presets of adafactor8bit 0.4.6 (spec §5.1), by name. Options a preset leaves out (the
#: learning rate, weight decay, state formats; for ``adafactor`` also ``scale_parameter``,
#: ``scale_weight_decay``, ``d`` and ``eps``) come from the optimizer's constructor.
PRESETS: Mapping[str, Preset] = MappingProxyType({
    # SGD mode: no second moment, no clipping.
    "sgd": Preset(_options(beta1=None, beta2=None, beta2_decay=None, beta3=None,
                           factored=False, d=0.0, **_PLAIN_STEP)),
    # Factored Adafactor on a fixed lr with the t^-0.8 second-moment schedule.
    "adafactor": Preset(_options(beta1=None, beta2=None, beta2_decay=-0.8, beta3=None,
                                 factored=True, relative_step=False), nd_factored=True),
    # Exactly decoupled AdamW.
    "adamw": Preset(_options(**_ADAM_MOMENTS, factored=False, d=0.0, eps=(1e-8, 1e-3),
                             **_PLAIN_STEP)),
    # torch's RMSprop without momentum, but with decoupled weight decay.
    "rmsprop": Preset(_options(beta1=None, beta2=0.99, beta2_decay=None, beta3=None,
                               factored=False, d=0.0, eps=(1e-8, 1e-3), **_PLAIN_STEP)),
    # CAME with the official constants, update-RMS clipping at 1.
    "came": Preset(_options(**{**_ADAM_MOMENTS, "beta3": 0.9999}, factored=True, d=1.0,
                            eps_came=1e-16, **_PLAIN_STEP), nd_factored=True),
    # APOLLO on attention/MLP matrices; every other parameter runs AdamW with eps1 = 1e-6.
    "apollo": Preset(
        _options(**_ADAM_MOMENTS, factored=False, d=0.0, eps=(1e-6, 1e-3), **_PLAIN_STEP,
                 **_APOLLO_DEFAULTS),
        fallback=_options(**_ADAM_MOMENTS, factored=False, d=0.0, eps=(1e-6, 1e-3),
                          **_PLAIN_STEP),
        apollo_rank=256, apollo_targets=("attn", "mlp")),
})

#: Accepted ``grouping`` spellings (case-insensitive) and the topology each one means.
GROUPINGS: Mapping[str, str] = MappingProxyType({
    "g0": "G0", "bare": "G0", "g1": "G1", "protected": "G1", "g2": "G2", "topology": "G2",
})

#: Names a returned group can have, and the prefixes ``<route>_<option>`` overrides accept.
ROUTES = ("all", "fallback", "other", "one_d", "embedding", "lm_head", "apollo", "matrix", "nd")

# Overrides that set an algorithm option on every route, including an APOLLO preset's fallback.
_SHARED_KEYS = frozenset({
    "beta1", "beta2", "beta2_decay", "bias_correction", "relative_step", "scale_parameter",
    "scale_weight_decay", "d", "eps", "fira_margin", "lag_norm", "momentum_only_1d",
    "enable_fira_for_adafactor", "stochastic_round_writeback",
})
# Overrides for the preset's primary route only (CAME and APOLLO options never leak into the
# fallback that APOLLO keeps for non-target parameters).
_PRIMARY_KEYS = frozenset({
    "beta3", "eps_came", "apollo_factorize", "apollo_update_proj_gap", "apollo_scale_type",
    "apollo_scale", "apollo_scale_front", "apollo_eps", "apollo_cache_proj",
    "enable_fira_for_apollo",
})
# Per-route options, longest first so that "x_m_block_size" is not read as route "x_m".
_ROUTE_OPTIONS = tuple(sorted((
    "m_quant_type", "v_quant_type", "c_quant_type", "stochastic_round_writeback",
    "min_8bit_size", "m_block_size", "block_size", "quantize", "lr",
), key=len, reverse=True))
_PRECISION_OPTIONS = frozenset({
    "m_quant_type", "v_quant_type", "c_quant_type", "min_8bit_size", "m_block_size", "block_size",
})
_CONSTRUCTOR_ONLY = frozenset({"lr", "weight_decay", "quantize", "maximize"})

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.GroupNorm,
          nn.LocalResponseNorm, nn.RMSNorm)
_PROTECTED = ("one_d", "embedding", "lm_head")
_TIED_TARGET = ("apollo_targets matched only the lm_head name of a weight tied to the token "
                "embedding")


class _Tensor(NamedTuple):
    """One trainable parameter and every (dotted name, owning module, attribute) reaching it."""

    param: nn.Parameter
    names: tuple[str, ...]
    owners: tuple[nn.Module, ...]
    attributes: tuple[str, ...]

    @property
    def token_names(self) -> tuple[str, ...]:
        """Names that mark a token embedding (never a position or time table)."""
        return tuple(name for name, owner in zip(self.names, self.owners)
                     if _not_positional(name)
                     and (isinstance(owner, nn.Embedding) or "embed" in name.lower()
                          or "wte" in name.lower()))

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(name for name in self.names if "lm_head" in name.lower())

    @property
    def role(self) -> str:
        """``one_d``, ``embedding``, ``lm_head``, ``matrix`` or ``nd`` (first rule that holds)."""
        if (self.param.ndim <= 1 or any(isinstance(m, _NORMS) for m in self.owners)
                or any(a.lower() == "bias" for a in self.attributes)):
            return "one_d"
        if self.token_names:  # a tied embedding / lm_head weight counts as the embedding
            return "embedding"
        if self.head_names:
            return "lm_head"
        return "matrix" if self.param.ndim == 2 else "nd"


def _not_positional(name: str) -> bool:
    lowered = name.lower()
    return not any(word in lowered for word in ("position", "pos_embed", "wpe", "time"))


def _collect(model: nn.Module) -> list[_Tensor]:
    """Each trainable parameter once, in first-seen order, with all of its aliases."""
    seen: dict[int, tuple[nn.Parameter, list[tuple[str, nn.Module, str]]]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attribute, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                name = f"{prefix}.{attribute}" if prefix else attribute
                seen.setdefault(id(p), (p, []))[1].append((name, module, attribute))
    # A module that reports parameters only through a custom named_parameters() still counts.
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen[id(p)] = (p, [(name, model, name.rsplit(".", 1)[-1])])
    return [_Tensor(p, *map(tuple, zip(*aliases))) for p, aliases in seen.values()]


def _fail(key: str, value: Any, expected: str) -> None:
    raise ValueError(f"Invalid {key}={value!r}: expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_route_option(route: str, option: str, value: Any) -> None:
    key = f"{route}_{option}"
    if option == "m_quant_type" and value not in M_TYPES:
        _fail(key, value, f"one of {M_TYPES}")
    if option == "v_quant_type" and value not in V_TYPES:
        _fail(key, value, f"one of {V_TYPES}")
    if option == "c_quant_type" and value is not None and value not in V_TYPES:
        _fail(key, value, f"None or one of {V_TYPES}")
    if option == "lr" and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                               and value >= 0):
        _fail(key, value, "a number >= 0")
    if option == "quantize" and not (isinstance(value, bool) or (
            isinstance(value, str) and value.lower() == "auto")):
        _fail(key, value, "True, False or 'auto'")
    if option == "stochastic_round_writeback" and not isinstance(value, bool):
        _fail(key, value, "True or False")
    if option == "block_size" and not (_is_int(value) and value >= 128 and value % 128 == 0):
        _fail(key, value, "an int >= 128 and a multiple of 128")
    if option == "m_block_size" and not (_is_int(value) and value >= 32 and value % 4 == 0):
        _fail(key, value, "an int >= 32 and a multiple of 4")
    if option == "min_8bit_size" and not (_is_int(value) and value >= 0):
        _fail(key, value, "an int >= 0")


def _parse_overrides(overrides: Mapping[str, Any]
                     ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Splits keyword overrides into algorithm options and ``{route: {option: value}}``."""
    algorithm: dict[str, Any] = {}
    routes: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if key in _SHARED_KEYS or key in _PRIMARY_KEYS:
            algorithm[key] = value
            continue
        option = next((o for o in _ROUTE_OPTIONS if key.endswith(f"_{o}")), None)
        if option is not None:
            route = key[:-len(option) - 1]
            if route not in ROUTES:
                raise TypeError(f"build_param_groups() got {key!r}: unknown route {route!r} "
                                f"(routes: {', '.join(ROUTES)})")
            routes.setdefault(route, {})[option] = value
        elif key == "factored":
            raise ValueError(f"build_param_groups() got factored={value!r}: each route decides "
                             "'factored' itself; change it in the returned group instead")
        elif key == "policy":
            raise NotImplementedError("build_param_groups(policy=...) is not implemented in afx "
                                      "yet; edit the returned groups instead")
        elif key in _CONSTRUCTOR_ONLY:
            raise TypeError(f"build_param_groups() got {key}={value!r}: {key} is an optimizer "
                            "option; pass it to afx.Adafactor8Bit"
                            + (f" or per route as <route>_{key}" if key in _ROUTE_OPTIONS
                               else ""))
        else:
            raise TypeError(f"build_param_groups() got an unknown keyword argument {key!r}")
    for route, options in routes.items():
        for option, value in options.items():
            _check_route_option(route, option, value)
    return algorithm, routes


def _full_rank(options: Mapping[str, Any], *, momentum: bool = True) -> dict[str, Any]:
    """G2's element-wise, unclipped, unscaled variant of a route (beta2 kept)."""
    out = {**options, "factored": False, "scale_parameter": False, "d": 0.0, "beta3": None}
    if not momentum:
        out["beta1"] = None
    return out


def _default_quantize(preset: str, topology: str, auto: bool, route: str) -> bool | None:
    """A route's ``quantize`` when the user gives none (``None``: the constructor's)."""
    if route == "one_d" and topology in ("G1", "G2"):
        return False
    if route == "embedding" and topology == "G2":
        return False
    if route in ("embedding", "lm_head") and topology == "G1":
        # Explicit G1 keeps both in float32; "auto" only for the adafactor and rmsprop presets.
        return False if not auto or preset in ("adafactor", "rmsprop") else None
    return None


def _resolve_apollo(spec: Preset, preset: str, rank: int | None, targets: str | Sequence[str],
                    multiplier: str | int, notes: list[str]
                    ) -> tuple[int, tuple[str, ...], bool, int]:
    """(rank, target substrings, whether the targets were given, min-dim multiplier)."""
    auto_targets = isinstance(targets, str) and targets.lower() == "auto"
    auto_multiplier = isinstance(multiplier, str) and multiplier.lower() == "auto"
    if not spec.apollo_rank:
        for name, value, default in (("apollo_rank", rank, rank is None),
                                     ("apollo_targets", targets, auto_targets),
                                     ("apollo_min_dim_multiplier", multiplier, auto_multiplier)):
            if not default:
                raise ValueError(f"{name}={value!r} needs an APOLLO preset ('apollo'); "
                                 f"preset {preset!r} has no APOLLO route")
        return 0, (), False, 1
    if rank is None:
        rank = spec.apollo_rank
    elif not _is_int(rank):
        raise TypeError(f"apollo_rank must be an int >= 0 or None, got {rank!r}")
    if rank < 0:
        raise ValueError(f"Invalid apollo_rank={rank!r}: expected an int >= 0")
    if isinstance(targets, str) and not auto_targets:
        raise TypeError(f"apollo_targets={targets!r}: expected 'auto' or a sequence of name "
                        f"substrings such as ({targets!r},)")
    if targets is None:
        raise TypeError("apollo_targets=None: expected 'auto' or a sequence of name substrings")
    explicit = not auto_targets
    chosen = tuple(spec.apollo_targets) if auto_targets else tuple(targets)
    if any(not isinstance(t, str) or not t for t in chosen):
        raise TypeError(f"apollo_targets={targets!r}: every target must be a non-empty string")
    if auto_multiplier:
        multiplier = spec.apollo_min_dim_multiplier
    elif not (_is_int(multiplier) and multiplier >= 1):
        raise ValueError(f"Invalid apollo_min_dim_multiplier={multiplier!r}: expected 'auto' or "
                         "an int >= 1")
    if rank == 0:
        if explicit and chosen:
            notes.append(f"apollo_rank=0 switches APOLLO off: apollo_targets={targets!r} "
                         "is ignored")
        chosen = ()
    return rank, chosen, explicit, multiplier


def _on_apollo(t: _Tensor, role: str, rank: int, targets: tuple[str, ...], explicit: bool,
               multiplier: int, notes: list[str]) -> bool:
    """Whether a parameter takes the APOLLO route."""
    def named(names: Sequence[str]) -> bool:
        return any(target.lower() in name.lower() for name in names for target in targets)

    if not named(t.names):
        return False
    if explicit and role == "embedding" and t.head_names and not named(t.token_names):
        # Only the lm_head alias of a tied weight was targeted: it stays the embedding.
        if not any(note.startswith(_TIED_TARGET) for note in notes):  # once per call
            notes.append(f"{_TIED_TARGET} ({', '.join(t.names)}); it stays on the 'embedding' "
                         "route. Target one of its embedding names to put it on APOLLO")
        return False
    if not (rank > 0 and t.param.ndim == 2 and min(t.param.shape) >= rank * multiplier):
        return False
    # Protected roles need an explicit target; one_d never goes to APOLLO.
    return role not in _PROTECTED or (explicit and role != "one_d")


def _route(topology: str, role: str, apollo: bool, apollo_preset: bool) -> str:
    if apollo:
        return "apollo"
    if topology == "G0":
        return "fallback" if apollo_preset else "all"
    if topology == "G1":
        return role if role in _PROTECTED else "other"
    return role


def _group(route: str, params: list[nn.Parameter], options: Mapping[str, Any], *,
           apollo_rank: int, no_decay: bool, quantize: bool | None,
           route_options: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    group: dict[str, Any] = {"params": params, "group_name": route, **options,
                             "apollo_rank": apollo_rank}
    if no_decay:
        group["weight_decay"] = 0.0
    explicit_quantize = route_options.get("quantize", "auto")
    if not isinstance(explicit_quantize, str):
        quantize = explicit_quantize
    elif quantize is False and _PRECISION_OPTIONS & set(route_options):
        notes.append(f"route {route!r} keeps float32 states by default, so "
                     f"{', '.join(sorted(_PRECISION_OPTIONS & set(route_options)))} "
                     f"have no effect unless {route}_quantize=True is set too")
    if quantize is not None:
        group["quantize"] = quantize
    group.update((k, v) for k, v in route_options.items() if k != "quantize")
    if group.get("quantize", True):
        m_options = sorted({"m_quant_type", "m_block_size"} & set(route_options))
        if group.get("beta1") is None and m_options:
            notes.append(f"route {route!r} has beta1=None (no momentum state): "
                         f"{', '.join(f'{route}_{o}' for o in m_options)} has no effect")
        if group.get("beta3") is None and "c_quant_type" in route_options:
            notes.append(f"route {route!r} has beta3=None (no CAME confidence state): "
                         f"{route}_c_quant_type has no effect")
    return group


def build_param_groups(
    model: nn.Module,
    preset: str,
    grouping: str = "auto",
    *,
    apollo_rank: int | None = None,
    apollo_targets: str | Sequence[str] = "auto",
    apollo_min_dim_multiplier: str | int = "auto",
    nd_factored: bool | None = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Param groups for :class:`afx.Adafactor8Bit` from a preset and the model's structure.

    Every trainable parameter (shared ones once) gets a role from the first rule that holds:

    * ``one_d``: at most one dimension, owned by a torch normalisation layer, or an attribute
      named ``bias``;
    * ``embedding``: owned by ``nn.Embedding`` or reached by a name containing ``embed`` or
      ``wte``, unless that name mentions ``position``, ``pos_embed``, ``wpe`` or ``time``; a
      weight tied to an ``lm_head`` counts as the embedding;
    * ``lm_head``: reached by a name containing ``lm_head``;
    * ``matrix`` (2-D) or ``nd`` (conv kernels, 3-D tables, ...).

    With the ``apollo`` preset, 2-D parameters whose names contain a target (``attn``/``mlp`` by
    default) and with ``min(shape) >= apollo_rank * apollo_min_dim_multiplier`` take the
    ``apollo`` route (embedding and lm_head only when targeted explicitly, one_d never).

    The grouping decides which roles become separate groups:

    * ``"G0"``/``"bare"``: one group ``all`` (APOLLO: ``apollo`` and ``fallback``);
    * ``"G1"``/``"protected"``: ``one_d``, ``embedding``, ``lm_head`` (weight decay 0, float32
      states), ``apollo``, ``other``;
    * ``"auto"``: G1, but embedding and lm_head states follow the constructor's ``quantize``
      except for the ``adafactor`` and ``rmsprop`` presets;
    * ``"G2"``/``"topology"``: ``one_d`` (weight decay 0, float32), ``embedding`` (element-wise,
      no momentum, no clipping, no parameter scaling, no CAME; weight decay 0, float32),
      ``lm_head`` (the same with momentum; weight decay 0), ``apollo``, ``matrix`` (the preset),
      ``nd`` (like lm_head unless ``nd_factored=True``).

    Only non-empty groups are returned, in that order. Options a group does not set come from
    the optimizer's constructor. The model is not changed.

    Args:
        model: the model whose parameters are grouped (parameters with ``requires_grad=False``
            are left out).
        preset: ``"sgd"``, ``"adafactor"``, ``"adamw"``, ``"rmsprop"``, ``"came"`` or
            ``"apollo"`` (case-insensitive); see :data:`PRESETS`.
        grouping: ``"auto"``, ``"G0"``/``"bare"``, ``"G1"``/``"protected"`` or
            ``"G2"``/``"topology"`` (case-insensitive).
        apollo_rank: APOLLO rank (``apollo`` preset only; default 256, 0 switches APOLLO off).
        apollo_targets: ``"auto"`` or name substrings selecting APOLLO targets (``apollo``
            preset only).
        apollo_min_dim_multiplier: ``"auto"`` (1) or an int >= 1 (``apollo`` preset only).
        nd_factored: G2 only: ``True`` keeps the preset's factored semantics on the ``nd`` route
            (``adafactor`` and ``came`` only).
        **overrides: algorithm options for every route (``beta1``, ``beta2``,
            ``beta2_decay``, ``bias_correction``, ``relative_step``, ``scale_parameter``,
            ``scale_weight_decay``, ``d``, ``eps``, ``fira_margin``, ``lag_norm``,
            ``momentum_only_1d``, ``enable_fira_for_adafactor``,
            ``stochastic_round_writeback``); options for the preset's primary route only
            (``beta3``, ``eps_came`` and the ``apollo_*`` options of the optimizer); and route
            options ``<route>_<option>`` with a route of :data:`ROUTES` and an option among
            ``lr``, ``quantize`` (bool or ``"auto"``), ``m_quant_type``, ``v_quant_type``,
            ``c_quant_type``, ``block_size``, ``m_block_size``, ``min_8bit_size``,
            ``stochastic_round_writeback``.

    Returns:
        A list of param-group dicts (``params``, ``group_name``, the preset's options,
        ``apollo_rank`` and any route settings), ready for :class:`afx.Adafactor8Bit`.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, for an unknown keyword or route
            prefix, and for arguments of the wrong type (``grouping=None``, ``apollo_rank``,
            ``apollo_targets``, ``nd_factored``).
        ValueError: naming the offending value: an unknown preset or grouping, an invalid
            route option value, a ``factored`` override, ``apollo_*`` arguments with a preset
            that has no APOLLO route, a negative ``apollo_rank``, ``nd_factored`` outside G2 or
            with a preset that has no factored semantics.
        NotImplementedError: for ``policy=``.

    Warns:
        UserWarning: when a route option cannot take effect (precision options on a route that
        keeps float32 states, momentum or CAME state formats on a route without that state,
        a route that no group has, ``lm_head_*`` options while the head is tied to the
        embedding), when APOLLO targets match only the lm_head name of a tied weight, and for
        explicit targets with ``apollo_rank=0``.

    References:
        adafactor8bit 0.4.6 ``build_param_groups`` (presets, groupings, routes); Zhu et al.,
        "APOLLO: SGD-like Memory, AdamW-level Performance", 2024; Luo et al., "CAME", 2023.

    Example:
        >>> import torch, afx
        >>> from afx.optim.presets import build_param_groups
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.LayerNorm(8),
        ...                             torch.nn.Linear(8, 8))
        >>> groups = build_param_groups(model, "adamw")
        >>> [(g["group_name"], len(g["params"]), g.get("weight_decay")) for g in groups]
        [('one_d', 3, 0.0), ('embedding', 1, 0.0), ('other', 1, None)]
        >>> opt = afx.Adafactor8Bit(groups, lr=1e-3, weight_decay=0.01, compile=False)
        >>> model(torch.tensor([1, 2])).square().mean().backward()
        >>> opt.step()
    """
    if not isinstance(model, nn.Module):
        raise TypeError("build_param_groups() needs the nn.Module itself (got "
                        f"{type(model).__name__}; pass the model, not model.parameters())")
    name = str(preset).lower()
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    spec = PRESETS[name]
    if grouping is None:
        raise TypeError("grouping=None: use 'auto', 'G0'/'bare', 'G1'/'protected' or "
                        "'G2'/'topology'")
    auto = str(grouping).lower() == "auto"
    topology = spec.grouping if auto else GROUPINGS.get(str(grouping).lower())
    if topology is None:
        raise ValueError(f"Unknown grouping {grouping!r}; use 'auto', 'G0'/'bare', "
                         "'G1'/'protected' or 'G2'/'topology'")
    if nd_factored is not None:
        if not isinstance(nd_factored, bool):
            raise TypeError(f"nd_factored must be True, False or None, got {nd_factored!r}")
        if topology != "G2":
            raise ValueError(f"nd_factored={nd_factored!r} applies only to grouping 'G2' "
                             f"(got grouping={grouping!r})")
        if nd_factored and not spec.nd_factored:
            raise ValueError(f"nd_factored=True needs a factored preset ('adafactor' or 'came'); "
                             f"preset {name!r} is not")
    algorithm, route_options = _parse_overrides(overrides)

    notes: list[str] = []
    rank, targets, explicit, multiplier = _resolve_apollo(
        spec, name, apollo_rank, apollo_targets, apollo_min_dim_multiplier, notes)
    tensors = _collect(model)
    if not tensors:
        _emit(notes)
        return []

    primary = {**spec.primary, **algorithm}
    fallback = {**(spec.fallback or spec.primary),
                **{k: v for k, v in algorithm.items() if k in _SHARED_KEYS}}
    apollo_preset = spec.apollo_rank > 0
    base = fallback if apollo_preset else primary
    tied = [t for t in tensors if t.token_names and t.head_names]
    if "lm_head" in route_options and tied:
        notes.append("lm_head_* options do not reach the lm_head weight tied to the token "
                     f"embedding ({', '.join(tied[0].names)}): a tied weight is on the "
                     "'embedding' route; untied lm_head parameters still get them")

    members: dict[str, list[nn.Parameter]] = {}
    for t in tensors:
        role = t.role
        apollo = apollo_preset and _on_apollo(t, role, rank, targets, explicit, multiplier, notes)
        members.setdefault(_route(topology, role, apollo, apollo_preset), []).append(t.param)

    # (route, options, weight decay forced to 0) in the order groups are returned.
    layout: list[tuple[str, Mapping[str, Any], bool]]
    if topology == "G0":
        layout = [("apollo", primary, False), ("fallback", fallback, False),
                  ("all", primary, False)]
    elif topology == "G1":
        layout = [("one_d", base, True), ("embedding", base, True), ("lm_head", base, True),
                  ("apollo", primary, False), ("other", base, False)]
    else:
        layout = [("one_d", base, True), ("embedding", _full_rank(base, momentum=False), True),
                  ("lm_head", _full_rank(base), True), ("apollo", primary, False),
                  ("matrix", base, False), ("nd", base if nd_factored else _full_rank(base),
                                            False)]
    groups = [
        _group(route, members[route], options, apollo_rank=rank if route == "apollo" else 0,
               no_decay=no_decay, quantize=_default_quantize(name, topology, auto, route),
               route_options=route_options.get(route, {}), notes=notes)
        for route, options, no_decay in layout if members.get(route)
    ]

    placed = [id(p) for g in groups for p in g["params"]]
    if len(placed) != len(tensors) or set(placed) != {id(t.param) for t in tensors}:
        raise RuntimeError("build_param_groups(): a parameter was placed twice or not at all")
    made = {g["group_name"] for g in groups}
    for route in route_options:
        # A tied head already has its own warning above.
        if route not in made and not (route == "lm_head" and tied):
            notes.append(f"route options for {route!r} ("
                         f"{', '.join(f'{route}_{o}' for o in route_options[route])}) match "
                         f"no group: grouping {grouping!r} of preset {name!r} made "
                         f"{', '.join(g['group_name'] for g in groups)}")
    _emit(notes)
    return groups


def _emit(notes: list[str]) -> None:
    for note in notes:
        # stacklevel 3: the warning points at the caller of build_param_groups.
        warnings.warn(note, UserWarning, stacklevel=3)
