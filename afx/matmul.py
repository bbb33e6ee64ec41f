"""Matrix products of compiled steps, on the faster of the CPU build's two libraries.

torch's CPU ``mm`` calls MKL, whose single-precision GEMM picks its code path by CPU vendor:
on the benchmark machine's AMD EPYC, ``MKL_VERBOSE=1`` reports its generic "Intel(R)
Architecture processors" path although the CPU has AVX-512. oneDNN, the other library in the
same build, picks its kernels by instruction set (``ONEDNN_VERBOSE=1``: ``brg_matmul:avx512_core``
there). Inside a compiled step
afx therefore hands float32 CPU products to oneDNN, through an opaque custom op (Inductor's
own lowering of oneDNN's linear expects a frozen weight, not a tensor computed in the graph).
Eager code keeps ``a @ b``: the very call, and so the very numbers, of the implementations afx
is compared with.

On the benchmark machine (AMD EPYC, AVX-512, one thread, torch 2.13), ``benchmarks/floor.py``
times all of APOLLO's rank-256 projections of the 124M model at 844 ms with MKL and 661 ms
with oneDNN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def _onednn_linear() -> Callable[..., Tensor] | None:
    """oneDNN's ``linear`` (``x @ wᵀ``) if this torch build has it, else ``None``."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


_LINEAR = _onednn_linear()


@torch.library.custom_op("afx::cpu_mm", mutates_args=())
def cpu_mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for float32 CPU matrices, computed by oneDNN where it can be.

    Args:
        a: ``(M, K)``.
        b: ``(K, N)``, any strides (oneDNN takes ``bᵀ`` as its weight).

    Returns:
        A new contiguous ``(M, N)`` tensor.

    References:
        oneDNN (oneAPI Deep Neural Network Library), the matmul primitive behind
        ``torch.ops.mkldnn._linear_pointwise``.

    Example:
        >>> import torch
        >>> from afx.matmul import cpu_mm
        >>> a, b = torch.randn(3, 4), torch.randn(4, 2)
        >>> torch.allclose(cpu_mm(a, b), a @ b, atol=1e-6)
        True
    """
    if _LINEAR is None or 0 in (*a.shape, b.shape[1]):
        return a @ b
    return _LINEAR(a.contiguous(), b.t(), None, "none", [], "")


@cpu_mm.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[1])


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for two matrices: :func:`cpu_mm` inside a compiled float32 CPU step.

    Args:
        a: ``(M, K)``.
        b: ``(K, N)``.

    Returns:
        ``(M, N)``: bit for bit ``a @ b`` eagerly; compiled, within float32 rounding of it
        (the two libraries sum in different orders).

    References:
        None; see the module docstring for why the library changes.

    Example:
        >>> import torch
        >>> from afx.matmul import matmul
        >>> a, b = torch.randn(3, 4), torch.randn(4, 2)
        >>> torch.equal(matmul(a, b), a @ b)
        True
    """
    if (torch.compiler.is_compiling() and _LINEAR is not None and a.device.type == "cpu"
            and a.dtype == torch.float32 and b.dtype == torch.float32):
        return cpu_mm(a, b)
    return a @ b
