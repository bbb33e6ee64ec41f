"""came_confidence: what its compiled step keeps in memory."""

from __future__ import annotations

import re

import pytest
import torch
from torch._inductor.utils import fresh_cache, run_and_get_code

import afx
from afx.optim import precompiled

CAME = {"beta1": 0.9, "beta2": 0.999, "beta2_decay": None, "beta3": 0.9999,
        "relative_step": False, "scale_parameter": False, "lr": 1e-4}
_ALLOC = re.compile(r"empty_strided_cpu\(\(([\d, ]*)\),")


def test_compiled_came_keeps_one_parameter_sized_temporary(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The residual (u − m)² feeds a row and a column mean. Inductor's CPU code for the whole
    CAME step (8-bit momentum, factored V and confidence) allocates one parameter-sized
    buffer, the new momentum; the residual is recomputed from it for the column mean instead
    of being stored whole (which cost a second one). 500 rows: not a multiple of the 16-row
    groups the column sums use, like the 50257-row GPT-2 embedding."""
    monkeypatch.setenv(precompiled.ENV, "0")  # a loaded function would show no source
    param = torch.nn.Parameter(torch.randn(500, 384) * 0.02)
    param.grad = torch.randn(500, 384) * 1e-3
    opt = afx.Adafactor8Bit([param], **CAME)
    with fresh_cache():
        _, sources = run_and_get_code(opt.step)
    sizes = [torch.Size(int(d) for d in dims.split(",") if d.strip()).numel()
             for source in sources for dims in _ALLOC.findall(source)]
    assert sum(n >= param.numel() for n in sizes) == 1
