"""What the distributed tests run in each process, and the single-process runs they compare to."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import afx

STEPS = 5


class Net(torch.nn.Module):
    """Shapes FSDP2 shards unevenly on 2 ranks: a 2-D weight (5/4 rows, big enough to be
    quantized), a 3-D kernel (3/2), a tall 2-D weight (21/20; APOLLO projects its columns), a
    small 2-D weight (2/1), a 1-D bias (4/3), a one-row weight (1/0: rank 1 holds nothing) and
    a weight whose rows (600) are not a whole number of 256-element momentum blocks."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def param(*shape: int, scale: float = 0.1) -> torch.nn.Parameter:
            return torch.nn.Parameter((scale * torch.randn(*shape, generator=g)).to(dtype))

        self.w = param(9, 512)
        self.k = param(5, 8, 128)
        self.tall = param(41, 6)
        self.t = param(3, 16)
        self.b = param(7)
        self.one = param(1, 8)
        self.odd = param(7, 600)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.w.dtype)
        h = torch.tanh(self.w @ x)
        return (h.square().sum() + (self.k * x[:128]).sin().sum()
                + torch.tanh(self.tall @ x[:6]).sum() + (self.t * x[:16]).cos().sum()
                + (self.b * x[:7]).square().sum() + (self.one * x[:8]).sum()
                + torch.tanh(self.odd @ x.repeat(2)[:600]).sum()).float()


class Small(torch.nn.Module):
    """Few parameters, for compiled runs (every bucket compiles on every rank); ``w`` and
    ``w2`` share a bucket."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(0.1 * torch.randn(9, 512, generator=g))
        self.w2 = torch.nn.Parameter(0.1 * torch.randn(9, 512, generator=g))
        self.b = torch.nn.Parameter(0.1 * torch.randn(7, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(self.w @ x).square().sum() + torch.tanh(self.w2 @ x).sum()
                + (self.b * x[:7]).square().sum())


#: optimizer configurations: name -> (class, options)
CONFIGS: dict[str, tuple[type, dict[str, Any]]] = {
    "adafactor": (afx.Adafactor, {}),
    "adafactor_beta1": (afx.Adafactor, {"beta1": 0.9, "weight_decay": 0.01}),
    "8bit": (afx.Adafactor8Bit, {}),
    "8bit_beta1": (afx.Adafactor8Bit, {"beta1": 0.9}),
    "came": (afx.Adafactor8Bit, {"beta1": 0.9, "beta3": 0.9999}),
    "fira": (afx.Adafactor8Bit, {"beta1": 0.9, "enable_fira_for_adafactor": True}),
    "apollo": (afx.Adafactor8Bit, {"apollo_rank": 2, "beta1": 0.9}),
    "apollo_cached": (afx.Adafactor8Bit, {"apollo_rank": 2, "beta1": 0.9,
                                          "apollo_cache_proj": True,
                                          "apollo_update_proj_gap": 2}),
    "apollo_came": (afx.Adafactor8Bit, {"apollo_rank": 2, "beta1": 0.9, "beta3": 0.999,
                                        "apollo_factorize": True,
                                        "apollo_scale_type": "tensor"}),
}
for _name in ("8bit", "8bit_beta1", "came", "fira", "apollo", "apollo_came"):
    _cls, _opts = CONFIGS[_name]
    CONFIGS[_name + "_fp32"] = (_cls, {**_opts, "quantize": False})


def make_optimizer(name: str, params: Any, compile: bool = False) -> torch.optim.Optimizer:
    cls, options = CONFIGS[name]
    return cls(params, compile=compile, **options)


def batch(step: int, rank: int) -> torch.Tensor:
    return torch.randn(512, generator=torch.Generator().manual_seed(1000 * step + rank))


def full(t: Any) -> Any:
    """A state or parameter as one whole plain tensor (DTensors gathered)."""
    from afx.optim.distributed import is_dtensor

    if is_dtensor(t):
        return t.full_tensor()
    return t.detach().clone() if isinstance(t, torch.Tensor) else t


def _stored_as(t: Any) -> str:
    from afx.optim.distributed import is_dtensor

    return (f"DTensor{tuple(t.placements)}{tuple(t.shape)}" if is_dtensor(t)
            else f"Tensor{tuple(t.shape)}")


def snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Whole parameters and optimizer states, keyed by parameter name, and how each state
    tensor is stored."""
    named = [(n, p) for n, p in model.named_parameters() if p in opt.state]
    return {"params": {n: full(p) for n, p in model.named_parameters()},
            "state": {n: {k: full(v) for k, v in opt.state[p].items()} for n, p in named},
            "stored": {n: {k: _stored_as(v) for k, v in opt.state[p].items()}
                       for n, p in named}}


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range, ranks: list[int],
          world_size: int) -> None:
    """Steps on the mean loss of ``ranks``' batches (all of them in one process)."""
    for step in steps:
        opt.zero_grad()
        loss = sum(model(batch(step, r)) for r in ranks) / (world_size if len(ranks) == 1
                                                             else len(ranks))
        loss.backward()
        opt.step()


def single_process(name: str, steps: int = STEPS, world_size: int = 2,
                   model_cls: Callable[[], torch.nn.Module] = Net) -> dict[str, Any]:
    """The reference: the same training in one process, on the mean loss of every rank's data."""
    torch.manual_seed(0)
    model = model_cls()
    opt = make_optimizer(name, model.parameters())
    train(model, opt, range(steps), list(range(world_size)), world_size)
    return snapshot(model, opt)


def fsdp_model(model: torch.nn.Module, world_size: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))


# ------------------------------------------------------------------------- process targets --
def fsdp_runs(rank: int, world_size: int, out: Path, names: list[str], compiled: list[str],
              steps: int = STEPS) -> None:
    """Trains each configuration under FSDP2 and saves the gathered result (rank 0)."""
    results = {}
    for name, is_compiled in [(n, False) for n in names] + [(n, True) for n in compiled]:
        torch.manual_seed(0)
        model = fsdp_model(Small() if is_compiled else Net(), world_size)
        opt = make_optimizer(name, model.parameters(), compile=is_compiled)
        for step in range(steps):
            opt.zero_grad()
            # FSDP2 averages the gradients of the ranks' batches.
            model(batch(step, rank)).backward()
            if is_compiled and step > 0:
                # After the first step every bucket is compiled: nothing may recompile.
                with torch.compiler.set_stance("fail_on_recompile"):
                    opt.step()
            else:
                opt.step()
        results[("compiled:" if is_compiled else "") + name] = snapshot(model, opt)
    if rank == 0:
        torch.save(results, out / "fsdp.pt")
    unsupported_placement(rank, world_size, out)


def ddp_run(rank: int, world_size: int, out: Path, name: str, steps: int = STEPS) -> None:
    """DDP on bfloat16 parameters with stochastic rounding; every rank saves its own state."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(rank)  # anything rank-dependent in the optimizer would now show
    model = Net(torch.bfloat16)
    ddp = DistributedDataParallel(model)
    cls, options = CONFIGS[name]
    opt = cls(model.parameters(), compile=False, stochastic_round_writeback=True, **options)
    for step in range(steps):
        opt.zero_grad()
        ddp(batch(step, rank)).backward()
        opt.step()
    torch.save(snapshot(model, opt), out / f"ddp-{rank}.pt")


def unsupported_placement(rank: int, world_size: int, out: Path) -> None:
    """A Shard(1) parameter: step() must raise naming the placement and change nothing."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    weight = torch.nn.Parameter(distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)]))
    weight.grad = distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)])
    opt = afx.Adafactor8Bit([weight], compile=False)
    try:
        opt.step()
    except ValueError as error:
        message = str(error)
    else:
        message = None
    result = {"message": message, "state": len(opt.state),
              "unchanged": bool((weight.full_tensor() == 1).all())}
    if rank == 0:
        torch.save(result, out / "unsupported.pt")


def dcp_runs(rank: int, world_size: int, out: Path, names: list[str], steps: int, more: int,
             tag: str, load_from: str | None = None) -> None:
    """:func:`dcp_run` for each configuration, tagged ``<name>-<tag>``."""
    for name in names:
        dcp_run(rank, world_size, out, name, steps, more, f"{tag}-{name}",
                None if load_from is None else f"{load_from}-{name}")


def dcp_run(rank: int, world_size: int, out: Path, name: str, steps: int, more: int, tag: str,
            load_from: str | None = None) -> None:
    """Trains ``steps`` steps under FSDP2 (or loads the DCP checkpoint ``out/ckpt-<load_from>``
    instead), saves a DCP checkpoint of model and optimizer to ``out/ckpt-<tag>``, then trains
    ``more`` steps. Gathered snapshots (rank 0): ``loaded-<tag>.pt`` right after loading,
    ``saved-<tag>.pt`` at the save, ``after-<tag>.pt`` at the end."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    torch.manual_seed(0)
    model = fsdp_model(Net(), world_size)
    opt = make_optimizer(name, model.parameters())

    def step_range(start: int, count: int) -> None:
        for step in range(start, start + count):
            opt.zero_grad()
            # Each rank of a world of `world_size` sees its own slice of a 2-rank batch.
            loss = sum(model(batch(step, r)) for r in range(rank, 2, world_size)) / (
                2 // world_size)
            loss.backward()
            opt.step()
        opt.zero_grad()

    if load_from is None:
        step_range(0, steps)
    else:
        # A fresh optimizer. get_optimizer_state_dict creates a missing state by a
        # zero-gradient step with lr 0, which afx.Adafactor's relative step refuses:
        # init_state() creates it without a step.
        if name.startswith("adafactor"):
            opt.init_state()
        state = {"model": get_model_state_dict(model),
                 "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=str(out / f"ckpt-{load_from}"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        loaded = snapshot(model, opt)
        if rank == 0:
            torch.save(loaded, out / f"loaded-{tag}.pt")
    state = {"model": get_model_state_dict(model),
             "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=str(out / f"ckpt-{tag}"))
    saved = snapshot(model, opt)  # gathering is collective: every rank takes part
    if rank == 0:
        torch.save(saved, out / f"saved-{tag}.pt")
    step_range(steps, more)
    result = snapshot(model, opt)
    if rank == 0:
        torch.save(result, out / f"after-{tag}.pt")

