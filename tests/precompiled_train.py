"""A compiled afx.Adafactor on one weight, for the precompiled-cache tests: importable, and
runnable as a script in a fresh process (prints the graphs Dynamo traced and the weight)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import torch
from torch._dynamo.utils import counters

import afx

SHAPE = (8, 6)


def fresh_weight(make: Callable[[], torch.Tensor] | None = None) -> torch.nn.Parameter:
    """The weight every run starts from (or ``make()``'s)."""
    make = make or (lambda: torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)))
    return torch.nn.Parameter(make())


def train(weight: torch.nn.Parameter, compile: bool = True) -> afx.Adafactor:
    """Three steps on seeded gradients; returns the optimizer."""
    opt = afx.Adafactor([weight], lr=1e-2, relative_step=False, compile=compile)
    for step in range(3):
        weight.grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(step))
        opt.step()
    return opt


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]))
    weight = fresh_weight()
    train(weight)
    print(json.dumps({"graphs": counters["stats"]["unique_graphs"],
                      "weight": weight.detach().flatten().tolist()}))
