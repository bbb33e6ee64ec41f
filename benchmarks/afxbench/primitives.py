"""The cheapest loops an optimizer step is made of, compiled by Inductor and timed alone.

Each primitive is one ``torch.compile``'d function over a tensor of the embedding's shape
(50257×768 by default, 147 MiB in fp32, far beyond the L3 cache), so its time per element is
what Inductor's C++ code costs for that loop on this machine. They bound any optimizer step
built from the same loops with the same code generator: an 8-bit state can't be updated faster
than ``code_update_fixed_scale``, a loop that decodes, updates and re-encodes it with no block
statistic at all, and a state in a log-space code (``al8``) not faster than
``log_code_update_fixed_range``, the same loop with the 2^y and log2 that code needs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Primitive:
    """One timed loop.

    Attributes:
        name: key in the report.
        what: one line for the report.
        bytes_per_element: bytes a perfect loop moves per element (reads plus writes).
        build: returns ``(function, arguments)`` for tensors of the given shape.
    """

    name: str
    what: str
    bytes_per_element: float
    build: Callable[[tuple[int, int]], tuple[Callable, tuple]]


def _compile(fn: Callable) -> Callable:
    import torch

    return torch.compile(fn, fullgraph=True, dynamic=False)


def _fp32_read(shape):
    import torch

    x = torch.randn(shape)
    out = torch.zeros(())
    return _compile(lambda x, out: out.copy_(x.sum())), (x, out)


def _fp32_update(shape):
    import torch

    p, g = torch.randn(shape), torch.randn(shape)
    return _compile(lambda p, g: p.add_(g, alpha=-1e-3)), (p, g)


def _fp32_fresh_output(shape):
    import torch

    x = torch.randn(shape)
    # The result is a new tensor each call: Inductor allocates it, and an allocation this
    # large is a fresh mapping whose pages the kernel faults in as it writes them. This is what
    # every full-size temporary of a step costs on top of its traffic.
    return _compile(lambda x: x * 2.0), (x,)


def _code_read(words: bool):
    def build(shape):
        import torch

        from afx.codecs.packing import read_words

        read = read_words if words else (lambda c: c)
        codes = torch.randint(0, 256, shape, dtype=torch.uint8)
        out = torch.zeros(())
        return (_compile(lambda c, out: out.copy_(((read(c).float() - 128.0) * 0.01).sum())),
                (codes, out))

    return build


def _code_update_fixed_scale(shape):
    import torch

    from afx.codecs.packing import read_bytes

    codes = torch.randint(0, 256, shape, dtype=torch.uint8)
    g = torch.randn(shape) * 0.01

    def update(c, g):
        # Codes read as afx's own 8-bit loops read them (read_bytes: int64 words where that is
        # the faster load), so this stays a lower bound for those loops.
        m = (read_bytes(c).float() - 128.0) * (1 / 128)
        m = m * 0.9 + g * 0.1
        c.copy_((m * 128.0).round().clamp(-128, 127).add(128).to(torch.uint8))

    return _compile(update), (codes, g)


def _log_code_update_fixed_range(shape):
    import torch

    from afx.codecs.packing import read_bytes

    codes = torch.randint(1, 256, shape, dtype=torch.uint8)
    g = torch.randn(shape) * 0.01
    low, span = -40.0, 30.0  # one log2 range for every element: no block statistic

    def update(c, g):
        # What any update of a log-space code (al8's format) computes per element: 2^y to
        # decode and log2 to encode. Codes read as words, products instead of al8's exact
        # divisions, no zero code: cheaper than afx's codec, so a lower bound for it.
        v = torch.pow(2.0, (read_bytes(c).float() - 1.0) * (span / 254.0) + low)
        v = v * 0.999 + g * g * 0.001
        q = ((torch.log2(v) - low) * (254.0 / span)).round().clamp(0, 254) + 1.0
        c.copy_(q.to(torch.uint8))

    return _compile(update), (codes, g)


def _codec_update(codec_name: str, block: int, square: bool):
    def build(shape):
        import math

        import torch

        from afx.codecs import get_codec

        codec = get_codec(codec_name)
        # Rows of one block: the layout where Inductor's codec loops vectorise best, so the
        # time is the codec's own cost (a bound), not that of an awkward index.
        g = torch.randn(math.prod(shape) // block, block) * 0.01
        state = codec.encode(g.abs() if square else g, block)

        def update(state, g):
            x = codec.decode(state, g.shape)
            new = codec.encode(torch.lerp(x, g * g if square else g, 0.1), block)
            for old, fresh in zip(state, new):
                old.copy_(fresh)

        return _compile(update), (state, g)

    return build


PRIMITIVES = [
    Primitive("fp32_read", "sum of an fp32 tensor", 4, _fp32_read),
    Primitive("fp32_update", "p -= lr·g (fp32)", 12, _fp32_update),
    Primitive("fp32_fresh_output", "y = 2·x into a newly allocated fp32 tensor", 8,
              _fp32_fresh_output),
    Primitive("code_read", "sum of decoded 8-bit codes (fixed scale)", 1, _code_read(False)),
    Primitive("code_read_words", "the same sum, codes read as int64 words (afx's read_words)", 1,
              _code_read(True)),
    Primitive("code_update_fixed_scale",
              "8-bit state: decode, m = 0.9·m + 0.1·g, re-encode; fixed scale, no block stats",
              6, _code_update_fixed_scale),
    Primitive("log_code_update_fixed_range",
              "8-bit log-space state (al8's code): decode by 2^y, v = 0.999·v + 0.001·g², "
              "re-encode by log2; fixed range, no block stats", 6, _log_code_update_fixed_range),
    Primitive("uf8_update", "afx's uf8 codec (block 256, one block per row): decode, lerp "
              "with g, encode", 6, _codec_update("uf8", 256, square=False)),
    Primitive("al8_update", "afx's al8 codec (block 2048, one block per row): decode, lerp "
              "with g², encode",
              6, _codec_update("al8", 2048, square=True)),
]


def timed_calls(fn: Callable, args: tuple, reps: int) -> list[float]:
    """Seconds taken by each of ``reps`` consecutive calls ``fn(*args)``."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return times


def time_primitive(primitive: Primitive, shape: tuple[int, int], reps: int) -> dict[str, Any]:
    """Compiles one primitive, then times ``reps`` calls after two untimed ones.

    Args:
        primitive: what to run.
        shape: tensor shape.
        reps: timed calls.

    Returns:
        ``ns_per_element`` (median), ``gbps`` (nominal bytes over the median time), the
        compile time and the raw times in seconds.
    """
    fn, args = primitive.build(shape)
    start = time.perf_counter()
    fn(*args)
    compile_s = time.perf_counter() - start
    fn(*args)
    times = timed_calls(fn, args, reps)
    tensors = [t for a in args for t in (a if isinstance(a, tuple) else (a,))]
    numel = max(t.numel() for t in tensors)
    median = statistics.median(times)
    return {"name": primitive.name, "what": primitive.what, "numel": numel,
            "bytes_per_element": primitive.bytes_per_element,
            "ns_per_element": 1e9 * median / numel,
            "gbps": primitive.bytes_per_element * numel / median / 1e9,
            "compile_s": compile_s, "times_s": times}
