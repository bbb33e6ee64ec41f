"""GPT-2-style parameter shapes: GPT-2 small (124.4M parameters) and a smaller scaling curve.

Shapes follow transformers' ``GPT2LMHeadModel`` (``Conv1D`` weights are stored as
``(in_features, out_features)``; the output head is tied to ``wte`` and so not a separate
parameter). The smaller sizes keep the same twelve kinds of tensors per block and shrink the
vocabulary, context, width and depth, so the mix of large matrices, small matrices and vectors
stays roughly that of the full model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """A GPT-2-like configuration: vocabulary, context length, width and number of blocks."""

    vocab: int
    context: int
    width: int
    layers: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of all parameters, in ``GPT2LMHeadModel.named_parameters()`` order."""
        d = self.width
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("wte.weight", (self.vocab, d)),
            ("wpe.weight", (self.context, d)),
        ]
        for i in range(self.layers):
            block = [
                ("ln_1.weight", (d,)), ("ln_1.bias", (d,)),
                ("attn.c_attn.weight", (d, 3 * d)), ("attn.c_attn.bias", (3 * d,)),
                ("attn.c_proj.weight", (d, d)), ("attn.c_proj.bias", (d,)),
                ("ln_2.weight", (d,)), ("ln_2.bias", (d,)),
                ("mlp.c_fc.weight", (d, 4 * d)), ("mlp.c_fc.bias", (4 * d,)),
                ("mlp.c_proj.weight", (4 * d, d)), ("mlp.c_proj.bias", (d,)),
            ]
            shapes += [(f"h.{i}.{name}", shape) for name, shape in block]
        shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
        return shapes

    def numel(self) -> int:
        """Total number of parameters."""
        return sum(math.prod(shape) for _, shape in self.tensors())


#: Benchmark sizes. ``124M`` is GPT-2 small exactly; the others are picked to land near round
#: parameter counts (tiny ≈ 0.95M, 5M ≈ 4.99M, 30M ≈ 29.99M) with GPT-2's proportions.
SIZES: dict[str, ModelShape] = {
    "tiny": ModelShape(vocab=4096, context=256, width=128, layers=2),
    "5M": ModelShape(vocab=6656, context=512, width=256, layers=4),
    "30M": ModelShape(vocab=20608, context=1024, width=512, layers=6),
    "124M": ModelShape(vocab=50257, context=1024, width=768, layers=12),
}


def make_params(shape: ModelShape, seed: int = 0) -> list:
    """fp32 parameters of ``shape`` with random gradients attached (set once, never changed).

    Imports torch lazily so that this module stays importable by the torch-free driver.
    Values are N(0, 0.02²) like GPT-2's initialisation and gradients N(0, 0.01²): far from
    subnormal numbers, which would slow any CPU kernel down and distort the comparison.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    params = []
    for _, size in shape.tensors():
        p = torch.nn.Parameter(torch.randn(size, generator=gen) * 0.02)
        p.grad = torch.randn(size, generator=gen) * 0.01
        params.append(p)
    return params
