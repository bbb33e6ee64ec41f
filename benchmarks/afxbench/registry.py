"""The optimizers the benchmark knows: afx's and the anchors it is compared with.

Importing this module does not import torch: builders import their libraries when called, in
the worker process, so the driver can list optimizers and check what is installed cheaply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: What a builder returns: the optimizer (for its ``state``) and the call that performs one step
#: (``optimizer.step`` itself, or a ``torch.compile``'d wrapper around it).
Built = tuple["torch.optim.Optimizer", Callable[[], Any]]

#: adafactor8bit 0.4.6 configurations, passed verbatim to both the package and afx.Adafactor8Bit.
A8B_CONFIGS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "default": {},
    "beta1": {"beta1": 0.9},
    "came": {"beta1": 0.9, "beta2": 0.999, "beta2_decay": None, "beta3": 0.9999,
             "relative_step": False, "scale_parameter": False, "lr": 1e-4},
    "adamw": {"factored": False, "beta1": 0.9, "beta2": 0.999, "beta2_decay": None,
              "relative_step": False, "lr": 1e-3, "d": 0, "scale_parameter": False,
              "scale_weight_decay": False, "eps": (1e-8, 1e-3)},
    "apollo": {"apollo_rank": 256},
})


@dataclass(frozen=True)
class OptimizerSpec:
    """One benchmarked optimizer.

    Attributes:
        key: command-line name.
        label: what the report calls it (library and configuration).
        afx: ``True`` for afx's optimizers (rows that get ratios), ``False`` for anchors.
        build: ``build(params) -> (optimizer, step)``, run inside the worker process.
        requires: top-level modules that must be importable; otherwise the row reads
            "not installed" and no process is started.
        counterpart: the anchor an afx optimizer replaces (targets and the summary use it).
        default: part of the default ``--optimizers`` list.
    """

    key: str
    label: str
    afx: bool
    build: Callable[[list], Built]
    requires: tuple[str, ...] = ()
    counterpart: str | None = None
    default: bool = True


def _plain(opt: torch.optim.Optimizer) -> Built:
    return opt, opt.step


def _compiled(opt: torch.optim.Optimizer) -> Built:
    """``opt.step`` under ``torch.compile``, as PyTorch's compiled-optimizer recipe does it."""
    import torch

    # fullgraph=False: torch.optim's steps are allowed to graph-break (Adafactor does), and the
    # benchmark should time what a user following the recipe gets, breaks included.
    @torch.compile(fullgraph=False)
    def step() -> None:
        opt.step()

    return opt, step


def _afx_adafactor(params: list) -> Built:
    import afx

    return _plain(afx.Adafactor(params))


def _afx_a8b(config: str) -> Callable[[list], Built]:
    def build(params: list) -> Built:
        import afx

        return _plain(afx.Adafactor8Bit(params, **A8B_CONFIGS[config]))

    return build


def _package_a8b(config: str) -> Callable[[list], Built]:
    def build(params: list) -> Built:
        import adafactor8bit

        # use_cuda_kernel=False: the package's pure-PyTorch path, the one that runs on CPU.
        return _plain(adafactor8bit.Adafactor8Bit(params, use_cuda_kernel=False,
                                                  **A8B_CONFIGS[config]))

    return build


def _hf_adafactor(params: list) -> Built:
    from transformers.optimization import Adafactor

    return _plain(Adafactor(params))


def _torch_adafactor(foreach: bool | None, compiled: bool) -> Callable[[list], Built]:
    def build(params: list) -> Built:
        import torch

        opt = torch.optim.Adafactor(params, foreach=foreach)
        return _compiled(opt) if compiled else _plain(opt)

    return build


def _torch_adamw(compiled: bool) -> Callable[[list], Built]:
    def build(params: list) -> Built:
        import torch

        if compiled:
            return _compiled(torch.optim.AdamW(params))
        return _plain(torch.optim.AdamW(params, fused=True))

    return build


def _torchao_adamw8bit(params: list) -> Built:
    try:
        from torchao.optim import AdamW8bit
    except ImportError:  # torchao < 0.11 kept it under prototype
        from torchao.prototype.low_bit_optim import AdamW8bit
    return _plain(AdamW8bit(params))


_SPECS = [
    OptimizerSpec("afx-adafactor", "afx.Adafactor (defaults)", True, _afx_adafactor,
                  counterpart="hf-adafactor"),
    OptimizerSpec("afx-a8b-default", "afx.Adafactor8Bit default", True, _afx_a8b("default"),
                  counterpart="a8b-default"),
    OptimizerSpec("afx-a8b-beta1", "afx.Adafactor8Bit beta1=0.9", True, _afx_a8b("beta1"),
                  counterpart="a8b-beta1"),
    OptimizerSpec("afx-a8b-came", "afx.Adafactor8Bit CAME", True, _afx_a8b("came"),
                  counterpart="a8b-came"),
    OptimizerSpec("afx-a8b-adamw", "afx.Adafactor8Bit AdamW", True, _afx_a8b("adamw"),
                  counterpart="a8b-adamw"),
    OptimizerSpec("afx-a8b-apollo", "afx.Adafactor8Bit APOLLO rank 256", True,
                  _afx_a8b("apollo"), counterpart="a8b-apollo"),
    OptimizerSpec("hf-adafactor", "transformers Adafactor", False, _hf_adafactor,
                  requires=("transformers",)),
    OptimizerSpec("torch-adafactor", "torch.optim.Adafactor", False,
                  _torch_adafactor(foreach=False, compiled=False)),
    OptimizerSpec("torch-adafactor-foreach", "torch.optim.Adafactor foreach", False,
                  _torch_adafactor(foreach=True, compiled=False)),
    OptimizerSpec("torch-adafactor-compiled", "torch.optim.Adafactor, compiled step", False,
                  _torch_adafactor(foreach=None, compiled=True)),
    OptimizerSpec("torch-adamw-fused", "torch.optim.AdamW fused", False,
                  _torch_adamw(compiled=False)),
    OptimizerSpec("torch-adamw-compiled", "torch.optim.AdamW, compiled step", False,
                  _torch_adamw(compiled=True), default=False),
    OptimizerSpec("a8b-default", "adafactor8bit 0.4.6 default", False, _package_a8b("default"),
                  requires=("adafactor8bit",)),
    OptimizerSpec("a8b-beta1", "adafactor8bit 0.4.6 beta1=0.9", False, _package_a8b("beta1"),
                  requires=("adafactor8bit",)),
    OptimizerSpec("a8b-came", "adafactor8bit 0.4.6 CAME", False, _package_a8b("came"),
                  requires=("adafactor8bit",)),
    OptimizerSpec("a8b-adamw", "adafactor8bit 0.4.6 AdamW", False, _package_a8b("adamw"),
                  requires=("adafactor8bit",)),
    OptimizerSpec("a8b-apollo", "adafactor8bit 0.4.6 APOLLO rank 256", False,
                  _package_a8b("apollo"), requires=("adafactor8bit",)),
    OptimizerSpec("torchao-adamw8bit", "torchao AdamW8bit", False, _torchao_adamw8bit,
                  requires=("torchao",)),
]

#: All optimizers by key, in report order (afx first, then anchors).
REGISTRY: Mapping[str, OptimizerSpec] = MappingProxyType({s.key: s for s in _SPECS})

#: Names accepted by ``--optimizers`` besides single keys.
GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "default": tuple(s.key for s in _SPECS if s.default),
    "all": tuple(s.key for s in _SPECS),
    "afx": tuple(s.key for s in _SPECS if s.afx),
    "anchors": tuple(s.key for s in _SPECS if not s.afx and s.default),
})
