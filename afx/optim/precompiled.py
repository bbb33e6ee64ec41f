"""An on-disk cache of traced and compiled bucket functions, shared by later processes.

Inductor already caches its generated kernels on disk, but a new process still runs Dynamo's
trace of every bucket function, which is most of a warm first step. With torch's
experimental precompile API (``aot_compile`` and ``torch.compiler.load_compiled_function``,
in torch 2.13, which afx is tested with; an older torch without it just compiles as before) a
bucket's function is traced and compiled once and saved whole: bytecode, guards and compiled
graph. A later process with the same key loads it instead of tracing.

The cache key names everything a trace depends on: afx's source, the torch and Python
versions, the optimizer class, the bucket key (static options, state layout, shape, dtypes,
device), the compile options, which optional arguments are given, the thread count, the CPU
capability or GPU model, and Inductor's configuration. Only afx's own optimizer classes use the
cache (a user's chain may read state afx cannot key), and only unsharded parameters compiled
with Inductor. Whatever fails, loading, saving or the precompile itself, falls back to the
ordinary ``torch.compile`` path; a loaded function whose guards reject a call (another stride,
grad mode) hands that call to the ordinary path too, so results never depend on the cache.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
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
    """Whether this torch build has the precompile API the cache needs."""
    return hasattr(torch.compiler, "load_compiled_function")


def cache_dir() -> Path | None:
    """The cache directory: ``$AFX_PRECOMPILED_DIR``, else ``afx/`` in Inductor's cache
    directory (which follows ``TORCHINDUCTOR_CACHE_DIR``); ``None`` when disabled, also by
    Inductor's ``force_disable_caches``."""
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
        return f"{torch.backends.cpu.get_cpu_capability()} threads={torch.get_num_threads()}"
    return device.type


def bucket_key(owner: type, bucket: tuple, compile_options: dict[str, Any],
               device: torch.device) -> str | None:
    """The cache key of one bucket, or ``None`` if the bucket must not be cached.

    Args:
        owner: the optimizer class; only afx's own classes are cached.
        bucket: the adapter's bucket key (static options, state layout, shape, dtypes, device,
            sharding).
        compile_options: the ``torch.compile`` keyword arguments of the bucket.
        device: the bucket's device.

    Returns:
        A hex digest, or ``None`` when the owner is not an afx class, the parameter is sharded,
        the backend is not Inductor, or a part of the key has no stable text form.

    References:
        PyTorch documentation of ``torch.compile(...).aot_compile`` and
        ``torch.compiler.load_compiled_function`` (experimental precompile API, 2025).

    Example:
        >>> import torch
        >>> from afx.optim.precompiled import bucket_key
        >>> bucket_key(dict, ((), "spec", (), (4,), torch.float32, torch.device("cpu"), None),
        ...            {"fullgraph": True}, torch.device("cpu")) is None  # not an afx class
        True
    """
    if not owner.__module__.startswith("afx.") or bucket[-1] is not None:
        return None
    if compile_options.get("backend", "inductor") != "inductor":
        return None
    from torch._inductor import config as inductor_config

    parts = (FORMAT, torch.__version__, sys.version, _source_digest(),
             f"{owner.__module__}.{owner.__qualname__}", bucket, compile_options,
             _device_tag(device), sorted(inductor_config.save_config_portable().items()))
    text = repr(_stable(parts))
    if " at 0x" in text:  # an object without a stable text form (a lambda, an instance)
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _stable(value: Any) -> Any:
    """``value`` with module-level functions and classes replaced by their qualified names."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_stable(v) for v in value)
    qualname = getattr(value, "__qualname__", None)
    if callable(value) and isinstance(qualname, str) and "<" not in qualname:
        return f"{value.__module__}.{qualname}"
    return value


class PrecompiledFunction:
    """A bucket function backed by the on-disk cache, with ``torch.compile`` as the fallback.

    Per combination of given optional arguments (stochastic-rounding seed, skip counter), the
    first call loads the saved function or precompiles and saves it; later calls check its
    guards and run it. A call its guards reject runs through an ordinary compiled copy.

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
        if compiled is None:
            compiled = self._loaded[variant] = self._load_or_compile(variant, args)
        if compiled is not False and compiled.guard_check(*args):
            return compiled(*args)
        return self._compiled()(*args)

    def _compiled(self) -> Callable:
        if self._fallback is None:
            self._fallback = torch.compile(self.fn, **self.options)
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
                _log.info("afx precompiled %s: guards reject this call; recompiling", path)
            except Exception as error:  # a stale or partial entry: compile it anew
                _log.info("afx precompiled %s: not loaded (%r); recompiling", path, error)
        try:
            compiled = torch.compile(self.fn, **self.options).aot_compile((args, {}))
        except Exception as error:
            _log.info("afx precompile of %s failed (%r); using torch.compile", self.key, error)
            return False
        compiled.disable_guard_check()
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                compiled.save_compiled_function(str(path))
            except (OSError, RuntimeError, pickle.PicklingError, TypeError) as error:
                _log.info("afx precompiled %s: not saved (%r)", path, error)
        return compiled
