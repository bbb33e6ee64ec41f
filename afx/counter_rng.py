"""Counter-based random numbers: pure functions of (seed, counter, element index).

No generator state: the same counters give the same numbers in eager mode, inside a compiled
graph, in another process and on every rank, so optimizers can draw randomness (stochastic
rounding, APOLLO's projections) inside ``torch.compile``'d steps and still resume exactly.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: products of 32-bit values stay below 2**63, so int64 math never
# overflows (signed overflow would be undefined behaviour in Inductor's C++).
_M1, _M2, _M3 = 0x7FEB352D, 0x2C1B3C6D, 0x297A2D39


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xorshift-multiply rounds) on int64 tensors holding uint32."""
    x = x & MASK32
    x = ((x ^ (x >> 16)) * _M1) & MASK32
    x = ((x ^ (x >> 15)) * _M2) & MASK32
    x = ((x ^ (x >> 16)) * _M3) & MASK32
    return x ^ (x >> 15)


def random_bits(seed: Tensor, step: Tensor, numel: int, device: torch.device,
                start: int = 0) -> Tensor:
    """32 pseudo-random bits per element (int64 tensor of ``numel``), a function of the counters.

    Args:
        seed: integer 0-d tensor (per parameter).
        step: 0-d tensor, the optimizer step (float or integer).
        numel: number of elements.
        device: where to compute.
        start: index of the first element (the bits of elements ``start .. start + numel``
            of a longer draw, e.g. one shard of a parameter).

    Returns:
        An int64 tensor with values in ``[0, 2**32)``.

    References:
        Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011: random numbers as
        a keyed hash of a counter, with no generator state.

    Example:
        >>> import torch
        >>> from afx.counter_rng import random_bits
        >>> a = random_bits(torch.tensor(7), torch.tensor(3.0), 4, torch.device("cpu"))
        >>> torch.equal(a, random_bits(torch.tensor(7), torch.tensor(3.0), 4, torch.device("cpu")))
        True
    """
    index = torch.arange(start, start + numel, device=device, dtype=torch.int64)
    return _bits_at(_key(seed, step), index)


def _key(seed: Tensor, step: Tensor) -> Tensor:
    """The hash key of one ``(seed, step)`` pair."""
    return _mix32(_mix32(seed.long() * _M2 + 0x9E3779B9) ^ (step.long() & MASK32))


def _bits_at(key: Tensor, index: Tensor) -> Tensor:
    """The 32 random bits of each element ``index`` (int64) of the draw keyed by ``key``."""
    return _mix32((index & MASK32) * _M1 + key + (index >> 32))


def normal(seed: Tensor, counter: Tensor, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Standard normal float32 samples of ``shape``, a function of ``(seed, counter)``.

    Box–Muller on two 24-bit uniforms per element: ``√(−2 ln u₁) · cos(2π u₂)`` with
    ``u₁ ∈ (0, 1]`` (so the logarithm is finite) and ``u₂ ∈ [0, 1)``.

    Args:
        seed: integer 0-d tensor.
        counter: 0-d tensor (float or integer), e.g. how many draws this seed has made.
        shape: output shape.
        device: where to compute.

    Returns:
        A float32 tensor of ``shape``.

    References:
        Box & Muller, "A Note on the Generation of Random Normal Deviates", 1958.

    Example:
        >>> import torch
        >>> from afx.counter_rng import normal
        >>> z = normal(torch.tensor(3), torch.tensor(1.0), (20000,), torch.device("cpu"))
        >>> round(z.mean().item(), 1), round(z.std().item(), 1)
        (0.0, 1.0)
    """
    # Element i takes bits 2i and 2i+1 of the draw. Hashing those indices directly, rather
    # than taking every other element of one draw, keeps every read contiguous: compiled on
    # its own, the strided int64 reads of a stored draw left Inductor's loop scalar. The
    # numbers are the same.
    key = _key(seed, counter)
    even = 2 * torch.arange(math.prod(shape), device=device, dtype=torch.int64)
    u1 = ((_bits_at(key, even) >> 8) + 1).float() * 2.0 ** -24
    u2 = (_bits_at(key, even + 1) >> 8).float() * 2.0 ** -24
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.reshape(shape)
