"""An on-disk cache of traced and compiled bucket functions, shared by later processes.

Inductor already caches its generated kernels on disk, but a new process still runs Dynamo's
trace of every bucket function, which is most of a warm first step. With torch's
experimental precompile API (``aot_compile`` and ``torch.compiler.load_compiled_function``,
in torch 2.13, which afx is tested with; an older torch without it just compiles as before) a
bucket's function is traced and compiled once and saved whole: bytecode, guards and compiled
graph. A later process with the same key loads it instead of tracing.

The cache key names what a trace of afx's own chains depends on: afx's source, the torch and
Python versions, the optimizer class, the bucket key (static options, state layout, shape,
dtypes, device), the compile options, which optional arguments are given, the thread count,
the machine's architecture and CPU capability or the GPU model, and the settings of
Inductor, Dynamo and AOTAutograd. Only classes that opt in (afx's prepackaged optimizers) are
cached: a chain of the user's may read code and values the key cannot see. Sharded parameters,
other backends and custom Inductor passes are not cached either. Whatever fails, loading,
saving or the precompile itself, falls back to the ordinary ``torch.compile`` path; a loaded
function whose guards reject a call (another stride, grad mode) hands that call to the
ordinary path too. Code patched at run time is not in the key: set ``AFX_PRECOMPILED_DIR=0``
when monkeypatching afx.

The ``afx.optim.precompiled`` logger warns when a bucket cannot be precompiled or saved, and
says at INFO level why an entry was not used. Entries are pickles, loaded like Inductor's own
cache: keep the directory as private as Inductor's.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_log = logging.getLogger(__name__)

#: Bumped when the layout of the cache or the meaning of its key changes.
FORMAT = "afx-precompiled-1"

#: Environment variable naming the cache directory; ``0`` (or an empty value) disables the cache.
ENV = "AFX_PRECOMPILED_DIR"


def available() -> bool:
    """Whether this torch build has the precompile API the cache needs.

    Returns:
        ``True`` if ``torch.compiler.load_compiled_function`` exists.

    References:
        PyTorch documentation of ``torch.compiler.load_compiled_function`` (2025).

    Example:
        >>> from afx.optim.precompiled import available
        >>> isinstance(available(), bool)
        True
    """
    return hasattr(torch.compiler, "load_compiled_function")


def cache_dir() -> Path | None:
    """The cache directory.

    Returns:
        ``$AFX_PRECOMPILED_DIR``, else ``afx/`` in Inductor's cache directory (which follows
        ``TORCHINDUCTOR_CACHE_DIR``); ``None`` when disabled (``AFX_PRECOMPILED_DIR=0``, or
        Inductor's ``force_disable_caches``).

    References:
        PyTorch documentation of Inductor's cache directory (``TORCHINDUCTOR_CACHE_DIR``).

    Example:
        >>> from unittest import mock
        >>> from afx.optim.precompiled import cache_dir
        >>> with mock.patch.dict("os.environ", {"AFX_PRECOMPILED_DIR": "0"}):
        ...     cache_dir() is None
        True
    """
    from torch._inductor import config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    value = os.environ.get(ENV)
    if inductor_config.force_disable_caches or value in ("", "0"):
        return None
    if value is not None:
        return Path(value)
    return Path(inductor_cache_dir()) / "afx"


@functools.cache
def _source_digest() -> str:
    """A digest of every Python file of the afx package: any code change gives new keys."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} {torch.cuda.get_device_capability(device)}"
    if device.type == "cpu":
        return (f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()} "
                f"threads={torch.get_num_threads()}")
    return device.type


#: Inductor's user graph passes: functions its portable configuration leaves out. A bucket
#: compiled while one is set is not cached (a pass's code is not part of the key).
_CUSTOM_PASSES = ("pre_grad_custom_pass", "joint_custom_pre_pass", "joint_custom_post_pass",
                  "post_grad_custom_pre_pass", "post_grad_custom_post_pass",
                  "_pre_fusion_custom_pass", "_post_fusion_custom_pass")

#: Dynamo settings that name this process's directories, not how it traces.
_PATH_SETTINGS = ("base_dir", "debug_dir_root")


def _compiler_settings() -> tuple | None:
    """Inductor's, Dynamo's and AOTAutograd's settings, or ``None`` with a custom pass set."""
    from torch._dynamo import config as dynamo_config
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    if any(getattr(inductor_config, name, None) is not None for name in _CUSTOM_PASSES):
        return None
    dynamo = {k: v for k, v in dynamo_config.save_config_portable().items()
              if k not in _PATH_SETTINGS}
    return (sorted(inductor_config.save_config_portable(ignore_private_configs=False).items()),
            list(inductor_config._fuse_ddp_communication_passes), sorted(dynamo.items()),
            sorted(functorch_config.save_config_portable().items()))


def bucket_key(owner: type, bucket: tuple, compile_options: dict[str, Any],
               device: torch.device) -> str | None:
    """The cache key of one bucket, or ``None`` if the bucket must not be cached.

    Args:
        owner: the optimizer class; cached only if the class itself (not a base) sets
            ``precompile = True``, as afx's prepackaged optimizers do: a subclass, or
            :class:`afx.optim.Optimizer` running a chain of the user's, may build its chain
            from code and values the key cannot see.
        bucket: the adapter's bucket key (static options, state layout, shape, dtypes, device,
            sharding).
        compile_options: the ``torch.compile`` keyword arguments of the bucket.
        device: the bucket's device.

    Returns:
        A hex digest, or ``None`` when the owner does not opt in, the parameter is sharded,
        the backend is not Inductor, a custom Inductor pass is set, or a part of the key has
        no stable text form.

    References:
        PyTorch documentation of ``torch.compile(...).aot_compile`` and
        ``torch.compiler.load_compiled_function`` (experimental precompile API, 2025).

    Example:
        >>> import torch, afx
        >>> from afx.optim.precompiled import bucket_key
        >>> bucket = ((), "spec", (), (4,), torch.float32, torch.device("cpu"), None)
        >>> bucket_key(afx.optim.Optimizer, bucket, {}, torch.device("cpu")) is None
        True
        >>> len(bucket_key(afx.Adafactor, bucket, {}, torch.device("cpu")))
        64
    """
    if not owner.__dict__.get("precompile", False) or bucket[-1] is not None:
        return None
    if compile_options.get("backend", "inductor") != "inductor":
        return None
    try:
        settings = _compiler_settings()
    except (AttributeError, TypeError):  # a torch whose config modules differ: do not cache
        return None
    if settings is None:
        return None
    parts = (FORMAT, torch.__version__, sys.version, _source_digest(),
             f"{owner.__module__}.{owner.__qualname__}", bucket, compile_options,
             _device_tag(device), settings)
    text = repr(_stable(parts))
    if " at 0x" in text:  # an object without a stable text form (a lambda, an instance)
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _stable(value: Any) -> Any:
    """``value`` with module-level functions and classes replaced by their qualified names and
    sets by sorted lists (a set's order changes between processes with string hashing)."""
    if isinstance(value, (set, frozenset)):
        return sorted((_stable(v) for v in value), key=repr)
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_stable(v) for v in value)
    qualname = getattr(value, "__qualname__", None)
    if callable(value) and isinstance(qualname, str) and "<" not in qualname:
        return f"{value.__module__}.{qualname}"
    return value


def _stance() -> tuple[str, bool]:
    """Dynamo's stance (``torch.compiler.set_stance``) and whether it forces a backend."""
    stance = getattr(torch._dynamo.eval_frame, "_stance", None)
    return (getattr(stance, "stance", "default"),
            getattr(stance, "backend", None) is not None)


class PrecompiledFunction:
    """A bucket function backed by the on-disk cache, with ``torch.compile`` as the fallback.

    Per combination of given optional arguments (stochastic-rounding seed, skip counter), the
    first call loads the saved function or precompiles and saves it; later calls check its
    guards and run it. A call its guards reject runs through an ordinary compiled copy, and so
    does every call under a ``torch.compiler.set_stance`` other than the default or with
    Dynamo disabled, so those behave as they do for ``torch.compile`` (``force_eager`` runs
    eagerly, ``fail_on_recompile`` raises rather than compile; a function already loaded
    is not a recompile and still runs).

    Args:
        fn: the bucket's (privately named) update function.
        options: the ``torch.compile`` keyword arguments.
        key: the bucket's cache key (:func:`bucket_key`).
        directory: where entries are stored.

    Returns:
        A callable with ``fn``'s signature.

    References:
        PyTorch documentation of the experimental precompile API (``aot_compile``), 2025.

    Example:
        >>> import torch
        >>> from afx.optim.precompiled import PrecompiledFunction
        >>> f = PrecompiledFunction(torch.add, {}, "0" * 64, None)
        >>> f.key[:4]
        '0000'
    """

    def __init__(self, fn: Callable, options: dict[str, Any], key: str,
                 directory: Path | None) -> None:
        self.fn, self.options, self.key, self.directory = fn, options, key, directory
        self._loaded: dict[tuple[bool, ...], Any] = {}
        self._fallback: Callable | None = None

    def __call__(self, *args: Any) -> Any:
        variant = tuple(a is None for a in args)
        compiled = self._loaded.get(variant)
        stance, forced_backend = _stance()
        disabled = torch._dynamo.config.disable or stance == "force_eager"
        if compiled is None:
            if disabled or stance != "default" or forced_backend:
                return self._compiled()(*args)
            compiled = self._loaded[variant] = self._load_or_compile(variant, args)
        if compiled is not False and not disabled and compiled.guard_check(*args):
            return compiled(*args)
        return self._compiled()(*args)

    def _torch_compile(self) -> Callable:
        # torch.compile pops guard_filter_fn out of the options dict it is given: a copy each
        # time keeps afx's guard filter for every compile of this bucket.
        options = dict(self.options)
        if "options" in options:
            options["options"] = dict(options["options"])
        return torch.compile(self.fn, **options)

    def _compiled(self) -> Callable:
        if self._fallback is None:
            self._fallback = self._torch_compile()
        return self._fallback

    def _path(self, variant: tuple[bool, ...]) -> Path | None:
        if self.directory is None:
            return None
        name = hashlib.sha256(f"{self.key}{variant}".encode()).hexdigest()[:40]
        return self.directory / f"{name}.pt2"

    def _load_or_compile(self, variant: tuple[bool, ...], args: tuple) -> Any:
        """The precompiled function for ``args`` (guard check left to the caller), or
        ``False`` when this torch cannot precompile it."""
        path = self._path(variant)
        if path is not None and path.exists():
            try:
                with path.open("rb") as file:
                    loaded = torch.compiler.load_compiled_function(file)
                loaded.disable_guard_check()  # __call__ checks, once
                if loaded.guard_check(*args):
                    return loaded
                _log.info("%s: its guards reject this call; compiling anew", path)
            except Exception as error:  # a stale or partial entry: compile it anew
                _log.info("%s: not loaded (%r); compiling anew", path, error)
        try:
            compiled = self._torch_compile().aot_compile((args, {}))
        except Exception as error:
            _log.warning("afx could not precompile a bucket (%r); it uses torch.compile, "
                         "traced in every process", error)
            return False
        compiled.disable_guard_check()
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                compiled.save_compiled_function(str(path))
            except Exception as error:  # unwritable directory, unserializable graph
                _log.warning("afx could not save a precompiled bucket to %s (%r)", path, error)
        return compiled
