"""The per-bucket update function and its compilation.

One bucket is a set of parameters that share a transformation, a state layout, a shape, dtypes
and a device. Its update function runs the chain on one parameter and writes the new state and
parameter back into the persistent tensors inside the same graph, so Inductor turns the pure
update into in-place kernels and no second copy of the state outlives the step.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from afx.base import GradientTransformation, Hyper
from afx.codecs.packing import read_bytes
from afx.numerics import all_finite, row_blocks
from afx.optim import inductor_fixes, precompiled
from afx.rounding import stochastic_round

Tensor = torch.Tensor


def apply_update(tx: GradientTransformation, param: Tensor, grad: Tensor, state: Any,
                 hyper: Hyper, sr_seed: Tensor | None = None,
                 skipped: Tensor | None = None) -> None:
    """Runs ``tx`` on one parameter and writes the new state and parameter in place.

    The new parameter is formed in float32 and rounded once to the parameter's dtype: to the
    nearest value, or stochastically (seeded by ``sr_seed`` and the step) when ``sr_seed`` is
    given. With a ``skipped`` counter, a gradient containing NaN or Inf leaves the parameter
    and every state tensor (the step count included) as they were and adds one to the counter,
    decided on the device without a host synchronisation.

    ``param`` may come as :func:`~afx.numerics.row_blocks` of the gradient's shape
    (:meth:`afx.optim.Optimizer.step_layout`): ``tx`` then sees it in the gradient's shape,
    and the new parameter is formed and written in the blocks.
    """
    hyper = {name: _scalar(value) for name, value in hyper.items()}
    written = param
    if param.shape != grad.shape:
        param = param.view(grad.shape)
    updates, new_state = tx.update(grad, state, param, hyper)
    if updates.shape != written.shape:
        updates = row_blocks(updates, written.shape[-1])
    new_param = written.float() + updates
    if sr_seed is not None:
        new_param = stochastic_round(new_param, param.dtype, sr_seed, new_state.step)
    if skipped is None:
        for old, new in zip(_leaves(state), _leaves(new_state)):
            old.copy_(new)
        written.copy_(new_param)
        return
    finite = all_finite(grad)  # over the whole parameter: every rank decides alike
    for old, new in zip(_leaves(state), _leaves(new_state)):
        old.copy_(_keep_unless(finite, new, old))
    written.copy_(torch.where(finite, new_param, written))
    skipped.add_((~finite).to(skipped.dtype))


def _scalar(value: Any) -> Any:
    """A one-element hyperparameter tensor viewed as 0-d; anything else as it is."""
    return value.reshape(()) if isinstance(value, Tensor) else value


def _keep_unless(finite: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``finite`` holds, else ``old``, for a state leaf of any dtype."""
    if not new.is_floating_point() and new.element_size() <= 2:
        # Inductor's C++ select between 8/16-bit vectors under a scalar mask runs a scalar
        # loop per vector; selecting their float32 values is exact for codes of up to 16 bits.
        # The old codes are read through read_bytes, i.e. as int64 words where Inductor's
        # uint8 vector load is the slow one (AVX2).
        return torch.where(finite, new.float(), read_bytes(old).float()).to(old.dtype)
    return torch.where(finite, new, old)


def _leaves(tree: Any) -> list[Tensor]:
    # Plain recursion instead of optree: Dynamo's optree support fails on some leafless dict
    # states (e.g. a chain of stateless parts), and a state is only tuples, dicts and tensors.
    if isinstance(tree, Tensor):
        return [tree]
    children = tree.values() if isinstance(tree, dict) else tree
    return [leaf for child in children for leaf in _leaves(child)]


def _private_copy(fn: Callable, tag: str) -> Callable:
    # Dynamo keeps its cache of compiled graphs (and its recompile limit) on the code object. A
    # private code object per bucket gives each bucket its own cache holding exactly one graph,
    # instead of N buckets competing for one cache and scanning each other's guards.
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                              fn.__closure__)


#: Inductor options afx sets on CPU (an optimizer's ``cpu_inductor_options`` may choose others
#: per bucket; the caller's ``compile`` dict overrides both). The C++
#: backend inlines a pointwise node into each of its consumers unless its body has more than 50
#: operations. A decoded 8-bit state with its update (decode, lerp) stays under that, so every
#: loop that reads it (block maximum, encoding, the parameter update) decodes it again. From
#: 20 operations up such nodes are computed once, when read by several loops; results are
#: bitwise equal. In benchmarks/run.py at 124M, beta1 went from 0.545x to 0.278x the package's
#: step time (README, Performance). 12 was faster still for the AdamW-like preset but hit an
#: Inductor code-generation error on CAME's graph.
CPU_INDUCTOR_OPTIONS = {"realize_opcount_threshold": 20}


#: Identity guards on classes and functions: Dynamo sets them on the named-tuple types of a
#: state (and their ``__new__``), whose structure the bucket key already fixes. The precompile
#: API cannot serialize them either.
IDENTITY_GUARDS = frozenset({"CLASS_MATCH", "CLOSURE_MATCH", "FUNCTION_MATCH", "MODULE_MATCH"})


def traced_once_guards(entries: Sequence[Any]) -> list[bool]:
    """Dynamo guard filter of a bucket function: drops the guards on the transformation, on
    module globals and on the identity of classes and functions; keeps those on the tensors,
    the state's structure and the hyperparameters.

    Dynamo re-checks on every call each Python object the trace read: for a chain of
    closures that is about 400 guards, some of them Python lambdas. Measured with
    ``torch.profiler`` ("TorchDynamo Cache Lookup") on the Adafactor8Bit default at 124M
    parameters (148 calls per step): 45 ms per step with all guards, 10 ms with this filter.
    A bucket's transformation cannot change: the adapter builds one per set of structural
    options and keys the bucket by them (and by shape, dtypes, device, sharding and the
    state's structure, named-tuple types included), so those guards could only fail if a
    transformation's own Python state were mutated, which transformations, pure functions of
    their arguments, do not do (afx's keep at most append-only caches keyed by what the
    bucket key already fixes).

    Args:
        entries: Dynamo's ``GuardFilterEntry`` list of one compiled graph.

    Returns:
        One flag per entry: ``True`` to keep the guard.

    References:
        PyTorch documentation of ``torch.compile(options={"guard_filter_fn": ...})`` and
        ``torch.compiler.keep_tensor_guards_unsafe`` (2025).

    Example:
        >>> from types import SimpleNamespace as Entry
        >>> from afx.optim.compiled import traced_once_guards
        >>> traced_once_guards([
        ...     Entry(name="tx.update", is_global=False, guard_type="CLOSURE_MATCH"),
        ...     Entry(name="param", is_global=False, guard_type="TENSOR_MATCH"),
        ...     Entry(name="type(state.inner)", is_global=False, guard_type="CLASS_MATCH"),
        ...     Entry(name="G['torch']", is_global=True, guard_type="MODULE_MATCH")])
        [False, True, False, False]
    """
    return [not (e.is_global or e.guard_type in IDENTITY_GUARDS or e.name == "tx"
                 or e.name.startswith(("tx.", "tx[")))
            for e in entries]


def bucket_function(tag: str, compile: bool | dict, device_type: str = "cpu",
                    cache_key: Callable[[dict[str, Any]], str | None] | None = None, *,
                    cpu_options: Mapping[str, Any] = CPU_INDUCTOR_OPTIONS) -> Callable:
    """The update function of one bucket: compiled (``fullgraph=True, dynamic=False``) or eager.

    Args:
        tag: a name unique to the bucket (becomes part of the compiled function's name).
        compile: ``False`` for eager, ``True`` for the default ``torch.compile`` settings, or a
            dict of extra ``torch.compile`` keyword arguments (``backend``, ``mode``, ``options``).
        device_type: the bucket's device type; on ``"cpu"`` the Inductor backend gets
            ``cpu_options``.
        cache_key: maps the final ``torch.compile`` options to the bucket's key in the on-disk
            cache of precompiled functions (:mod:`afx.optim.precompiled`), or to ``None`` for a
            bucket that is not cached; omitted, nothing is cached.
        cpu_options: Inductor options on CPU (default :data:`CPU_INDUCTOR_OPTIONS`).

    Returns:
        :func:`apply_update` itself, or its compiled copy, traced once: unless the caller
        passes ``mode`` (which ``torch.compile`` does not combine with ``options``), the
        guards are filtered by :func:`traced_once_guards`. The caller's own ``options`` win
        over afx's, key by key. With a cache key (and a torch with the precompile API), the
        compiled copy is loaded from or saved to the cache directory. A CPU bucket compiled
        by Inductor first installs :mod:`afx.optim.inductor_fixes`.

    References:
        Ansel et al., "PyTorch 2: Faster Machine Learning Through Dynamic Python Bytecode
        Transformation and Graph Compilation", 2024.

    Example:
        >>> from afx.optim.compiled import apply_update, bucket_function
        >>> bucket_function("debug", False) is apply_update
        True
    """
    if not compile:
        return apply_update
    options = dict(compile) if isinstance(compile, dict) else {}
    options.setdefault("fullgraph", True)
    options.setdefault("dynamic", False)
    cpu_inductor = device_type == "cpu" and options.get("backend", "inductor") == "inductor"
    if "mode" not in options:
        ours: dict[str, Any] = {"guard_filter_fn": traced_once_guards}
        if cpu_inductor:
            ours.update(cpu_options)
        options["options"] = {**ours, **(options.get("options") or {})}
    if cpu_inductor:
        inductor_fixes.install()
    fn = _private_copy(apply_update, tag)
    key = cache_key(options) if cache_key is not None and precompiled.available() else None
    directory = precompiled.cache_dir() if key is not None else None
    if directory is not None:
        return precompiled.PrecompiledFunction(fn, options, key, directory)
    return torch.compile(fn, **options)
