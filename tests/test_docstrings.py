"""Every public function and class of afx documents itself in Google style.

Required sections: ``Args:`` when the object takes parameters (NamedTuple and dataclass records
may describe their fields under ``Attributes:`` instead), ``Returns:`` for functions
(``Yields:`` for context managers), a ``>>>`` example (run by ``--doctest-modules``) and
``References:``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

# Modules with an ``__all__`` are walked through it, the others through their public names.
MODULES = (
    "afx",
    "afx.transforms",
    "afx.codecs",
    "afx.optim",
    "afx.counter_rng",
    "afx.matmul",
    "afx.rounding",
    "afx.tree",
    "afx.numerics",
    "afx.sharding",
    "afx.optim.distributed",
    "afx.apply",
    "afx.base",
    "afx.combine",
    "afx.optim.presets",
    "afx.optim.package_checkpoint",
    "afx.optim.inductor_fixes",
)


def public_objects() -> dict[str, object]:
    """``{qualified name: object}`` for every public function and class defined in afx."""
    found: dict[int, tuple[str, object]] = {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None)
        if names is None:
            names = [n for n in vars(module) if not n.startswith("_")]
        for name in names:
            if name.startswith("_"):
                continue
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            # Re-exports (afx.chain is afx.combine.chain) are checked once; imported
            # third-party names (torch.Tensor, MappingProxyType) are not afx's to document.
            if not getattr(obj, "__module__", "").startswith("afx") or id(obj) in found:
                continue
            found[id(obj)] = (f"{obj.__module__}.{obj.__qualname__}", obj)
    return dict(sorted(found.values(), key=lambda item: item[0]))


def _parameters(obj: object) -> list[str]:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    return [p for p in signature.parameters if p != "self"]


def _is_record(obj: object) -> bool:
    namedtuple = inspect.isclass(obj) and issubclass(obj, tuple) and hasattr(obj, "_fields")
    return namedtuple or (inspect.isclass(obj) and dataclasses.is_dataclass(obj))


def missing_sections(obj: object) -> list[str]:
    """The required docstring sections ``obj`` lacks (empty when it is fully documented)."""
    doc = inspect.getdoc(obj) or ""
    missing = []
    if _parameters(obj) and "Args:" not in doc:
        if not (_is_record(obj) and "Attributes:" in doc):
            missing.append("Args")
    if inspect.isfunction(obj) and "Returns:" not in doc and "Yields:" not in doc:
        missing.append("Returns")
    if ">>>" not in doc:
        missing.append("Example")
    if "References:" not in doc:
        missing.append("References")
    return missing


PUBLIC = public_objects()


def test_walk_finds_the_public_api():
    """The walk reaches the entry points of every listed module, so an empty or broken walk
    cannot pass the per-object test vacuously."""
    expected = {"afx.combine.chain", "afx.base.GradientTransformation",
                "afx.transforms.step_size.scale_by_learning_rate", "afx.codecs.get_codec",
                "afx.optim.optimizer.Optimizer", "afx.counter_rng.random_bits",
                "afx.rounding.stochastic_round", "afx.tree.path_names", "afx.numerics.rms",
                "afx.apply.apply_updates", "afx.optim.presets.build_param_groups",
                "afx.optim.package_checkpoint.from_package"}
    assert expected <= set(PUBLIC), sorted(expected - set(PUBLIC))
    assert not any(name.split(".")[-1].startswith("_") for name in PUBLIC)


def test_checker_flags_each_missing_section():
    """missing_sections reports every absent section, and accepts ``Attributes:`` only for
    records."""

    def bare(x):
        """Does something."""

    class Record:
        """A plain class.

        Attributes:
            x: a field.
        """

        def __init__(self, x):
            self.x = x

    assert missing_sections(bare) == ["Args", "Returns", "Example", "References"]
    assert missing_sections(Record) == ["Args", "Example", "References"]

    def documented(x):
        """Returns x.

        Args:
            x: anything.

        Returns:
            ``x``.

        References:
            None.

        Example:
            >>> 1
            1
        """

    assert missing_sections(documented) == []


@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_docstring_has_required_sections(name: str):
    """The public object ``name`` has Args, Returns, an example and References."""
    missing = missing_sections(PUBLIC[name])
    assert not missing, f"{name}: docstring lacks {', '.join(missing)}"
