"""Stochastic rounding of float32 values to bfloat16 / float16, deterministic and compile-friendly.

The random bits come from a counter-based hash of ``(seed, step, element index)``, computed with
plain integer tensor ops: no generator state, so the same inputs give the same bits in eager
mode, in a compiled graph, in another process and on another rank.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: products of 32-bit values stay below 2**63, so int64 math never
# overflows (signed overflow would be undefined behaviour in Inductor's C++).
_M1, _M2, _M3 = 0x7FEB352D, 0x2C1B3C6D, 0x297A2D39


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xorshift-multiply rounds) on int64 tensors holding uint32."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * _M1) & _MASK32
    x = ((x ^ (x >> 15)) * _M2) & _MASK32
    x = ((x ^ (x >> 16)) * _M3) & _MASK32
    return x ^ (x >> 15)


def random_bits(seed: Tensor, step: Tensor, numel: int, device: torch.device) -> Tensor:
    """32 pseudo-random bits per element (int64 tensor of ``numel``), a function of the counters.

    Args:
        seed: integer 0-d tensor (per parameter).
        step: 0-d tensor, the optimizer step (float or integer).
        numel: number of elements.
        device: where to compute.

    Returns:
        An int64 tensor with values in ``[0, 2**32)``.

    Example:
        >>> import torch
        >>> from afx.rounding import random_bits
        >>> a = random_bits(torch.tensor(7), torch.tensor(3.0), 4, torch.device("cpu"))
        >>> torch.equal(a, random_bits(torch.tensor(7), torch.tensor(3.0), 4, torch.device("cpu")))
        True
    """
    key = _mix32(_mix32(seed.long() * _M2 + 0x9E3779B9) ^ (step.long() & _MASK32))
    index = torch.arange(numel, device=device, dtype=torch.int64)
    return _mix32((index & _MASK32) * _M1 + key + (index >> 32))


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
    if dtype == torch.bfloat16:
        return _round_bf16(x, random_bits(seed, step, x.numel(), x.device).view(x.shape))
    if dtype == torch.float16:
        return _round_fp16(x, random_bits(seed, step, x.numel(), x.device).view(x.shape))
    return x.to(dtype)


def _round_bf16(x: Tensor, bits: Tensor) -> Tensor:
    raw = x.view(torch.int32).long() & _MASK32
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
