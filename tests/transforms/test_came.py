"""came_confidence: what its compiled step keeps in memory."""

from __future__ import annotations

import torch
from afx_testing import step_buffer_sizes

import afx

CAME = {"beta1": 0.9, "beta2": 0.999, "beta2_decay": None, "beta3": 0.9999,
        "relative_step": False, "scale_parameter": False, "lr": 1e-4}


def test_compiled_came_keeps_one_parameter_sized_temporary() -> None:
    """The residual (u − m)² feeds a row and a column mean. Inductor's CPU code for the whole
    CAME step (8-bit momentum, factored V and confidence) allocates one parameter-sized
    buffer, the new momentum; the residual is recomputed from it for the column mean instead
    of being stored whole (which cost a second one). 500 rows: not a multiple of the 16-row
    groups the column sums use, like the 50257-row GPT-2 embedding."""
    param = torch.nn.Parameter(torch.randn(500, 384) * 0.02)
    param.grad = torch.randn(500, 384) * 1e-3
    sizes = step_buffer_sizes(afx.Adafactor8Bit([param], **CAME))
    assert sum(n >= param.numel() for n in sizes) == 1
