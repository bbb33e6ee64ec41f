"""Small numeric helpers shared by transforms.

The reductions here span a whole parameter. When the parameter is sharded (see
:mod:`afx.sharding`), a helper given its local rows computes the statistic of the full logical
tensor: partial sums all-reduced over the ranks and divided by the global count, or per-row
statistics gathered from every rank. ``sharded=False`` marks an argument that is not laid out
like the parameter (APOLLO's replicated low-rank tensors); unsharded, every helper computes
exactly its single-process expression.
"""

from __future__ import annotations

import math

import torch

from afx import sharding as _sharding

Tensor = torch.Tensor


def _is_sharded(sharded: bool) -> bool:
    return sharded and _sharding.current() is not None


def sum_squares(x: Tensor, *, sharded: bool = True) -> Tensor:
    """Sum of the squares of all elements of the logical tensor, in float32.

    Args:
        x: a tensor laid out like the current parameter (its local rows when sharded).
        sharded: ``False`` if ``x`` is the same whole tensor on every rank.

    Returns:
        A 0-d float32 tensor, the same on every rank.

    References:
        None; a helper shared by the transforms.

    Example:
        >>> import torch
        >>> from afx.numerics import sum_squares
        >>> sum_squares(torch.tensor([3.0, 4.0]))
        tensor(25.)
    """
    total = x.float().square().sum()
    return _sharding.all_reduce(total) if _is_sharded(sharded) else total


def norm(x: Tensor, *, sharded: bool = True) -> Tensor:
    """Euclidean norm of the logical tensor (all elements), in float32.

    Args:
        x: a tensor laid out like the current parameter (its local rows when sharded).
        sharded: ``False`` if ``x`` is the same whole tensor on every rank.

    Returns:
        A 0-d float32 tensor: ``torch.linalg.vector_norm(x)`` when unsharded.

    References:
        None; a helper shared by the transforms.

    Example:
        >>> import torch
        >>> from afx.numerics import norm
        >>> norm(torch.tensor([3.0, 4.0]))
        tensor(5.)
    """
    if _is_sharded(sharded):
        return sum_squares(x).sqrt()
    if torch.compiler.is_compiling() and x.ndim >= 2:
        # Row by row first, as in rms(): the row sums then share a loop with other row
        # reductions over the same inputs, such as all_finite's row maxima of the gradient
        # (APOLLO's Fira norm: one pass over the gradient fewer per step).
        return x.float().square().sum(-1).sum().sqrt()
    return torch.linalg.vector_norm(x.float())


def channel_norms(x: Tensor, dim: int) -> Tensor:
    """Euclidean norms of a matrix's rows (``dim=-1``) or columns (``dim=-2``), keeping ``dim``.

    Compiled, the column norms sum groups of rows first (:func:`_sum_down_columns`), so the
    loop reads the matrix in memory order instead of walking down each column; eager, they
    are ``torch.linalg.vector_norm`` as written.

    Args:
        x: a matrix (the same whole tensor on every rank).
        dim: ``-1`` or ``-2``.

    Returns:
        ``torch.linalg.vector_norm(x, dim=dim, keepdim=True)``.

    References:
        None; a helper of APOLLO's channel-wise scaling.

    Example:
        >>> import torch
        >>> from afx.numerics import channel_norms
        >>> channel_norms(torch.tensor([[3.0, 0.0], [4.0, 1.0]]), -2)
        tensor([[5., 1.]])
    """
    if dim == -2 and x.ndim == 2 and torch.compiler.is_compiling():
        return _sum_down_columns(x.float().square(), True).sqrt().unsqueeze(-2)
    return torch.linalg.vector_norm(x, dim=dim, keepdim=True)


def full_mean(x: Tensor, dim: int, *, sharded: bool = True, cheap: bool = False,
              block: int | None = None) -> Tensor:
    """Mean over ``dim`` of the logical tensor, returned whole (the same on every rank).

    Sharded on dim 0: a mean over dim 0 sums the local rows, all-reduces the sum and divides
    by the global row count; a mean over another dim is taken locally and the per-row results
    of every rank are gathered. Either way the result has the shape of the single-process
    ``x.mean(dim)``.

    Args:
        x: a tensor laid out like the current parameter (its local rows when sharded).
        dim: the dim to average over (negative dims count from the end).
        sharded: ``False`` if ``x`` is the same whole tensor on every rank.
        cheap: ``x`` is a few element-wise operations on stored tensors (such as
            ``g² + eps``), which a compiled graph can evaluate in two loops without storing
            it: a mean over the rows then sums leftover rows in a loop of their own (see
            :func:`_sum_down_columns`). Either way it is the mean; only the order of
            the additions differs.
        block: for the mean over the rows of a matrix (``dim = -1``), sum blocks of this
            length first (:func:`row_blocks`), so a compiled step takes it in the loop that
            takes the block absmax of a state encoded in the same blocks.

    Returns:
        The mean, float32 for a float32 ``x``.

    References:
        None; a helper shared by the transforms (Adafactor's row and column statistics).

    Example:
        >>> import torch
        >>> from afx.numerics import full_mean
        >>> full_mean(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), -2)
        tensor([2., 3.])
    """
    dim = dim % x.ndim
    if block is not None:
        if x.ndim != 2 or dim != 1:
            raise ValueError(f"full_mean: block needs the last dim of a matrix, got dim {dim} "
                             f"of shape {tuple(x.shape)}")
        mean = row_blocks(x, block).sum(-1).view(x.shape[0], -1).sum(-1) / x.shape[1]
        return _sharding.gather_rows(mean) if _is_sharded(sharded) else mean
    if not _is_sharded(sharded):
        if dim == x.ndim - 2:
            return _sum_down_columns(x, cheap) / x.shape[dim]
        return x.mean(dim=dim)
    if dim == 0:
        total = _sum_down_columns(x, cheap) if x.ndim == 2 else x.sum(dim=0)
        return _sharding.all_reduce(total) / _sharding.full_shape(x)[0]
    return _sharding.gather_rows(x.mean(dim=dim))


#: Rows added together before the sum over row groups in :func:`_sum_down_columns`.
_ROW_GROUP = 16


def _sum_down_columns(x: Tensor, cheap: bool) -> Tensor:
    """``x.sum(dim=-2)``, summed first within groups of 16 adjacent rows, then over the groups.

    Inductor's C++ loop for a plain sum over the rows walks down each column (a stride of one
    row per element), several times slower than a pass in memory order on a tall matrix such
    as a 50257×768 embedding; grouping the rows makes it stream through memory in order. Rows
    left over after the last whole group are summed in a small loop of their own when ``x``
    is ``cheap``. Otherwise (an ``x`` with many operations, such as CAME's residual, read by
    two loops would be stored whole as a parameter-sized buffer) they are padded with zero
    rows, exact for a sum, which Inductor folds into the grouped loop as a masked load on
    every element: the row and column sums of a 50257×768 embedding's ``g²`` take about
    30 % longer padded than with the leftover row summed apart.
    """
    rows, cols = x.shape[-2], x.shape[-1]
    if rows < 2 * _ROW_GROUP:
        return x.sum(dim=-2)
    tail = rows % _ROW_GROUP
    if tail and cheap:
        body = x[..., :rows - tail, :]
        return _sum_down_columns(body, cheap) + x[..., rows - tail:, :].sum(dim=-2)
    if tail:
        x = torch.nn.functional.pad(x, (0, 0, 0, _ROW_GROUP - tail))
    groups = x.shape[-2] // _ROW_GROUP
    return x.reshape(*x.shape[:-2], groups, _ROW_GROUP, cols).sum(dim=-2).sum(dim=-2)


def all_finite(x: Tensor, *, sharded: bool = True) -> Tensor:
    """Whether every element of the logical tensor is finite (all ranks agree).

    Args:
        x: a tensor laid out like the current parameter (its local rows when sharded).
        sharded: ``False`` if ``x`` is the same whole tensor on every rank.

    Returns:
        A 0-d bool tensor.

    References:
        None; a helper of ``skip_nonfinite``.

    Example:
        >>> import torch
        >>> from afx.numerics import all_finite
        >>> all_finite(torch.tensor([1.0, float("nan")]))
        tensor(False)
    """
    if x.numel() == 0:  # an empty shard holds nothing non-finite
        finite = torch.ones((), dtype=torch.bool, device=x.device)
    else:
        # The largest magnitude is finite exactly when every element is (amax keeps a NaN).
        # Row by row first, so the loop fuses with the row sums of g² that read x too; in
        # Inductor's C++ a float maximum costs a fraction of isfinite().all(), whose boolean
        # reduction converts every vector of masks to int64 and back.
        finite = x.abs().amax(dim=-1).amax() < math.inf
    if not _is_sharded(sharded):
        return finite
    return _sharding.all_reduce(torch.logical_not(finite).to(torch.int32)) == 0


def rms(x: Tensor, *, sharded: bool = True) -> Tensor:
    """Root mean square of all elements, accumulated in float32: ``‖x‖₂ / √numel``.

    Args:
        x: a tensor of any shape and floating dtype (laid out like the current parameter:
            its local rows when sharded, see :mod:`afx.sharding`).
        sharded: ``False`` if ``x`` is the same whole tensor on every rank.

    Returns:
        A 0-d float32 tensor (NaN for an empty ``x``), over the logical tensor.

    References:
        None; a helper shared by the transforms.

    Example:
        >>> import torch
        >>> from afx.numerics import rms
        >>> rms(torch.tensor([3.0, 4.0]))
        tensor(3.5355)
    """
    if _is_sharded(sharded):
        return (sum_squares(x) / _sharding.full_numel(x)).sqrt()
    if torch.compiler.is_compiling() and x.ndim >= 2:
        # Row by row first: Inductor's C++ then sums each row with plain vector adds and
        # cascades only the row totals, not every vector of a loop over all elements. The
        # parameter's RMS and the clip's are two such sums per step (in-process A/B, 124M,
        # one thread, AVX-512 Xeon: the default 267 -> 253 ms, afx.Adafactor 273 -> 254).
        return (x.float().square().sum(-1).sum() / x.numel()).sqrt()
    return x.float().square().mean().sqrt()


def fp32_zeros(shape: tuple[int, ...] | torch.Size, like: Tensor) -> Tensor:
    """A float32 zero tensor of ``shape`` on ``like``'s device (states are fp32 whatever the
    parameter's dtype).

    Args:
        shape: the state's shape.
        like: the parameter the state belongs to.

    Returns:
        ``torch.zeros(shape)`` in float32 on ``like.device``.

    References:
        None; a helper of afx's state initialisation.

    Example:
        >>> import torch
        >>> from afx.numerics import fp32_zeros
        >>> fp32_zeros((2,), torch.ones(3, dtype=torch.bfloat16))
        tensor([0., 0.])
    """
    return torch.zeros(shape, dtype=torch.float32, device=like.device)


def factored_rsqrt(row: Tensor, col: Tensor, floor: Tensor | float, *,
                   sharded: bool = True) -> Tensor:
    """``1/√V̂`` for the factored estimate ``V̂ = row colᵀ / max(mean(row), floor)``.

    Args:
        row: row statistics, shape ``(..., R)``.
        col: column statistics, shape ``(..., C)``.
        floor: lower bound of ``mean(row)``, so an all-zero row statistic stays finite.
        sharded: the statistics are whole (the same on every rank) and describe a tensor
            sharded like the current parameter: return only this rank's rows of ``1/√V̂``.
            ``False`` for statistics of a tensor that is not sharded.

    Returns:
        ``1/√V̂`` of shape ``(..., R, C)`` (this rank's rows when sharded); leading dims are
        independent batches.

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018:
        the factored second-moment estimate.

    Example:
        >>> import torch
        >>> from afx.numerics import factored_rsqrt
        >>> factored_rsqrt(torch.tensor([1.0, 1.0]), torch.tensor([4.0, 16.0]), 1e-30)
        tensor([[0.5000, 0.2500],
                [0.5000, 0.2500]])
    """
    row_part, col_part = factored_rsqrt_parts(row, col, floor, sharded=sharded)
    return row_part * col_part


def factored_rsqrt_parts(row: Tensor, col: Tensor, floor: Tensor | float, *,
                         sharded: bool = True) -> tuple[Tensor, Tensor]:
    """The two factors of :func:`factored_rsqrt`, ``(√(mean(row)/row), 1/√col)``, unmultiplied.

    Args:
        row: row statistics, shape ``(..., R)``.
        col: column statistics, shape ``(..., C)``.
        floor: lower bound of ``mean(row)``.
        sharded: as for :func:`factored_rsqrt`.

    Returns:
        ``(row_part, col_part)`` of shapes ``(..., R, 1)`` and ``(..., 1, C)`` whose product is
        ``factored_rsqrt(row, col, floor)``, bit for bit.

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018.

    Example:
        >>> import torch
        >>> from afx.numerics import factored_rsqrt_parts
        >>> factored_rsqrt_parts(torch.tensor([1.0, 3.0]), torch.tensor([4.0]), 1e-30)
        (tensor([[1.4142],
                [0.8165]]), tensor([[0.5000]]))
    """
    row_mean = torch.clamp(row.mean(dim=-1, keepdim=True), min=floor)
    row_factor = row / row_mean
    if _is_sharded(sharded):
        # The row statistic's dim 0 is the parameter's dim 0; the column statistic's only when
        # it has leading (batch) dims.
        row_factor = _sharding.local_rows(row_factor)
        if col.ndim >= 2:
            col = _sharding.local_rows(col)
    return hoisted(row_factor.rsqrt()).unsqueeze(-1), hoisted(col.rsqrt()).unsqueeze(-2)


def _logical_mean(total: Tensor, x: Tensor) -> Tensor:
    """``total`` (a local sum over ``x``) divided by the logical tensor's size, all-reduced."""
    if _is_sharded(True):
        return _sharding.all_reduce(total) / _sharding.full_numel(x)
    return total / x.numel()


def factored_mean_square(x: Tensor, row_part: Tensor, col_part: Tensor) -> Tensor:
    """``mean((x · row_part · col_part)²)`` over the logical tensor, from sums down the columns.

    ``Σ_ij x²_ij r²_i c²_j = Σ_j c²_j Σ_i x²_ij r²_i``: the inner sums run down the columns like
    Adafactor's column statistic of ``x²``, so a compiled step computes both in one loop over
    ``x``, where the plain mean square of the product would need a loop of its own. The two
    agree up to rounding (the additions happen in another order).

    Args:
        x: shape ``(..., R, C)``, laid out like the current parameter (its local rows when
            sharded).
        row_part: shape ``(..., R, 1)``, in ``x``'s layout (as from
            :func:`factored_rsqrt_parts`).
        col_part: shape ``(..., 1, C)``, in ``x``'s layout.

    Returns:
        A 0-d float32 tensor, the same on every rank.

    References:
        None; a helper of the factored preconditioner's update clipping.

    Example:
        >>> import torch
        >>> from afx.numerics import factored_mean_square
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> r, c = torch.tensor([[1.0], [0.5]]), torch.tensor([[2.0, 1.0]])
        >>> factored_mean_square(x, r, c), (x * r * c).square().mean()
        (tensor(5.2500), tensor(5.2500))
    """
    down = _sum_down_columns(x.float().square() * row_part.square(), cheap=True)
    total = (down * col_part.squeeze(-2).square()).sum()
    return _logical_mean(total, x)


def row_blocks(x: Tensor, block: int) -> Tensor:
    """A matrix's rows cut into blocks: ``(R, C) -> (R·C/block, block)``, ``block`` dividing ``C``.

    The same elements in the same order as ``x.reshape(-1, block)``, which is what the block
    codecs of :mod:`afx.codecs` encode. The reshape goes through ``(R, C/block, block)``: a
    compiled graph then indexes a row or column factor of ``x`` by the block number divided
    or taken modulo ``C/block``, a broadcast, where a reshape straight to blocks leaves the
    column index as a modulo of the flat position, a gather on Inductor's C++ backend.

    Args:
        x: shape ``(R, C)``.
        block: the block length; must divide ``C``.

    Returns:
        A view of ``x`` of shape ``(R·C/block, block)``.

    References:
        None; a layout helper of the block-quantized momentum.

    Example:
        >>> import torch
        >>> from afx.numerics import row_blocks
        >>> row_blocks(torch.arange(8.0).reshape(2, 4), 2)
        tensor([[0., 1.],
                [2., 3.],
                [4., 5.],
                [6., 7.]])
    """
    rows, cols = x.shape
    if cols % block:
        raise ValueError(f"row_blocks: block {block} does not divide the {cols} columns")
    return x.reshape(rows, cols // block, block).reshape(-1, block)


def blockwise_mean_square(x: Tensor, block: int) -> Tensor:
    """``mean(x²)`` over the logical tensor, summed block by block of :func:`row_blocks`.

    A compiled step whose state is encoded in the same blocks computes these sums in the loop
    that takes each block's absmax for the encoder, instead of in a loop of its own. Equal to
    the plain mean square up to rounding (the additions happen in another order).

    Args:
        x: shape ``(R, C)``, laid out like the current parameter (its local rows when
            sharded); ``block`` must divide ``C``.
        block: the block length.

    Returns:
        A 0-d float32 tensor, the same on every rank.

    References:
        Shazeer & Stern, "Adafactor", 2018: the update clipping it serves, here for a
        momentum encoded in blocks (Dettmers et al., "8-bit Optimizers via Block-wise
        Quantization", 2022).

    Example:
        >>> import torch
        >>> from afx.numerics import blockwise_mean_square
        >>> blockwise_mean_square(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 2)
        tensor(7.5000)
    """
    total = row_blocks(x.float(), block).square().sum(-1).sum()
    return _logical_mean(total, x)


def hoisted(x: Tensor | float) -> Tensor | float:
    """``x`` unchanged, but computed once per call of the compiled step, not once per element.

    Inductor inlines cheap pointwise math on small tensors (a step-size scalar, a row or column
    factor) into every loop that reads the result, and its C++ loops then redo it (``pow``,
    ``sqrt``, float64 divisions) for each vector of 16 elements of the parameter: 1–3 ns per
    element. A reduction is always computed in a loop of its own and stored, so routing the
    small tensor through an ``amax`` over 16 copies (exact for any value, NaN included) makes
    the big loops just load it.

    Args:
        x: a 0-d or small tensor, or a Python number (returned as is).

    Returns:
        ``x``, bit for bit.

    References:
        None; a workaround for how Inductor's C++ backend schedules scalar math.

    Example:
        >>> import torch
        >>> from afx.numerics import hoisted
        >>> hoisted(torch.tensor(0.3, dtype=torch.float64)).item() == 0.3
        True
    """
    if not isinstance(x, Tensor):
        return x
    return x.unsqueeze(-1).expand(*x.shape, 16).amax(dim=-1)


def clip_rms(u: Tensor, d: Tensor | float, *, sharded: bool = True,
             mean_square: Tensor | None = None) -> Tensor:
    """``u / max(1, RMS(u)/d)``; ``d = 0`` leaves ``u`` unchanged.

    Args:
        u: the update.
        d: the clipping threshold (number or 0-d tensor, so a scheduler can change it without
            a recompile).
        sharded: ``False`` if ``u`` is the same whole tensor on every rank (see :func:`rms`).
        mean_square: ``RMS(u)²`` if the caller already has it (see
            :func:`factored_mean_square`); otherwise it is computed from ``u``.

    Returns:
        ``u`` scaled down so its RMS is at most ``d``.

    References:
        Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", 2018:
        update clipping.

    Example:
        >>> import torch
        >>> from afx.numerics import clip_rms
        >>> clip_rms(torch.tensor([3.0, 4.0]), 1.0), clip_rms(torch.tensor([0.3, 0.4]), 1.0)
        (tensor([0.8485, 1.1314]), tensor([0.3000, 0.4000]))
    """
    value = rms(u, sharded=sharded) if mean_square is None else mean_square.sqrt()
    denom = torch.clamp(value / d, min=1.0)
    return u / hoisted(torch.where(torch.as_tensor(d) > 0, denom, torch.ones_like(denom)))
