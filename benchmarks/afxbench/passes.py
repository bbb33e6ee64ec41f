"""Passes over memory in Inductor's C++ output: what one compiled bucket reads and writes.

Inductor's CPU backend emits one ``kernel`` function per graph whose body is a sequence of loop
nests. A nest whose iteration space covers the whole parameter (at least ``numel`` iterations)
is a *pass*; an access inside it is *full-size* when its index mentions every loop variable of
the nest outside any integer division (a row factor indexed by the row only, a block's scale
indexed by ``x // block``, or a scalar, is not), or divided by the pointer's own element size:
an int64 word indexed by ``x // 8`` is eight 8-bit codes read at once (``afx.codecs.packing.
read_bytes``), one byte per element. Summing the bytes per element
of the full-size buffers a pass loads and stores gives the bytes it moves per parameter element,
and the full-size buffers the wrapper allocates are the graph's materialised temporaries.

This reads generated source text, so it is a measurement tool, not a guarantee: its rules are
the ones above, tested on hand-written kernels of the same form (``tests/benchmarks``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

#: Bytes per element of the C++ pointer types Inductor's kernels take.
_CPP_BYTES = {"float": 4, "double": 8, "int64_t": 8, "int32_t": 4, "int16_t": 2,
              "uint8_t": 1, "int8_t": 1, "bool": 1, "bfloat16": 2, "half": 2}
_DTYPE_BYTES = {"float32": 4, "float64": 8, "int64": 8, "int32": 4, "int16": 2, "uint8": 1,
                "int8": 1, "bool": 1, "bfloat16": 2, "float16": 2}

_SIGNATURE = re.compile(r'extern "C"\s+void\s+kernel\((.*?)\)\s*\{', re.S)
_LOOP = re.compile(r"for\(int64_t x(\d+)=static_cast<int64_t>\((\d+)L\);\s*"
                   r"x\1<static_cast<int64_t>\((\d+)L\)")
_POINTER = re.compile(r"\b((?:in_out|in|out)_ptr\d+)(\s*\+\s*|\[)static_cast<int64_t>\(")
_ALLOC = re.compile(r"empty_strided_cpu\(\(([\d, ]*)\), \([\d, ]*\), torch\.(\w+)\)")


@dataclass
class Pass:
    """One loop nest over the whole parameter.

    Attributes:
        extent: iterations of the nest (product of its loop variables' ranges).
        reads: bytes per element loaded from full-size buffers.
        writes: bytes per element stored to full-size buffers.
        code_loads: full-size loads of 8-bit buffers (quantized codes).
    """

    extent: int
    reads: int = 0
    writes: int = 0
    code_loads: int = 0


@dataclass
class KernelPasses:
    """Summary of one compiled graph.

    Attributes:
        passes: the full-size loop nests, in program order.
        temporaries_bytes: bytes of full-size buffers the wrapper allocates.
    """

    passes: list[Pass] = field(default_factory=list)
    temporaries_bytes: int = 0

    @property
    def bytes_per_element(self) -> int:
        """Bytes moved per parameter element over all passes (reads plus writes)."""
        return sum(p.reads + p.writes for p in self.passes)

    @property
    def code_loads(self) -> int:
        """Full-size 8-bit loads over all passes."""
        return sum(p.code_loads for p in self.passes)


def _balanced(text: str, start: int) -> str:
    """The text inside the parenthesis opened just before ``start``."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]


#: ``x % d`` of a bare loop variable: it takes ``d`` values, like ``x // (range / d)``.
_MODULO = re.compile(r"static_cast<int64_t>\(x\d+\)\s*%\s*static_cast<int64_t>\(\d+L\)")


def _without_divisions(index: str) -> str:
    """``index`` with every ``div_floor_integer(...)`` and modulo of a bare variable removed:
    a variable that appears only divided (a block's statistic, read once per block) or
    reduced modulo a constant (a column factor read block by block) does not make an access
    full-size. A modulo of a sum (``(x1 + 256*x0) % 768``) stays: it can be a gather."""
    while (at := index.find("div_floor_integer(")) >= 0:
        start = at + len("div_floor_integer(")
        index = index[:at] + index[start + len(_balanced(index, start)) + 1:]
    return _MODULO.sub("0", index)


def _divided_by(index: str, variable: str) -> set[int]:
    """The divisors ``d`` of every ``div_floor_integer(variable, d)`` in ``index``."""
    pattern = (rf"div_floor_integer\(static_cast<int64_t>\({variable}\),\s*"
               r"static_cast<int64_t>\((\d+)L\)\)")
    return {int(d) for d in re.findall(pattern, index)}


def _bytes_per_element(index: str, variables: list[str], size: int) -> int | None:
    """Bytes per element an access with this index moves, or None if it is not full-size."""
    plain = _without_divisions(index)
    missing = [v for v in variables if not re.search(rf"\b{v}\b", plain)]
    if not missing:
        return size
    if size > 1 and all(_divided_by(index, v) == {size} for v in missing):
        return 1  # a word of `size` bytes per `size` elements
    return None


def _pointer_bytes(source: str) -> dict[str, int]:
    match = _SIGNATURE.search(source)
    if match is None:
        return {}
    sizes = {}
    for arg in match.group(1).split(","):
        words = arg.replace("*", " ").replace("const", " ").split()
        if len(words) >= 2:
            sizes[words[-1]] = _CPP_BYTES.get(words[-2].split("::")[-1], 4)
    return sizes


def _nests(body: str) -> list[str]:
    """Splits a kernel body at each outermost (``x0``) loop."""
    starts = [m.start() for m in _LOOP.finditer(body) if m.group(1) == "0"]
    return [body[a:b] for a, b in zip(starts, [*starts[1:], len(body)])]


def _analyse_nest(nest: str, sizes: dict[str, int], numel: int) -> Pass | None:
    bounds: dict[str, tuple[int, int]] = {}
    for m in _LOOP.finditer(nest):
        var, lo, hi = f"x{m.group(1)}", int(m.group(2)), int(m.group(3))
        old = bounds.get(var, (lo, hi))
        bounds[var] = (min(old[0], lo), max(old[1], hi))
    extent = math.prod(hi - lo for lo, hi in bounds.values())
    if extent < numel:
        return None
    variables = [v for v, (lo, hi) in bounds.items() if hi - lo > 1]
    loaded: dict[str, int] = {}
    stored: dict[str, int] = {}
    for m in _POINTER.finditer(nest):
        pointer = m.group(1)
        index = _balanced(nest, m.end())
        moved = _bytes_per_element(index, variables, sizes.get(pointer, 4))
        if moved is None:
            continue
        before = nest[max(0, m.start() - 12):m.start()]
        after = nest[m.end() + len(index):m.end() + len(index) + 24]
        is_store = ".store(" in before or (m.group(2) == "[" and re.match(r"\)\]\s*=[^=]", after))
        (stored if is_store else loaded)[pointer] = moved
    for pointer, moved in list({**loaded, **stored}.items()):
        if pointer.startswith("in_out_ptr"):
            loaded[pointer] = stored[pointer] = moved
    return Pass(extent, reads=sum(loaded.values()), writes=sum(stored.values()),
                code_loads=sum(1 for moved in loaded.values() if moved == 1))


def analyse(module_source: str, numel: int) -> KernelPasses:
    """Counts the passes of every C++ kernel in one Inductor output module.

    Args:
        module_source: the Python module Inductor wrote (``run_and_get_code`` returns it).
        numel: elements of the parameter the graph updates.

    Returns:
        The passes in program order and the bytes of full-size temporaries.
    """
    result = KernelPasses()
    for kernel in re.findall(r"cpp_pybinding\(\[.*?\], r'''(.*?)'''\)", module_source, re.S):
        sizes = _pointer_bytes(kernel)
        for nest in _nests(kernel):
            found = _analyse_nest(nest, sizes, numel)
            if found is not None:
                result.passes.append(found)
    for shape, dtype in _ALLOC.findall(module_source):
        count = math.prod(int(d) for d in shape.split(",") if d.strip()) if shape.strip() else 1
        if count >= numel:
            result.temporaries_bytes += count * _DTYPE_BYTES.get(dtype, 4)
    return result
