"""Stochastic rounding of float32 values to bfloat16 / float16, deterministic and compile-friendly.

The random bits come from a counter-based hash of ``(seed, step, element index)``, computed with
plain integer tensor ops: no generator state, so the same inputs give the same bits in eager
mode, in a compiled graph, in another process and on another rank.
"""

from __future__ import annotations

import torch

from afx.counter_rng import MASK32, random_bits
from afx.sharding import element_offset

Tensor = torch.Tensor
def stochastic_round(x: Tensor, dtype: torch.dtype, seed: Tensor, step: Tensor) -> Tensor:
    """Rounds float32 ``x`` to ``dtype`` (bfloat16 or float16), up or down at random, unbiased.

    Each element goes to one of its two neighbours in ``dtype`` with probabilities that make
    the expected result equal ``x``:

    * bfloat16: truncate to the 16 high bits and round away from zero with probability
      ``low16/65536``; never round up into Inf; Inf and NaN pass through.
    * float16: between the neighbours ``lo ≤ x ≤ hi`` pick ``hi`` with probability
      ``(x − lo)/(hi − lo)`` (24 random bits); ``|x| > 65504`` saturates to ±65504; Inf and NaN
      pass through.

    Other dtypes are returned as ``x.to(dtype)``.

    Args:
        x: float32 values.
        dtype: target dtype.
        seed: integer 0-d tensor identifying the tensor being rounded.
        step: 0-d tensor, the step (so each step draws new bits).

    Returns:
        A tensor of ``dtype`` and ``x``'s shape.

    References:
        Gupta et al., "Deep Learning with Limited Numerical Precision", 2015.

    Example:
        >>> import torch
        >>> from afx.rounding import stochastic_round
        >>> x = torch.full((100_000,), 1.0 + 2**-10)     # a quarter of a bf16 step above 1
        >>> y = stochastic_round(x, torch.bfloat16, torch.tensor(1), torch.tensor(1.0))
        >>> sorted(set(y.tolist())), round(y.float().mean().item(), 4)
        ([1.0, 1.0078125], 1.001)
    """
    x = x.float()
    if dtype not in (torch.bfloat16, torch.float16):
        return x.to(dtype)
    # Keyed by the element's index in the whole parameter, so a shard draws what a single
    # process draws for the same elements.
    bits = random_bits(seed, step, x.numel(), x.device, element_offset(x)).view(x.shape)
    return _round_bf16(x, bits) if dtype == torch.bfloat16 else _round_fp16(x, bits)


def _round_bf16(x: Tensor, bits: Tensor) -> Tensor:
    raw = x.view(torch.int32).long() & MASK32
    low = raw & 0xFFFF
    down = raw - low
    up = down + 0x10000
    # Round away from zero (in magnitude bits) unless that would turn a finite value into Inf.
    up_is_inf = ((up >> 16) & 0x7FFF) == 0x7F80
    chosen = torch.where(((bits & 0xFFFF) < low) & ~up_is_inf, up, down)
    as_int32 = torch.where(chosen >= 2**31, chosen - 2**32, chosen).to(torch.int32)
    rounded = as_int32.view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)


def _round_fp16(x: Tensor, bits: Tensor) -> Tensor:
    limit = 65504.0
    clamped = torch.clamp(x, -limit, limit)
    # Work on the float16 bit pattern: Inductor computes float16 arithmetic in float32, so a
    # float16 nextafter (or a float16 round trip) would not move by a float16 step there.
    pattern = clamped.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    near = _fp16_from_pattern(pattern)
    magnitude, sign = pattern & 0x7FFF, pattern & 0x8000
    # The other neighbour is one step away from zero if |x| > |near|, else one step toward it.
    other = _fp16_from_pattern(sign | torch.where(clamped.abs() > near.abs(), magnitude + 1,
                                                   magnitude - 1))
    lo, hi = torch.minimum(near, other), torch.maximum(near, other)
    frac = (clamped - lo) / (hi - lo)
    u = (bits >> 8).float() * 2.0**-24
    rounded = torch.where(clamped == near, near, torch.where(u < frac, hi, lo))
    return torch.where(torch.isfinite(x), rounded, x).to(torch.float16)


def _fp16_from_pattern(pattern: Tensor) -> Tensor:
    """float32 value of float16 bit patterns held in int32 (0..0xFFFF)."""
    signed = torch.where(pattern >= 0x8000, pattern - 0x10000, pattern).to(torch.int16)
    return signed.view(torch.float16).float()
