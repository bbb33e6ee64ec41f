"""``afx.optim.Optimizer``: runs a gradient transformation as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import optree
import torch

from afx import sharding
from afx.base import CountState, GradientTransformation, count_steps
from afx.numerics import row_blocks
from afx.optim import distributed, precompiled
from afx.optim.compiled import CPU_INDUCTOR_OPTIONS, bucket_function
from afx.tree import flatten_state, param_index, param_names

Tensor = torch.Tensor
TxFactory = Callable[[Mapping[str, Any]], GradientTransformation]


class _Plan(NamedTuple):
    """How one parameter is updated: its bucket, state keys and state structure."""

    static: tuple
    bucket: tuple
    keys: tuple[str, ...]          # state[p] keys of the transformation's state, in leaf order
    spec: optree.PyTreeSpec        # structure of the transformation's state
    sharding: sharding.Sharding | None = None     # of a DTensor parameter sharded on dim 0
    storage: tuple[distributed.Storage, ...] = ()  # per key, for a sharded parameter
    mesh: Any = None
    #: what every rank sees alike (see :func:`_grouped`), computed once: ``str(spec)`` costs
    #: about 10 µs, paid for each parameter in every step otherwise
    kind: tuple = ()


class StepLayout(NamedTuple):
    """How a compiled step sees one parameter (:meth:`Optimizer.step_layout`).

    Attributes:
        rows: the parameter is passed as :func:`afx.numerics.row_blocks` of this length (its
            gradient and states keep their shapes), or ``None``.
        flat: the parameter, its gradient and its parameter-shaped float states are passed as
            1-D views.

    References:
        None; a layout choice of the compiled step (see :meth:`Optimizer.step_layout`).

    Example:
        >>> from afx.optim import StepLayout
        >>> StepLayout(), StepLayout(flat=True).flat
        (StepLayout(rows=None, flat=False), True)
    """

    rows: int | None = None
    flat: bool = False


class _Call(NamedTuple):
    """One call of a bucket function in a step: everything but the state tensors themselves."""

    bucket: tuple
    fn: Callable
    tx: GradientTransformation
    param: Tensor
    plan: _Plan
    hyper: dict[str, Tensor]
    seed: Tensor | None
    skipped: Tensor | None
    layout: StepLayout | None = None  # how the bucket function sees the parameter


#: An undo log entry: the parameter it concerns (``None`` for optimizer-wide entries) and the
#: function that reverts one change made to the optimizer's state during a step.
_Undo = tuple[Tensor | None, Callable[[], Any]]


def _twin(t: Tensor | None) -> Tensor | None:
    """A detached copy of ``t`` that a compiled function sees exactly like ``t`` (same class,
    dtype, shape, strides, device and ``requires_grad``), so guards set on it hold for ``t``."""
    if t is None:
        return None
    copy = t.detach().clone()
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(copy, requires_grad=t.requires_grad)
    return copy.requires_grad_(t.requires_grad)


def _grouped(calls: list[_Call]) -> list[_Call]:
    """The calls reordered so that parameters of one kind run back to back, in order of first
    appearance, each kind keeping the parameters' order.

    A bucket function's call costs about as much Python and guard work as a small parameter's
    kernels; interleaved with the big matrices' kernels, which flush the caches, that work runs
    cold. On GPT-2 small's shapes (Adafactor8Bit default, one thread, in-process interleaved
    A/B) the 98 vectors' calls took 12.5 ms a step in parameter order and 8.4 ms grouped, the
    whole step 258.2 and 254.8 ms (medians of 40). Calls are independent, so the order
    changes no result. The kind is what every rank sees alike (static options, state
    structure, global shape, dtype), so ranks of a sharded model issue their bucket
    functions' collectives in the same order.
    """
    first: dict[tuple, int] = {}
    kinds = [first.setdefault(c.plan.kind, len(first)) for c in calls]
    return [call for _, call in sorted(zip(kinds, calls), key=lambda pair: pair[0])]


def _init(tx: GradientTransformation, param: Tensor, name: str | None,
          index: int | None = None) -> CountState:
    """``tx.init(param)`` with the parameter's name and position visible to the transforms."""
    with param_names({id(param): name} if name else {}), param_index(index):
        return tx.init(param)


def _template(tx: GradientTransformation, p: Tensor,
              name: str | None) -> tuple[dict[str, Tensor], optree.PyTreeSpec]:
    """The flat state ``tx`` would create for ``p`` (on the meta device: shapes, no memory)."""
    return flatten_state(_init(tx, torch.empty_like(p, device="meta"), name).inner)


def _layout(tx: GradientTransformation, p: Tensor, name: str | None
            ) -> tuple[dict[str, Tensor], optree.PyTreeSpec, sharding.Sharding | None,
                       tuple[distributed.Storage, ...]]:
    """The state template of ``p`` (its local rows for a sharded DTensor), its sharding and,
    when sharded, how each state tensor is stored (see :mod:`afx.optim.distributed`)."""
    where = distributed.sharding_of(p, f"parameter {name or tuple(p.shape)}")
    if where is None:
        return (*_template(tx, distributed.local(p), name), None, ())
    rows = distributed.local(p)
    with sharding.active(where):
        flat, spec = _template(tx, rows, name)
        grown, _ = _template(tx, rows.new_empty((where.rows + 1, *rows.shape[1:]),
                                                device="meta"), name)
    return flat, spec, where, distributed.storage(flat, grown, where.rows)


def _mirror_dtype(device: torch.device) -> torch.dtype:
    # float64, so that scalar math on hyperparameters keeps Python's precision: in float32,
    # 1 − 0.9999 is 1.00017e-4 (CAME's β₃) and β^t drifts. Only 0-d values are float64;
    # element-wise math stays float32. MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, Tensor)) and not isinstance(value, bool)


def is_off(value: Any) -> bool:
    """Whether an option of :attr:`Optimizer.off_at_zero_options` switches its part off.

    Args:
        value: the option's value in a param group.

    Returns:
        ``True`` for a Python number equal to zero. A tensor is never off: it stays dynamic,
        so deciding never reads it (no device synchronisation).

    Example:
        >>> import torch
        >>> from afx.optim.optimizer import is_off
        >>> is_off(0), is_off(0.0), is_off(1.0), is_off(torch.tensor(0.0)), is_off(False)
        (True, True, False, False, False)
    """
    return _is_number(value) and not isinstance(value, Tensor) and value == 0


def static_config(group: Mapping[str, Any], structural: Iterable[str] = (),
                  off_at_zero: Iterable[str] = ()) -> tuple:
    """The part of a param group that shapes the graph: all but numbers and names.

    A number is dynamic (whether it is ``None`` is static: ``beta1=None`` means no momentum),
    except the options named in ``structural``, which shape the state (block sizes, ranks);
    for those named in ``off_at_zero``, whether they are zero is static.
    """
    structural = frozenset(structural)
    off_at_zero = frozenset(off_at_zero)

    def freeze(value: Any, key: str | None = None) -> Any:
        if _is_number(value) and key not in structural:
            return "<zero>" if key in off_at_zero and is_off(value) else "<number>"
        if isinstance(value, (tuple, list)):
            return tuple(freeze(v) for v in value)
        try:
            hash(value)
        except TypeError:
            return repr(value)
        return value

    return tuple(sorted((k, freeze(v, k)) for k, v in group.items()
                        if k not in ("params", "param_names", "group_name")))


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs a gradient transformation, compiled per bucket.

    Every numeric hyperparameter the transformation declares lives in ``param_groups`` and is
    mirrored each step into a persistent one-element float64 tensor read by the compiled graph
    (transforms see it as 0-d), so LR schedulers (including those that write Python floats or
    cycle ``beta1``) never trigger a recompile. Each bucket's function is traced once: its
    guards cover the tensors, the state's structure and the hyperparameter mirrors, not the
    transformation's Python objects or module globals (see
    :func:`afx.optim.compiled.traced_once_guards`), so a transformation must be a pure function
    of its arguments, as every afx transform is.
    State is created eagerly the first time a parameter has a gradient; parameters sharing a
    transformation, shape, dtypes and device share one compiled function
    (``torch.compile(fullgraph=True, dynamic=False)``), called once per parameter. afx's prepackaged
    optimizers (classes that set :attr:`precompile`; not this class, whose chain is the
    user's) also save each compiled bucket function to an on-disk cache, so a later process
    skips Dynamo's tracing; ``AFX_PRECOMPILED_DIR=0`` turns it off (see
    :mod:`afx.optim.precompiled`).

    ``state[p]`` is a flat ``dict[str, Tensor]``: ``"step"`` plus the transformation's state
    leaves under dotted names (``"rms.v_row"`` for a :func:`afx.named_chain` part ``"rms"``).

    Under FSDP2 (DTensor parameters placed ``Shard(0)`` on a 1-D mesh) each rank updates its
    rows, and statistics that span a tensor are reduced over all ranks in the step (see
    :mod:`afx.sharding`); states that follow the parameter's rows are stored as ``Shard(0)``
    DTensors, the others whole on every rank, so ``torch.distributed.checkpoint`` saves and
    reshards them (see :mod:`afx.optim.distributed`). Other placements raise ``ValueError``.

    Args:
        params: parameters or param-group dicts, as for any ``torch.optim.Optimizer``; pass
            ``model.named_parameters()`` to let name predicates of :func:`afx.partition` see
            module paths.
        tx: a :class:`afx.GradientTransformation` returning updates to *add* to the parameters,
            or a factory ``tx(group) -> GradientTransformation`` called with each param group
            (its non-numeric entries decide the structure, numbers are read at run time).
        compile: ``True`` (default) to compile each bucket, ``False`` to run the same chain
            eagerly, or a dict of ``torch.compile`` options (``backend``, ``mode``, ...). On
            CPU, Inductor also gets :data:`afx.optim.compiled.CPU_INDUCTOR_OPTIONS` unless the
            dict sets ``mode``, another backend, or the same keys in its own ``options``;
            ``{"options": {"guard_filter_fn": None}}`` keeps all of Dynamo's guards.
        skip_nonfinite: skip the update of any parameter whose gradient has a NaN or Inf:
            its parameter and state (step count included) stay as they were, and
            :attr:`skipped_updates` counts it. Decided on the device, without a host sync.
        atomic: make every step all-or-nothing: a step that raises anything (including
            ``KeyboardInterrupt``) leaves parameters, state and :attr:`skipped_updates`
            exactly as they were. Costs, during each step, a copy of every parameter that has
            a gradient and of its state (released when the step ends), and the time to make
            it. Without it (default, no extra memory), a step still changes nothing when it
            fails before its first write (see below), but a failure while parameters are being
            written (out of memory, an interrupt) leaves the parameters already written
            updated; the exception then carries a note saying how many.
        **defaults: param-group defaults; with a transformation (not a factory) they extend
            the defaults it declares.

    Failures a step detects before it writes anything, so that they leave parameters and state
    untouched in either mode: invalid hyperparameters in any group, unsupported gradients,
    errors while creating state, and errors of a bucket's update function the first time it
    runs (tracing and compilation included). The latter are found by running each new bucket
    function once on copies of its first parameter, gradient and state before the step's
    first write: a transient copy of one parameter and its state per new bucket, on the first
    step (and after a new shape, dtype or option appears).

    References:
        Babuschkin et al., "The DeepMind JAX Ecosystem", 2020 (optax): the functional
        transformations it runs; Ansel et al., "PyTorch 2: Faster Machine Learning Through
        Dynamic Python Bytecode Transformation and Graph Compilation", 2024 (``torch.compile``).

    Example:
        >>> import torch, afx
        >>> from afx import transforms as T
        >>> model = torch.nn.Linear(4, 2)
        >>> tx = afx.chain(T.scale_by_factored_rms(), T.clip_by_rms(1.0),
        ...                T.scale_by_learning_rate(1e-2))
        >>> opt = afx.optim.Optimizer(model.parameters(), tx, compile=False)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
        >>> sorted(opt.state[model.weight]), opt.param_groups[0]["lr"]
        (['0.v_col', '0.v_row', 'step'], 0.01)
    """

    #: renames of internal state keys for the checkpoint (used by prepackaged optimizers).
    state_key_names: Mapping[str, str] = MappingProxyType({})
    #: user-facing option names of hyperparameters, for error messages.
    option_names: Mapping[str, str] = MappingProxyType({})
    #: numeric options the transformation is built from (sizes, ranks): a change rebuilds it,
    #: and groups that differ in one get separate transformations.
    structural_options: tuple[str, ...] = ()
    #: numeric options whose value zero switches a part of the transformation off: whether
    #: each is zero is static (a group at zero gets a transformation without that part, and
    #: changing it to or from zero rebuilds it); other values stay dynamic.
    off_at_zero_options: tuple[str, ...] = ()
    #: whether this class's compiled buckets go to afx's on-disk cache
    #: (:mod:`afx.optim.precompiled`). Read from the class itself, never inherited: only a
    #: class whose chain is a function of afx's source and its static options may set it.
    precompile: bool = False

    def __init__(self, params: Iterable, tx: GradientTransformation | TxFactory, *,
                 compile: bool | dict = True, skip_nonfinite: bool = False,
                 atomic: bool = False, **defaults: Any) -> None:
        if isinstance(tx, GradientTransformation):
            transformation = tx
            self._factory: TxFactory = lambda group: transformation
            defaults = {**{k: s.default for k, s in tx.hyperparams.items()}, **defaults}
        elif callable(tx):
            self._factory = tx
        else:
            raise TypeError(f"tx must be a GradientTransformation or a factory, got {tx!r}")
        if not isinstance(atomic, bool):
            raise ValueError(f"Invalid atomic: {atomic!r} (expected True or False)")
        self._compile = compile
        self._skip_nonfinite = skip_nonfinite
        self._atomic = atomic
        self._skipped: dict[torch.device, Tensor] = {}
        self._reset_caches()
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------- set-up --
    def _reset_caches(self) -> None:
        self._txs: dict[tuple, GradientTransformation] = {}
        self._buckets: dict[tuple, Callable] = {}
        self._layouts: dict[tuple, StepLayout] = {}  # per bucket: see step_layout
        self._verified: set[tuple] = set()   # buckets whose function has run successfully
        self._plans: dict[Tensor, _Plan] = {}
        self._mirrors: dict[tuple[int, torch.device], dict[str, Tensor]] = {}
        self._mirrored: dict[tuple[int, torch.device], dict[str, Any]] = {}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_atomic", False)  # pickled before the option existed
        self._reset_caches()

    def __getstate__(self) -> dict:
        # torch.optim keeps only defaults, state and param_groups; afx also needs its chain
        # factory and options. Compiled functions and mirrors are caches, rebuilt on demand.
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in
                      ("_factory", "_compile", "_skip_nonfinite", "_atomic", "_skipped")})
        return state

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            for p in group["params"]:
                if p.is_complex():
                    raise ValueError(f"{type(self).__name__} does not support complex "
                                     f"parameters (got one of dtype {p.dtype})")
            self._validate_group(group)
        except Exception:
            self.param_groups.pop()
            raise

    @property
    def skipped_updates(self) -> Tensor:
        """Parameter updates skipped for a non-finite gradient so far (an int64 tensor; reading
        its value synchronises with the device)."""
        counts = list(self._skipped.values())
        if not counts:
            return torch.zeros((), dtype=torch.int64)
        return counts[0] if len(counts) == 1 else sum(c.cpu() for c in counts)

    def stochastic_rounding(self, group: Mapping[str, Any]) -> bool:
        """Whether the group writes bfloat16/float16 parameters with stochastic rounding.

        Reads the group's ``stochastic_rounding`` entry (default ``False``); prepackaged
        optimizers map their own option name.
        """
        return bool(group.get("stochastic_rounding", False))

    def cpu_inductor_options(self, state_keys: tuple[str, ...],
                             numel: int) -> Mapping[str, Any]:
        """Inductor options of the compiled update of a CPU parameter of ``numel`` elements
        (on this process, for a sharded one) whose state has ``state_keys`` (its
        ``self.state[p]`` keys, ``"step"`` aside).

        The default is :data:`afx.optim.compiled.CPU_INDUCTOR_OPTIONS` for every bucket;
        prepackaged optimizers return other options for routes that measured faster with
        them. Options in the ``compile`` dict win over these.
        """
        return CPU_INDUCTOR_OPTIONS

    def step_layout(self, group: Mapping[str, Any], state_keys: tuple[str, ...],
                    param: Tensor) -> StepLayout:
        """How a compiled step sees ``param``: in its own shape, in row blocks, or flat.

        Inductor puts two loops in one only if they run over the same shape, and reads a
        per-block statistic as one scalar per vector only where the blocks are rows of the
        loop. Two layouts help the optimizers built on afx's codecs:

        * ``rows=B``: a state encoded in blocks of ``B`` along the rows is encoded in a loop
          over those blocks. If that loop also reads what the parameter's update reads (a
          momentum, say), the bucket function gets the parameter as
          :func:`afx.numerics.row_blocks` of it and writes it in that loop, one pass over
          memory fewer.
        * ``flat``: for a chain that is element-wise (Adam-like), the parameter, its gradient
          and its parameter-shaped float states come as 1-D views. Every loop over the
          parameter then runs over one range, whatever blocks its states are encoded in, so
          a moment is computed in the loop that updates the parameter rather than stored
          for it, and a block that spans rows (2048 elements of a 768-wide matrix) is a
          slice of the loop, not a per-lane gather of its statistics.

        Asked once per bucket, only when compiling, and never for a sharded parameter. The
        default is the parameter's own shape.

        Args:
            group: the parameter's group.
            state_keys: its ``self.state[p]`` keys, ``"step"`` aside.
            param: the parameter.

        Returns:
            A :class:`StepLayout`: ``rows`` must divide the rows of a contiguous matrix
            ``param``; ``flat`` needs a contiguous ``param``. A flat step whose encoded
            states end in a padded block relies on :mod:`afx.optim.inductor_fixes` (torch
            2.13's Inductor otherwise stops its loop short of the parameter's end).
        """
        return StepLayout()

    def hyper_values(self, group: Mapping[str, Any]) -> Mapping[str, Any]:
        """The group's hyperparameters under the names the transformation reads.

        The default reads them from the group itself; prepackaged optimizers override this to
        map their own option names (e.g. ``eps=(eps1, eps2)``).
        """
        return group

    def _transformation(self, group: Mapping[str, Any]) -> tuple[tuple, GradientTransformation]:
        static = static_config(group, self.structural_options, self.off_at_zero_options)
        tx = self._txs.get(static)
        if tx is None:
            tx = self._txs[static] = count_steps(self._factory(group))
        return static, tx

    def _validate_group(self, group: Mapping[str, Any]) -> None:
        _, tx = self._transformation(group)
        values = self.hyper_values(group)
        for name, spec in tx.hyperparams.items():
            if name not in values:
                raise ValueError(f"param group has no value for hyperparameter {name!r}")
            spec.check(self.option_names.get(name, name), values[name])

    # ------------------------------------------------------------------------------ state --
    def _plan(self, p: Tensor, static: tuple, tx: GradientTransformation,
              name: str | None, undo: list[_Undo]) -> _Plan:
        plan = self._plans.get(p)
        if plan is not None and plan.static == static:
            return plan
        flat, spec, where, storage = _layout(tx, p, name)
        keys = tuple(self.state_key_names.get(k, k) for k in flat)
        layout = tuple((k, tuple(t.shape), t.dtype) for k, t in zip(keys, flat.values()))
        # A sharded parameter's bucket also depends on its rows (and the graph's collectives
        # on its process group): each rank compiles its own.
        structure = str(spec)
        bucket = (static, structure, layout, tuple(p.shape), p.dtype, p.device, where)
        plan = _Plan(static, bucket, keys, spec, where, storage,
                     p.device_mesh if where is not None else None,
                     (static, structure, tuple(p.shape), p.dtype))
        self._init_state(p, tx, plan, name, undo)
        undo.append((p, functools.partial(self._restore_plan, p, self._plans.get(p))))
        self._plans[p] = plan
        return plan

    def _restore_plan(self, p: Tensor, plan: _Plan | None) -> None:
        if plan is None:
            self._plans.pop(p, None)
        else:
            self._plans[p] = plan

    def _state_of(self, p: Tensor, undo: list[_Undo]) -> dict[str, Tensor]:
        """``state[p]``, created (and logged in ``undo``) if the parameter has none yet."""
        if p not in self.state:
            undo.append((p, functools.partial(self.state.pop, p, None)))
        return self.state[p]

    @staticmethod
    def _set_entry(state: dict[str, Tensor], key: str, value: Tensor | None,
                   undo: list[_Undo], p: Tensor) -> None:
        """Sets (or with ``None`` deletes) ``state[key]``, logging how to undo it."""
        old = state.get(key)
        undo.append((p, functools.partial(state.pop, key, None) if old is None else
                     functools.partial(state.__setitem__, key, old)))
        if value is None:
            del state[key]
        else:
            state[key] = value

    def _init_state(self, p: Tensor, tx: GradientTransformation, plan: _Plan,
                    name: str | None, undo: list[_Undo]) -> None:
        """Makes ``state[p]`` hold exactly the plan's entries (missing ones from ``tx.init``)."""
        state = self._state_of(p, undo)
        for stale in [k for k in state if k not in ("step", "sr_seed") and k not in plan.keys]:
            # From a structure the group's static options no longer produce.
            self._set_entry(state, stale, None, undo, p)
        if all(k in state for k in plan.keys) and "step" in state:
            return
        with sharding.active(plan.sharding):
            fresh = _init(tx, distributed.local(p).detach(), name, self._positions().get(p))
        flat, _ = flatten_state(fresh.inner)
        for i, (key, value) in enumerate(zip(plan.keys, flat.values())):
            if key not in state:
                if plan.sharding is not None:
                    value = distributed.wrap(value, plan.storage[i], plan.sharding, plan.mesh)
                self._set_entry(state, key, value, undo, p)
        if "step" not in state:
            self._set_entry(state, "step", fresh.step, undo, p)

    def _hyper(self, index: int, group: Mapping[str, Any], tx: GradientTransformation,
               device: torch.device) -> dict[str, Tensor]:
        """Mirrors the group's hyperparameters into persistent one-element float64 tensors.

        One element, not 0-d: Dynamo turns every 0-d CPU float64 input into a symbolic float
        whose not-NaN guard calls ``.item()`` in Python on every call of a compiled bucket.
        :func:`~afx.optim.compiled.apply_update` views them as 0-d inside the graph.
        """
        key = (index, device)
        mirrors = self._mirrors.setdefault(key, {})
        last = self._mirrored.setdefault(key, {})
        values = self.hyper_values(group)
        for name in tx.hyperparams:
            value = values[name]
            buf = mirrors.get(name)
            if buf is None:
                buf = mirrors[name] = torch.zeros(1, dtype=_mirror_dtype(device), device=device)
                last[name] = None
            if isinstance(value, Tensor):
                buf.copy_(value.detach().reshape(1))
                last[name] = None
            elif last[name] != value:
                buf.fill_(value)
                last[name] = value
        return mirrors

    # ------------------------------------------------------------------------------- step --
    def _check_grads(self) -> list[tuple[int, dict, list[Tensor]]]:
        """Validates every group and gradient; returns each group's parameters with gradients."""
        work = []
        names = self._param_names()
        for index, group in enumerate(self.param_groups):
            self._validate_group(group)
            params = []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if g.is_complex():
                    raise RuntimeError(f"{type(self).__name__} does not support complex gradients")
                if g.shape != p.shape:
                    raise RuntimeError(f"gradient of shape {tuple(g.shape)} for a parameter of "
                                       f"shape {tuple(p.shape)}")
                if distributed.is_dtensor(p):
                    what = f"parameter {names.get(p) or tuple(p.shape)}"
                    distributed.sharding_of(p, what)
                    if not distributed.is_dtensor(g) or tuple(g.placements) != tuple(
                            p.placements):
                        raise ValueError(
                            f"{what} is a DTensor placed {tuple(p.placements)} but its "
                            "gradient is "
                            + (f"placed {tuple(g.placements)}" if distributed.is_dtensor(g)
                               else "a plain tensor")
                            + "; afx needs both placed alike")
                params.append(p)
            work.append((index, group, params))
        return work

    def _positions(self) -> dict[Tensor, int]:
        """Each parameter's 1-based position in ``param_groups``."""
        return {p: i + 1 for i, p in enumerate(
            itertools.chain.from_iterable(g["params"] for g in self.param_groups))}

    def _rounding_seeds(self, work: list[tuple[int, dict, list[Tensor]]],
                        undo: list[_Undo]) -> dict[Tensor, Tensor]:
        """``state[p]["sr_seed"]`` of every low-precision parameter that rounds stochastically.

        A new seed is the parameter's 1-based position in ``param_groups``: the same on every
        rank and in every process, and saved with the state so a resumed run draws the same
        bits.
        """
        position = self._positions()
        seeds = {}
        for _, group, params in work:
            if not self.stochastic_rounding(group):
                continue
            for p in params:
                if p.dtype in (torch.bfloat16, torch.float16):
                    state = self._state_of(p, undo)
                    if "sr_seed" not in state:
                        self._set_entry(state, "sr_seed", torch.tensor(
                            position[p], dtype=torch.int64, device=p.device), undo, p)
                    seeds[p] = state["sr_seed"]
        return seeds

    def _param_names(self) -> dict[Tensor, str]:
        names = {}
        for group in self.param_groups:
            for p, name in zip(group["params"], group.get("param_names", ())):
                names[p] = name
        return names

    @torch.no_grad()
    def init_state(self) -> None:
        """Creates the state of every parameter that has none yet, without taking a step.

        The state is what the first step would create (the step count stays 0). Use it to get
        a state dict to load into before training, e.g. for ``torch.distributed.checkpoint``:
        ``get_optimizer_state_dict`` otherwise initialises an empty optimizer by stepping it
        with zero gradients and ``lr = 0``, which ``afx.Adafactor`` refuses when
        ``relative_step`` is on (as transformers' does). Changes nothing if it raises.

        Returns:
            ``None``.

        Example:
            >>> import torch, afx
            >>> model = torch.nn.Linear(4, 2)
            >>> opt = afx.Adafactor(model.parameters(), compile=False)
            >>> opt.init_state()
            >>> sorted(opt.state[model.weight]), int(opt.state[model.weight]["step"])
            (['exp_avg_sq_col', 'exp_avg_sq_row', 'step'], 0)
        """
        undo: list[_Undo] = []
        names = self._param_names()
        try:
            work = []
            for index, group in enumerate(self.param_groups):
                self._validate_group(group)
                static, tx = self._transformation(group)
                params = [p for p in group["params"] if p.requires_grad]
                for p in params:
                    self._plan(p, static, tx, names.get(p), undo)
                work.append((index, group, params))
            self._rounding_seeds(work, undo)
        except BaseException:
            for _, revert in reversed(undo):
                revert()
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it runs
                with gradients enabled.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        undo: list[_Undo] = []
        calls: list[_Call] = []
        snapshot: list[tuple[Tensor, Tensor]] | None = None
        started = 0
        try:
            # Every check, the creation of new state and the first run of every new bucket
            # function happen before the first write.
            calls = self._prepare(undo)
            self._dry_run(calls)
            if self._atomic:
                snapshot = self._snapshot(calls)
            for call in calls:
                started += 1
                with sharding.active(call.plan.sharding):
                    call.fn(*self._arguments(call))
        except BaseException as error:
            self._recover(error, calls, started, undo, snapshot)
            raise
        return loss

    def _prepare(self, undo: list[_Undo]) -> list[_Call]:
        """Validates, creates missing state and mirrors; returns the step's bucket calls."""
        work = self._check_grads()
        names = self._param_names()
        txs = [self._transformation(group) for _, group, _ in work]
        plans = [[self._plan(p, static, tx, names.get(p), undo) for p in params]
                 for (_, _, params), (static, tx) in zip(work, txs)]
        seeds = self._rounding_seeds(work, undo)
        calls = []
        for (index, group, params), (_, tx), group_plans in zip(work, txs, plans):
            mirrors: dict[torch.device, dict[str, Tensor]] = {}
            for p, plan in zip(params, group_plans):
                hyper = mirrors.get(p.device)
                if hyper is None:
                    hyper = mirrors[p.device] = self._hyper(index, group, tx, p.device)
                fn = self._buckets.get(plan.bucket)
                if fn is None:
                    if self._compile and plan.sharding is None:
                        self._layouts[plan.bucket] = self.step_layout(group, plan.keys, p)
                    fn = self._buckets[plan.bucket] = bucket_function(
                        f"bucket{len(self._buckets)}", self._compile, p.device.type,
                        functools.partial(precompiled.bucket_key, type(self), plan.bucket,
                                          device=p.device),
                        cpu_options=self.cpu_inductor_options(
                            plan.keys, distributed.local(p).numel()))
                skipped = None
                if self._skip_nonfinite:
                    skipped = self._skipped.get(p.device)
                    if skipped is None:
                        skipped = self._skipped[p.device] = torch.zeros(
                            (), dtype=torch.int64, device=p.device)
                        undo.append((None, functools.partial(self._skipped.pop, p.device, None)))
                calls.append(_Call(plan.bucket, fn, tx, p, plan, hyper, seeds.get(p), skipped,
                                   self._layouts.get(plan.bucket)))
        return _grouped(calls)

    def _arguments(self, call: _Call, copy: Callable[[Tensor | None], Any] | None = None
                   ) -> tuple:
        """The bucket function's arguments for ``call``, each tensor passed through ``copy``."""
        copy = copy or (lambda t: t)
        state = self.state[call.param]
        if call.plan.sharding is None:
            leaves = [copy(state[k]) for k in call.plan.keys]
        else:
            leaves = [copy(distributed.unwrap(state[k], store))
                      for k, store in zip(call.plan.keys, call.plan.storage)]
        local = distributed.local
        param, grad = local(call.param), local(call.param.grad)
        layout = call.layout
        if layout is not None and layout.flat:
            shape = param.shape
            leaves = [leaf.view(-1) if leaf.is_floating_point() and leaf.shape == shape else leaf
                      for leaf in leaves]
            param, grad = param.view(-1), grad.reshape(-1)
        elif layout is not None and layout.rows is not None:
            param = row_blocks(param, layout.rows)
        return (call.tx, copy(param), copy(grad),
                CountState(copy(state["step"]), call.plan.spec.unflatten(leaves)), call.hyper,
                copy(call.seed), copy(call.skipped))

    def _dry_run(self, calls: list[_Call]) -> None:
        """Runs each bucket function that has not run successfully yet on copies of its first
        parameter's tensors, so that tracing, compilation and first-run errors surface before
        the step writes anything. The copies look the same to the compiler's guards, so the
        real call reuses the compiled graph."""
        for call in calls:
            if call.bucket not in self._verified:
                with sharding.active(call.plan.sharding):
                    call.fn(*self._arguments(call, _twin))
                self._verified.add(call.bucket)

    def _snapshot(self, calls: list[_Call]) -> list[tuple[Tensor, Tensor]]:
        """Copies of every tensor the step's calls write: parameters, state and counters."""
        saved: dict[int, tuple[Tensor, Tensor]] = {}
        for call in calls:
            state = self.state[call.param]
            for t in (call.param, state["step"], *(state[k] for k in call.plan.keys),
                      call.skipped):
                t = None if t is None else distributed.local(t)
                if t is not None and t.data_ptr() not in saved:
                    saved[t.data_ptr()] = (t, t.detach().clone())
        return list(saved.values())

    def _recover(self, error: BaseException, calls: list[_Call], started: int,
                 undo: list[_Undo], snapshot: list[tuple[Tensor, Tensor]] | None) -> None:
        """Puts the optimizer back as it was before a step that raised ``error`` (as far as the
        mode allows: everything with ``atomic``, else everything not yet written)."""
        if snapshot is not None:
            for target, saved in snapshot:
                target.copy_(saved)
        if started == 0 or snapshot is not None:
            for _, revert in reversed(undo):
                revert()
            return
        # Without a snapshot, written parameters keep their new values and matching state;
        # the others (those not reached yet) are put back as they were.
        touched = {call.param for call in calls[:started]}
        for p, revert in reversed(undo):
            if p is not None and p not in touched:
                revert()
        if hasattr(error, "add_note"):
            error.add_note(
                f"{type(self).__name__}.step failed after it had started writing "
                f"{started} of {len(calls)} parameter updates; those keep their new values. "
                "Construct the optimizer with atomic=True to undo a failed step completely.")

    # ------------------------------------------------------------------------- checkpoint --
    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a checkpoint, keeping every state tensor's saved dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's dtype;
        afx states are float32 statistics or integer codes whatever the parameter's dtype, so
        they are restored from the saved tensors (only moved to the parameter's device, never
        cast through a temporary copy). A ``"step"`` saved as a Python number (as
        transformers' Adafactor does) becomes a tensor. As in torch, load pre-hooks may
        replace the state dict and post-hooks see the loaded state. A checkpoint whose state
        does not fit (a wrong shape) is refused before anything changes.
        """
        loaded: dict[str, dict] = {}

        def take_state(opt: torch.optim.Optimizer, sd: dict) -> dict:
            # Registered last, so it sees the state dict the user's pre-hooks returned. Torch
            # then loads only the groups; the state is checked here, before any change.
            loaded["state"] = self._loaded_state(sd)
            return {**sd, "state": {}}

        def put_state(opt: torch.optim.Optimizer) -> None:
            self.state.update(loaded["state"])  # before the user's post-hooks run

        pre = self.register_load_state_dict_pre_hook(take_state)
        post = self.register_load_state_dict_post_hook(put_state, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    def _loaded_state(self, state_dict: dict) -> dict:
        """The state ``state_dict`` gives each parameter: tensors moved to the parameter's
        device and checked against the shapes and dtypes the group's options produce."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"])
                for s, g in zip(saved_groups, self.param_groups)):
            return dict(state_dict["state"])  # torch raises its own error next
        names = self._param_names()
        loaded: dict = {}
        owner = {}
        for saved, group in zip(saved_groups, self.param_groups):
            options = {**saved, "params": group["params"]}  # the group as it will be loaded
            for index, p in zip(saved["params"], group["params"]):
                owner[index] = (p, options)
        for index, value in state_dict["state"].items():
            if index not in owner:
                loaded[index] = value  # state of no parameter: kept as is, as torch does
                continue
            p, options = owner[index]
            state = {}
            for key, item in value.items():
                if isinstance(item, Tensor):
                    state[key] = item.to(device=p.device)
                elif key == "step":
                    state[key] = torch.tensor(float(item), dtype=torch.float32, device=p.device)
                else:
                    state[key] = item
            if isinstance(state.get("step"), Tensor):
                state["step"] = state["step"].to(dtype=torch.float32).reshape(())
            self._check_state(p, options, state, names.get(p))
            loaded[p] = state
        return loaded

    def _check_state(self, p: Tensor, group: Mapping[str, Any], state: dict,
                     name: str | None) -> None:
        """Checks loaded state entries against the template; casts them to its dtypes."""
        if not state:
            return
        _, tx = self._transformation(group)
        flat, _, where, storage = _layout(tx, p, name)
        for i, (key, expected) in enumerate(zip(flat, flat.values())):
            key = self.state_key_names.get(key, key)
            value = state.get(key)
            if value is None:
                continue  # created by _plan at the next step
            if where is not None:
                state[key] = distributed.loaded(value, storage[i], where, p.device_mesh, key,
                                                expected.dtype, distributed.local(p).device)
                continue
            if tuple(value.shape) != tuple(expected.shape):
                raise ValueError(f"checkpoint state {key!r} has shape "
                                 f"{tuple(value.shape)}, expected {tuple(expected.shape)}")
            state[key] = value.to(dtype=expected.dtype)
        for key in ("step", "sr_seed"):
            if distributed.is_dtensor(state.get(key)):
                state[key] = state[key].full_tensor()
