"""Compiled afx optimizers on small parameters, for the precompiled-cache tests: importable,
and runnable as a script in a fresh process (prints the graphs Dynamo traced and the final
parameters)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import torch
from torch._dynamo.utils import counters

import afx

SHAPE = (64, 48)
#: Adafactor8Bit with 8-bit momentum and second moment on the weight, float32 on the bias.
A8B = {"beta1": 0.9, "min_8bit_size": 1024, "block_size": 128, "m_block_size": 32}


def fresh_weight(make: Callable[[], torch.Tensor] | None = None) -> torch.nn.Parameter:
    """The weight every run starts from (or ``make()``'s)."""
    make = make or (lambda: torch.randn(SHAPE, generator=torch.Generator().manual_seed(9)))
    return torch.nn.Parameter(make())


def train(weight: torch.nn.Parameter, compile: bool = True) -> afx.Adafactor:
    """afx.Adafactor, three steps on seeded gradients; returns the optimizer."""
    opt = afx.Adafactor([weight], lr=1e-2, relative_step=False, compile=compile)
    for step in range(3):
        weight.grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(step))
        opt.step()
    return opt


def train_8bit(compile: bool = True) -> list[torch.Tensor]:
    """afx.Adafactor8Bit (skip_nonfinite on by default), a weight and a bias, three steps;
    returns the final parameters."""
    params = [fresh_weight(), torch.nn.Parameter(torch.zeros(SHAPE[1]))]
    opt = afx.Adafactor8Bit(params, compile=compile, **A8B)
    for step in range(3):
        g = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach() for p in params]


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]))
    weight = fresh_weight()
    train(weight)
    params = [weight.detach(), *train_8bit()]
    print(json.dumps({"graphs": counters["stats"]["unique_graphs"],
                      "params": [p.flatten().tolist() for p in params]}))
