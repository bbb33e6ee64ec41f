"""Reading adafactor8bit 0.4.6 optimizer checkpoints into afx.Adafactor8Bit's state layout.

The package keeps each state as a Python-level record (``row_var_q``, ``row_var_scale``,
``row_var_shape``, ``m_quant_type``, ...) with codes padded to whole blocks; afx keeps flat
dotted tensor entries (``factored.second_moment.v_row.codes``) in its own block layout. Every
state is decoded to float32 with the package's layout and re-encoded with afx's: for blocks the
two layouts share, re-encoding a decoded state reproduces the same codes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from afx.codecs import get_codec
from afx.codecs.linear import AbsmaxEncoded
from afx.codecs.log_space import AdaptiveLogEncoded
from afx.tree import flatten_state

if TYPE_CHECKING:
    from afx.optim.adafactor8bit import Adafactor8Bit

Tensor = torch.Tensor
_ENCODED_PARTS = ("codes", "scale", "min_log", "absmax")

# afx state field -> the package's name for it, outside and inside the APOLLO path.
_NAMES = {"v_row": "row_var", "v_col": "col_var", "v": "variance", "m": "m",
          "c_row": "conf_row", "c_col": "conf_col", "prev_norm": "fira_prev_norm"}
_APOLLO_NAMES = {"v": "v_low", "m": "m_low", "res": "res_low", "c_row": "conf_row_low",
                 "c_col": "conf_col_low", "v_low_row": "row_var_low",
                 "v_low_col": "col_var_low", "prev_norm": "scaled_grad_norm_prev",
                 "proj": "apollo_proj_matrix_T"}


def is_package_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` was saved by adafactor8bit's optimizer (not by afx).

    The package marks itself by its optimizer-wide seed counters or by per-parameter entries
    afx never writes (``is_quantized``, ``v_quant_type``).

    Args:
        state_dict: an optimizer state dict, as ``torch.load`` returns it.

    Returns:
        ``True`` for a package checkpoint, ``False`` for afx's or torch's own.

    References:
        None; adafactor8bit 0.4.6's checkpoint layout.

    Example:
        >>> import torch, afx
        >>> from afx.optim.package_checkpoint import is_package_state_dict
        >>> is_package_state_dict({"state": {0: {"step": 3, "v_quant_type": "al8"}}})
        True
        >>> opt = afx.Adafactor8Bit(torch.nn.Linear(2, 2).parameters(), compile=False)
        >>> is_package_state_dict(opt.state_dict())
        False
    """
    if "_apollo_seed_counter" in state_dict or "_sr_seed_counter" in state_dict:
        return True
    return any(isinstance(s, Mapping) and ("is_quantized" in s or "v_quant_type" in s)
               for s in state_dict.get("state", {}).values())


def _package_value(saved: Mapping[str, Any], name: str, kind: str) -> Tensor | None:
    """The package's state ``name`` as a flat float32 tensor (decoded if stored in codes)."""
    plain = saved.get(name)
    if isinstance(plain, Tensor):
        return plain.float().reshape(-1)
    codes = saved.get(f"{name}_q")
    if not isinstance(codes, Tensor):
        return None
    if kind == "m":
        scale = saved[f"{name}_scale"]
        codec = get_codec(saved.get("m_quant_type", "uf8"))
        encoded = AbsmaxEncoded(codes.reshape(scale.numel(), -1), scale.float())
        numel = codes.numel() * (2 if codec.name.endswith("4") else 1)
    else:
        quant_type = saved.get("c_quant_type" if kind == "c" else "v_quant_type")
        codec = get_codec(quant_type or saved.get("v_quant_type") or "al8")
        scale = saved[f"{name}_scale"]
        encoded = AdaptiveLogEncoded(codes.reshape(scale.numel(), -1), scale.float(),
                                     saved[f"{name}_min_log"].float())
        numel = codes.numel()
    shape = saved.get(f"{name}_shape")
    logical = math.prod(shape) if shape is not None else numel
    return codec.decode(encoded, (numel,))[:logical]


def _kind(field: str) -> str:
    return "m" if field == "m" else "c" if field in ("c_row", "c_col", "res") else "v"


def _codec_for(field: str, group: Mapping[str, Any], apollo: bool):
    if _kind(field) == "m":
        return get_codec(group["m_quant_type"])
    name = group["v_quant_type"] if _kind(field) == "v" else (group["c_quant_type"]
                                                               or group["v_quant_type"])
    if apollo and field == "v":
        return get_codec(name, floor_log2=apollo_v_floor(group))
    return get_codec(name)


def apollo_v_floor(group: Mapping[str, Any]) -> float:
    """log2 of the floor of APOLLO's low-rank second-moment codes.

    The package floors the values it encodes at ``apollo_eps²`` (never below the smallest
    normal float32, 2^-126), so afx decodes and re-encodes them with the same floor.

    Args:
        group: a param group (or options mapping) with an ``apollo_eps`` entry.

    Returns:
        ``log2(max(apollo_eps², 2^-126))``, a float.

    References:
        Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", 2024.

    Example:
        >>> from afx.optim.package_checkpoint import apollo_v_floor
        >>> apollo_v_floor({"apollo_eps": 2.0 ** -10})
        -20.0
        >>> apollo_v_floor({"apollo_eps": 0.0})
        -126.0
    """
    return max(math.log2(max(group["apollo_eps"] ** 2, 2.0 ** -126)), -126.0)


def _convert_param(saved: Mapping[str, Any], fresh: dict[str, Tensor],
                   group: Mapping[str, Any], where: str) -> dict[str, Tensor]:
    """One parameter's state: afx's fresh entries overwritten with the package's values."""
    out = dict(fresh)
    apollo = any(key.startswith("apollo.") for key in fresh)
    fields: dict[str, list[str]] = {}
    for key in fresh:
        parts = key.split(".")
        field = parts[-2] if parts[-1] in _ENCODED_PARTS else parts[-1]
        prefix = ".".join(parts[:-1]) if parts[-1] in _ENCODED_PARTS else key
        fields.setdefault(prefix, []).append(key)
    for prefix, keys in fields.items():
        field = prefix.rsplit(".", 1)[-1]
        name = (_APOLLO_NAMES if apollo and prefix.startswith("apollo.") else _NAMES).get(field)
        if name is None:
            continue
        value = _package_value(saved, name, _kind(field))
        if value is None:
            continue
        if keys == [prefix]:
            target = fresh[prefix]
            if value.numel() != target.numel():
                raise ValueError(f"{where}: the checkpoint's {name!r} has {value.numel()} "
                                 f"values, afx's {prefix!r} needs {target.numel()}")
            out[prefix] = value.reshape(target.shape).to(target.dtype)
            continue
        template = fresh[keys[0]]
        codec = _codec_for(field, group, apollo)
        block = template.shape[-1] * (2 if codec.name.endswith("4") else 1)
        encoded = codec.encode(value, block)
        for part, tensor in zip(encoded._fields, encoded):
            key = f"{prefix}.{part}"
            if key not in fresh or fresh[key].shape != tensor.shape:
                raise ValueError(f"{where}: cannot store the checkpoint's {name!r} as afx's "
                                 f"{prefix!r} (codec {codec.name}, block {block})")
            out[key] = tensor
    if apollo and isinstance(saved.get("last_proj_step"), int) and saved["last_proj_step"] > 0:
        # The package's projection (if cached) is kept until afx's next refresh is due.
        for key in fresh:
            if key.endswith(".draws"):
                out[key] = torch.ones_like(fresh[key])
            elif key.endswith(".last_refresh"):
                out[key] = torch.full_like(fresh[key], float(saved["last_proj_step"]))
    step = saved.get("step", 0)
    out["step"] = torch.tensor(float(step), dtype=torch.float32)
    if "sr_seed" in saved:
        out["sr_seed"] = torch.tensor(int(saved["sr_seed"]), dtype=torch.int64)
    return out


def from_package(opt: Adafactor8Bit, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Converts an adafactor8bit 0.4.6 ``state_dict`` to the one ``opt`` would have saved.

    Args:
        opt: the optimizer about to load it (its parameters give the shapes).
        state_dict: the package's ``Adafactor8Bit.state_dict()``.

    Returns:
        A state dict in afx's layout, for :meth:`afx.Adafactor8Bit.load_state_dict`.

    Raises:
        ValueError: if the groups do not match ``opt``'s, or a state does not fit.

    References:
        Dettmers et al., "8-bit Optimizers via Block-wise Quantization", 2022 (the block
        codes); adafactor8bit 0.4.6's checkpoint layout.

    Example:
        >>> import torch, afx
        >>> from afx.optim.package_checkpoint import from_package
        >>> layer = torch.nn.Linear(3, 2, bias=False)
        >>> opt = afx.Adafactor8Bit(layer.parameters(), compile=False)
        >>> saved = {"state": {0: {"step": 5, "row_var": torch.ones(2),
        ...                        "col_var": torch.ones(3), "is_quantized": False}},
        ...          "param_groups": [{**opt.param_groups[0], "params": [0]}]}
        >>> converted = from_package(opt, saved)
        >>> sorted(converted["state"][0]), converted["state"][0]["step"]
        (['factored.second_moment.v_col', 'factored.second_moment.v_row', 'step'], tensor(5.))
    """
    from afx.optim.adafactor8bit import DEFAULTS
    from afx.optim.optimizer import _init

    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"the checkpoint has {len(saved_groups)} param groups, the optimizer "
                         f"{len(opt.param_groups)}")
    groups = []
    for saved, current in zip(saved_groups, opt.param_groups):
        if len(saved["params"]) != len(current["params"]):
            raise ValueError("a checkpoint param group has a different number of parameters")
        groups.append({**DEFAULTS, **{k: v for k, v in saved.items() if k != "params"}})
    state = {}
    names = opt._param_names()
    for options, saved_group, current in zip(groups, saved_groups, opt.param_groups):
        _, tx = opt._transformation(options)
        for index, p in zip(saved_group["params"], current["params"]):
            saved = state_dict["state"].get(index)
            if not saved:
                continue
            fresh, _ = flatten_state(_init(tx, p.detach(), names.get(p)).inner)
            fresh = {opt.state_key_names.get(k, k): v for k, v in fresh.items()}
            state[index] = _convert_param(saved, fresh, options, f"parameter {index}")
    return {"state": state, "param_groups": [
        {**options, "params": saved["params"]} for options, saved in zip(groups, saved_groups)]}

