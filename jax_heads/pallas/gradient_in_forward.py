"""The gradient-in-forward path of the reductions ``"sum"`` and ``"mean"``: 6·N·D·V FLOPs, bounded memory.

With a reduced loss the upstream gradient of every token is one scalar, so both gradients are known
up to that scalar during the forward. Only the counted tokens (not ``ignore_index``) are multiplied:
their row indices are put first, in order (a stable partition), and walked in chunks of
``chunk_rows``: the partial chunk first (its size rounded up to a multiple of ``chunk_rows /
GradientInForwardConfig.tail_steps``; ``lax.switch`` over the possible sizes), then the whole chunks
(a loop whose length is the count of counted tokens over ``chunk_rows``, known on the device only).
Per chunk, with its rows of ``hidden`` gathered:

1. ``logits = h_c · Wᵀ``: an XLA (cuBLAS) product accumulated in float32, written in the input
   dtype: the one ``(chunk_rows, V)`` buffer, at most ``GradientInForwardConfig.logits_budget_bytes``.
2. ``lce_gif_stats`` (Pallas, Triton backend): per token block and vocabulary split, the online
   log-sum-exp partials, the target logit and (label smoothing) the row sum of the transformed
   logits ``z' = softcap·tanh((z + bias) / softcap)``; the splits are combined in a fixed order
   (:func:`jax_heads.pallas.op.combine_partials`), then the per-token loss
   (:func:`~jax_heads.reference.loss_terms`) and the coefficients ``A, B, C`` of
   ``G = p·A − B·onehot − C`` (:func:`~jax_heads.reference.grad_coefficients`) for the upstream
   ``scale`` (1 for ``"sum"``, 1 / the count of counted tokens of the whole input for ``"mean"``).

   With ``GradientInForwardConfig.logits_kernel`` resolving to ``"mosaic"`` (:func:`logits_kernel_for`),
   steps 1 and 2 are one kernel: the Mosaic GPU forward (:mod:`jax_heads.pallas.mosaic_forward`) forms
   the same partials and stores every tile's raw products ``z`` in the input dtype as it goes
   (``store_logits``), so the logits are read once fewer. Its shapes are padded to its tiles: the
   chunk's buffer is ``(chunk_rows, V_pad)``, ``G`` is 0 in the padding columns and rows, and the two
   products below run on the padded weight (a copy only where ``V``/``D`` are not whole tiles).
3. ``lce_gif_grads`` (Pallas): ``G`` times the soft-cap's derivative ``1 − (z'/c)²``, 0 on ignored
   and padding rows, written over the logits in place (``input_output_aliases``) in the input dtype.
4. ``d_hidden_c = G · W`` (input dtype), scattered to the chunk's rows of ``d_hidden`` (the
   ignored rows stay 0), and ``d_weight += Gᵀ · h_c`` accumulated in the weight's dtype (the product
   accumulates in float32 and is added to the running sum, rounded once per chunk, as Liger-Kernel
   does; no float32 ``(V, D)`` buffer; the first chunk's product starts it, no zero fill),
   ``d_bias += Σ_rows G`` in float32.

A ``jax.custom_vjp`` returns the loss and saves the three gradients; its backward multiplies them by
the upstream scalar (nothing when it is 1). Memory beyond inputs and gradients: the logits chunk,
the chunk's gathered ``hidden`` and ``d_hidden`` rows, ``(N,)`` and ``(chunk_rows,)`` vectors — not
a float32 ``(V, D)`` accumulator. ``docs/kernel-notes.md`` gives
the memory formula at the benchmark shapes.

Under ``jax.vmap`` with batched labels the count of counted tokens is batched too: ``lax.switch``
then evaluates every partial size and the loop runs the largest member's count, so time and memory
grow with ``tail_steps`` (the functional API flattens leading dimensions into one call instead).

Without differentiation (evaluation) the primal runs the exact Pallas forward
(:func:`jax_heads.pallas.pallas_loss`, 2·N·D·V, float32 logits in the kernel), so no gradient work is
done; under differentiation the loss comes from the input-dtype logits of step 1, as the naive
computation's does (the two agree to the input dtype's rounding of the logits).

Not here: a returned log-sum-exp (its upstream gradient differs per token and is unknown during the
forward) and gradient filtering (``filter_eps``): with those, and with vocabulary sharding,
``impl="pallas"`` keeps the exact recomputing path (:func:`uses_gradient_in_forward`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jax_heads.pallas import plan as geometry
from jax_heads.pallas.config import (
    DEFAULT_BLOCK_SIZES,
    BlockSizes,
    GradientInForwardConfig,
    LogitOptions,
    matmul_precision,
    triton_params,
)
from jax_heads.pallas.epilogue import softcapped
from jax_heads.pallas.gif_mosaic import chunk_logits_and_stats, logits_kernel_for
from jax_heads.pallas.op import _first_order_only, combine_partials, pallas_loss
from jax_heads.reduction import scaled_by_upstream
from jax_heads.reference import grad_coefficients, loss_terms

REDUCTIONS = ("sum", "mean")
# Kernels address the logits buffer with int32 offsets: a chunk holds fewer than 2³¹ elements.
_MAX_CHUNK_ELEMENTS = 2**31 - 1
_NEG_INF = float("-inf")


def uses_gradient_in_forward(options) -> bool:
    """Whether ``impl="pallas"`` runs this path for a ``heads_common.registry.LossOptions``: a reduction
    ``"sum"``/``"mean"`` without ``return_lse``, gradient filtering or vocabulary sharding."""
    return (options.reduction in REDUCTIONS and not options.return_lse and not options.filtered
            and options.sharding is None)


def chunk_rows_for(n: int, v: int, dtype, config: GradientInForwardConfig) -> int:
    """Token rows per chunk: the fewest equal chunks of ``N``, at least ``config.min_chunks`` (as far as
    chunks of ``block_n`` rows allow), whose ``(rows, V)`` logits in ``dtype`` fit
    ``config.logits_budget_bytes``, rounded up to ``config.block_n`` (at least ``block_n``)."""
    block = config.block_n
    cap = min(config.logits_budget_bytes // (max(v, 1) * jnp.dtype(dtype).itemsize), _MAX_CHUNK_ELEMENTS // max(v, 1))
    cap = max(block, cap - cap % block)
    chunks = max(-(-max(n, 1) // cap), min(config.min_chunks, -(-max(n, 1) // block)))
    rows = -(-max(n, 1) // chunks)
    return min(cap, geometry.round_up(rows, block))


def tail_rows_for(chunk_rows: int, granule: int, config: GradientInForwardConfig) -> int:
    """The step of the partial chunk's sizes: ``chunk_rows / config.tail_steps`` rounded up to whole
    ``granule`` rows (the kernels' token block); ``chunk_rows`` is a multiple of ``granule``."""
    return min(chunk_rows, geometry.round_up(-(-chunk_rows // config.tail_steps), granule))


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------


def _tile(logits_ref, bias_ref, n0, v0, *, block_n, block_v, width, softcap):
    """float32 transformed logits ``z'`` of rows ``n0:`` and columns ``v0:`` of the chunk, the column
    indices ``(1, block_v)`` and the mask of the buffer's ``width`` columns (None when ``block_v``
    divides it; the last tile may run past it: masked loads, whose masked values are undefined and
    never used)."""
    columns = v0 + lax.broadcasted_iota(jnp.int32, (block_v,), 0)
    cols = columns[None, :]
    index = (pl.ds(n0, block_n), pl.ds(v0, block_v))
    real = None if width % block_v == 0 else jnp.broadcast_to(cols < width, (block_n, block_v))
    if real is None:
        z = logits_ref[index].astype(jnp.float32)
    else:
        z = pltriton.load(logits_ref.at[index], mask=real).astype(jnp.float32)
    if bias_ref is not None:
        b_index = pl.ds(v0, block_v)
        if real is None:
            b = bias_ref[b_index]
        else:
            b = pltriton.load(bias_ref.at[b_index], mask=columns < width)
        z = z + b[None, :]
    if softcap is not None:  # c·tanh(z/c) from one exp2 (epilogue.py)
        z = softcapped(z, softcap)
    return z, cols, real


def _stats_kernel(logits_ref, y_ref, *refs, block_n, block_v, tiles_per_split, num_tiles, vocab_size, softcap,
                  has_bias, row_sum):
    """One (token block, vocabulary split): partial max, ``Σ exp(z' − max)``, target logit (and row sum)."""
    bias_ref = refs[0] if has_bias else None
    m_ref, s_ref, t_ref, *r_ref = refs[1:] if has_bias else refs
    i, split = pl.program_id(0), pl.program_id(1)
    n0 = pl.multiple_of(i * block_n, block_n)
    labels = y_ref[pl.ds(n0, block_n)]
    first = split * tiles_per_split

    def body(t, carry):
        m, s, target, *rsum = carry
        v0 = pl.multiple_of((first + t) * block_v, block_v)
        z, cols, real = _tile(logits_ref, bias_ref, n0, v0, block_n=block_n, block_v=block_v,
                              width=vocab_size, softcap=softcap)
        if real is not None:  # columns past V (undefined values): 0 in the row sum, -inf in the log-sum-exp
            z = jnp.where(real, z, 0.0)
        if row_sum:
            rsum = (rsum[0] + jnp.sum(z, axis=1),)
        if real is not None:
            z = jnp.where(real, z, _NEG_INF)
        target = target + jnp.sum(jnp.where(cols == labels[:, None], z, 0.0), axis=1)
        # Online log-sum-exp (Milakov & Gimelshein): rescale the running sum to the new maximum.
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        return m_new, s, target, *rsum

    zeros = jnp.zeros((block_n,), jnp.float32)
    init = (jnp.full((block_n,), _NEG_INF, jnp.float32), zeros, zeros, *((zeros,) if row_sum else ()))
    stats = lax.fori_loop(0, jnp.minimum(tiles_per_split, num_tiles - first), body, init)
    for ref, value in zip((m_ref, s_ref, t_ref, *r_ref), stats):
        ref[split, pl.ds(n0, block_n)] = value


def _grads_kernel(logits_ref, y_ref, lse_ref, a_ref, *refs, block_n, block_v, vocab_size, width, softcap, has_b,
                  has_c, has_bias):
    """One (token block, vocabulary tile): ``G = (p·A − B·onehot − C)·(1 − (z'/c)²)`` over the logits, in place.

    ``B`` defaults to ``A`` and ``C`` to 0 (their refs are absent). Rows with ``A = B = 0`` (ignored
    and padding tokens) are written as 0 even where their logits are not finite; so are the buffer's
    padding columns ``vocab_size : width``.
    """
    b_ref = refs[0] if has_b else None
    c_ref = refs[int(has_b)] if has_c else None
    bias_ref = refs[int(has_b) + int(has_c)] if has_bias else None
    g_ref = refs[-1]  # the logits buffer itself (aliased)
    i, j = pl.program_id(0), pl.program_id(1)
    n0 = pl.multiple_of(i * block_n, block_n)
    v0 = pl.multiple_of(j * block_v, block_v)
    z, cols, real = _tile(logits_ref, bias_ref, n0, v0, block_n=block_n, block_v=block_v, width=width,
                          softcap=softcap)
    rows = pl.ds(n0, block_n)
    lse, a, labels = lse_ref[rows], a_ref[rows], y_ref[rows]
    b = a if b_ref is None else b_ref[rows]
    onehot = cols == labels[:, None]
    p = jnp.exp(z - lse[:, None])
    g = (p - jnp.where(onehot, 1.0, 0.0)) * a[:, None] if b_ref is None else p * a[:, None] - jnp.where(
        onehot, b[:, None], 0.0)
    if c_ref is not None:
        g = g - c_ref[rows][:, None]
    if softcap is not None:  # d(c·tanh(z/c))/dz = 1 − (z'/c)²
        g = g * (1.0 - jnp.square(z * (1.0 / softcap)))
    live = (a != 0.0) | (b != 0.0)  # NaN counts as live: a NaN row stays NaN
    keep = live[:, None] if vocab_size == width else live[:, None] & (cols < vocab_size)
    g = jnp.where(keep, g, 0.0).astype(g_ref.dtype)
    index = (pl.ds(n0, block_n), pl.ds(v0, block_v))
    if real is None:
        g_ref[index] = g
    else:
        pltriton.store(g_ref.at[index], g, mask=real)


def _chunk_stats(logits, labels, bias, o: _Options):
    """Per-token ``(lse, target, row sum or None)`` of one chunk's logits, float32 ``(chunk_rows,)`` each."""
    cfg = o.config.gradient_in_forward
    rows, vocab = logits.shape
    n_blocks, num_tiles = rows // cfg.block_n, -(-vocab // cfg.block_v)
    splits, tiles_per_split = geometry.choose_splits(
        n_blocks, num_tiles, cfg.min_programs, o.config.sm_count or geometry.sm_count())
    row_sum = bool(o.label_smoothing)
    kernel = functools.partial(
        _stats_kernel, block_n=cfg.block_n, block_v=cfg.block_v, tiles_per_split=tiles_per_split,
        num_tiles=num_tiles, vocab_size=vocab, softcap=o.softcap, has_bias=bias is not None, row_sum=row_sum,
    )
    part = jax.ShapeDtypeStruct((splits, rows), jnp.float32)
    partials = pl.pallas_call(
        kernel, out_shape=(part,) * (4 if row_sum else 3), grid=(n_blocks, splits),
        compiler_params=triton_params(cfg), interpret=o.interpret, name="lce_gif_stats",
    )(logits, labels, *(() if bias is None else (bias,)))
    lse, target, *sums = combine_partials(*partials)
    return lse, target, (sums[0] if sums else None)


def _chunk_grads(logits, labels, lse, coefficients, bias, vocab: int, o: _Options):
    """The chunk's gradient logits ``G`` in the logits' dtype, written over ``logits`` (its columns
    past ``vocab``, padding of the Mosaic path, as zeros)."""
    cfg = o.config.gradient_in_forward
    rows, width = logits.shape
    a, b, c = coefficients
    kernel = functools.partial(
        _grads_kernel, block_n=cfg.block_n, block_v=cfg.block_v, vocab_size=vocab, width=width, softcap=o.softcap,
        has_b=b is not None, has_c=c is not None, has_bias=bias is not None,
    )
    extra = tuple(x for x in (b, c, bias) if x is not None)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(logits.shape, logits.dtype),
        grid=(rows // cfg.block_n, -(-width // cfg.block_v)), input_output_aliases={0: 0},
        compiler_params=triton_params(cfg), interpret=o.interpret, name="lce_gif_grads",
    )(logits, labels, lse, a, *extra)


# ------------------------------------------------------------------------------------------
# The chunk loop and the loss under custom_vjp
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
    """Static (hashable) options of one call."""

    ignore_index: int
    reduction: str
    chunk_rows: int
    config: BlockSizes
    interpret: bool
    softcap: float | None = None
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    mosaic: bool = False  # the chunks' logits from the Mosaic forward (logits_kernel_for)
    tail_rows: int = 16  # the partial chunk's size is a multiple of this (tail_rows_for)


def _scale(valid, reduction: str):
    """The upstream of every counted token: 1 (``"sum"``) or 1 / their count over the whole input (``"mean"``)."""
    if reduction == "sum":
        return jnp.float32(1.0)
    return 1.0 / jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)


def _padded_parameters(weight, bias32, o: _Options):
    """The weight ``(V, D)`` and float32 bias ``(V,)`` (or None) as the chunks read them: unchanged, or on
    the Mosaic path padded with zeros to whole ``block_v`` rows and ``block_k`` columns (no copy where
    the tiles divide them)."""
    if not o.mosaic:
        return weight, bias32
    m = o.config.mosaic
    (vocab, d) = weight.shape
    v_pad, d_pad = geometry.round_up(vocab, m.block_v), geometry.round_up(d, m.block_k)
    if weight.shape != (v_pad, d_pad):
        weight = jnp.pad(weight, ((0, v_pad - vocab), (0, d_pad - d)))
    if bias32 is not None and v_pad != vocab:
        bias32 = jnp.pad(bias32, (0, v_pad - vocab))
    return weight, bias32


def chunk_gradients(h, labels, scale, weight, bias32, o: _Options, *, vocab: int):
    """One chunk of tokens: its logits formed once, the loss and both gradients from them.

    Args:
        h: ``(rows, D)`` hidden rows (zeros for padding rows), ``rows`` a multiple of ``o.tail_rows``.
        labels: ``(rows,)`` int32, -1 (or any id outside ``[0, vocab)``) where a row has no target.
        scale: ``(rows,)`` float32 upstream per row: the reduction's factor, 0 where the row does not
            count, NaN for a row whose loss must be NaN.
        weight, bias32: from :func:`_padded_parameters` (``(V_pad, D_pad)``; ``(V_pad,)`` float32 or None).
        o: the call's options; vocab: the real vocabulary size.

    Returns:
        ``(loss_sum, d_h, d_weight_part, column_sums)``: the float32 sum of ``scale · loss`` over the counted
        rows; ``d_h`` ``(rows, D)`` in ``h``'s dtype; the chunk's ``d_weight`` product in the weight's dtype
        and shape; with a bias the float32 column sums of G ``(V_pad,)``, else None.
    """
    d, dtype = h.shape[1], h.dtype
    precision = matmul_precision(dtype)
    d_pad = weight.shape[1]
    if d_pad != d:
        h = jnp.pad(h, ((0, 0), (0, d_pad - d)))
    if o.mosaic:
        logits, (lse, target, row_sum) = chunk_logits_and_stats(
            h, labels, weight, bias32, vocab=vocab, config=o.config, interpret=o.interpret, softcap=o.softcap,
            row_sum=bool(o.label_smoothing))
    else:
        logits = jnp.dot(h, weight.T, preferred_element_type=dtype, precision=precision)
        lse, target, row_sum = _chunk_stats(logits, labels, bias32, o)
    loss = loss_terms(lse, target, row_sum, vocab, o.label_smoothing, o.lse_square_scale)
    loss_sum = jnp.sum(jnp.where(scale != 0.0, loss * scale, 0.0))  # a NaN row's scale keeps it NaN
    # Zero where the row does not count, even where its lse is not finite (the kernel then writes 0).
    coefficients = tuple(None if x is None else jnp.where(scale != 0.0, x, 0.0) for x in grad_coefficients(
        scale, None, lse, vocab, o.label_smoothing, o.lse_square_scale))
    g = _chunk_grads(logits, labels, lse, coefficients, bias32, vocab, o)
    d_h = jnp.dot(g, weight, preferred_element_type=dtype, precision=precision)[:, :d]
    # In the weight's dtype: the product (float32 inside) is added to the running sum with one rounding.
    product = lax.dot_general(g, h, (((0,), (0,)), ((), ())), preferred_element_type=weight.dtype,
                              precision=precision)
    column_sums = None if bias32 is None else jnp.sum(g, axis=0, dtype=jnp.float32)
    return loss_sum, d_h, product, column_sums


def _with_gradients(hidden, weight, bias, labels, nan_rows, o: _Options):
    """``(loss, d_hidden, d_weight, d_bias)`` of ``scale · Σ loss``; ``d_bias`` float32 (None without a bias).

    Only the counted rows are multiplied: they are taken in order (a stable partition of the rows),
    the partial chunk of ``n_counted mod chunk_rows`` rows first (or a whole one where that is 0),
    rounded up to ``o.tail_rows`` (``lax.switch`` over the possible sizes; its products start
    ``d_weight``), then the remaining whole chunks (a loop of dynamic length). Each chunk gathers its rows
    of ``hidden`` and scatters its ``d_hidden`` rows back; the ignored rows stay 0.
    """
    (n, d), vocab, dtype = hidden.shape, weight.shape[0], hidden.dtype
    valid = labels != o.ignore_index
    # Upstream per row, folded into G before its rounding: scale, 0 (ignored), NaN (nan_rows).
    row_scale = jnp.where(nan_rows, jnp.nan, jnp.where(valid, _scale(valid, o.reduction), 0.0))
    counted = row_scale != 0.0  # a NaN row counts
    n_counted = jnp.sum(counted, dtype=jnp.int32)
    rows, step = o.chunk_rows, o.tail_rows
    # Row indices, counted rows first; past N: index N (gathers zeros, scatters nothing).
    order = jnp.argsort(jnp.logical_not(counted), stable=True).astype(jnp.int32)
    order = jnp.concatenate([order, jnp.full((rows + step,), n, jnp.int32)])
    kernel_labels = jnp.where(valid, labels, -1).astype(jnp.int32)  # a valid row always counts
    bias32 = None if bias is None else bias.astype(jnp.float32)
    weight, bias32 = _padded_parameters(weight, bias32, o)

    def chunk(start, size, state):
        """The ``size`` rows of ``order[start:]``: their loss added, their ``d_hidden`` rows scattered, their
        ``d_weight`` (and ``d_bias``) products added to the state's (started when those are None)."""
        total, d_hidden, d_weight, d_bias = state
        index = lax.dynamic_slice_in_dim(order, start, size)
        h = jnp.take(hidden, index, axis=0, mode="fill", fill_value=0)
        y = jnp.take(kernel_labels, index, mode="fill", fill_value=-1)
        s = jnp.take(row_scale, index, mode="fill", fill_value=0.0)
        loss_sum, d_h, product, column_sums = chunk_gradients(h, y, s, weight, bias32, o, vocab=vocab)
        total = total + loss_sum
        d_hidden = d_hidden.at[index].set(d_h, mode="drop", unique_indices=True)
        d_weight = product if d_weight is None else d_weight + product
        if bias32 is not None:
            d_bias = column_sums if d_bias is None else d_bias + column_sums
        return total, d_hidden, d_weight, d_bias

    whole = n_counted // rows
    tail = n_counted - whole * rows
    borrow = (tail == 0) & (whole > 0)  # a whole chunk is the first one then: d_weight is never zero-filled
    tail, whole = jnp.where(borrow, rows, tail), whole - borrow.astype(jnp.int32)
    tail_steps = (tail + step - 1) // step  # 0 … ceil(rows / step)
    start = (jnp.float32(0.0), jnp.zeros((n, d), dtype), None, None)

    def no_tail():
        zeros = jnp.zeros(weight.shape, weight.dtype)
        return (*start[:2], zeros, None if bias32 is None else jnp.zeros(bias32.shape, jnp.float32))

    branches = [no_tail] + [functools.partial(chunk, 0, k * step, start) for k in range(1, -(-rows // step) + 1)]
    state = lax.switch(tail_steps, branches)
    first = tail_steps * step
    state = lax.fori_loop(0, whole, lambda i, state: chunk(first + i * rows, rows, state), state)
    total, d_hidden, d_weight, d_bias = state
    if d_weight.shape != (vocab, d):  # the Mosaic path's padding
        d_weight, d_bias = d_weight[:vocab, :d], (None if d_bias is None else d_bias[:vocab])
    return total, d_hidden, d_weight, d_bias


def _forward_only(hidden, weight, bias, labels, nan_rows, o: _Options):
    per_token = pallas_loss(hidden, weight, labels, o.ignore_index, bias=bias, softcap=o.softcap,
                            label_smoothing=o.label_smoothing, lse_square_scale=o.lse_square_scale,
                            interpret=o.interpret, config=o.config)
    valid = labels != o.ignore_index
    return jnp.sum(jnp.where(nan_rows, jnp.nan, per_token)) * _scale(valid, o.reduction)


def _gradients(hidden, weight, bias, labels, nan_rows, o: _Options):
    """:func:`_with_gradients` with the saved gradients in the parameters' dtypes, differentiable once only."""

    def run(h, w, b, y, bad):
        total, d_hidden, d_weight, d_bias = _with_gradients(h, w, b, y, bad, o)
        return total, d_hidden, d_weight, (None if b is None else d_bias.astype(b.dtype))

    return _first_order_only(run)(hidden, weight, bias, labels, nan_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _loss(hidden, weight, bias, labels, nan_rows, o: _Options):
    return _forward_only(hidden, weight, bias, labels, nan_rows, o)


def _loss_fwd(hidden, weight, bias, labels, nan_rows, o: _Options):
    total, *grads = _gradients(hidden, weight, bias, labels, nan_rows, o)
    return total, tuple(grads)


def _loss_bwd(o: _Options, residuals, grad):
    return (*scaled_by_upstream(residuals, grad), None, None)


_loss.defvjp(_loss_fwd, _loss_bwd)


def _options(hidden, weight, ignore_index, reduction, config, interpret, softcap, label_smoothing,
             lse_square_scale, has_bias) -> _Options:
    if reduction not in REDUCTIONS:
        raise ValueError(f"the gradient-in-forward path needs reduction in {REDUCTIONS}, got {reduction!r}")
    if not isinstance(config, BlockSizes):
        raise TypeError(f"config must be a jax_heads.pallas.BlockSizes, got {type(config).__name__}")
    rows = chunk_rows_for(hidden.shape[0], weight.shape[0], hidden.dtype, config.gradient_in_forward)
    mosaic = logits_kernel_for(hidden.dtype, config, bool(interpret), has_bias) == "mosaic"
    granule = config.gradient_in_forward.block_n
    if mosaic:  # whole Mosaic token blocks
        granule = math.lcm(granule, config.mosaic.block_n)
        rows = geometry.round_up(rows, granule)
    return _Options(int(ignore_index), reduction, rows, config, bool(interpret), LogitOptions(softcap).softcap,
                    float(label_smoothing), float(lse_square_scale), mosaic,
                    tail_rows_for(rows, granule, config.gradient_in_forward))


def gradient_in_forward_loss(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    ignore_index: int,
    reduction: str,
    *,
    bias: jax.Array | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    interpret: bool = False,
    config: BlockSizes = DEFAULT_BLOCK_SIZES,
    nan_rows: jax.Array | None = None,
) -> jax.Array:
    """Summed or mean linear cross-entropy of flat inputs, its gradients formed in the forward pass.

    Args:
        hidden: ``(N, D)`` float16/bfloat16/float32.
        weight: ``(V, D)``, same dtype.
        labels: ``(N,)`` integer, each in ``[0, V)`` or ``ignore_index`` (validated by the caller).
        ignore_index: label value with loss 0 and gradient 0.
        reduction: ``"sum"`` or ``"mean"`` (over the non-ignored tokens; 0 when all are ignored).
        bias, softcap, label_smoothing, lse_square_scale: the loss options of
            :func:`jax_heads.linear_cross_entropy` (validated by the caller). No ``return_lse``
            and no gradient filtering (module docstring).
        interpret: run the kernels in Pallas interpret mode (CPU tests).
        config: tiles, launch options and ``config.gradient_in_forward.logits_budget_bytes``.
        nan_rows: ``(N,)`` bool or None: tokens whose loss and gradient rows are to be NaN (the
            caller's out-of-range labels under a transformation).

    Returns:
        A float32 scalar, differentiable once in ``hidden``, ``weight`` and ``bias`` (gradients in
        their dtypes).

    Raises:
        ValueError: ``reduction`` is not ``"sum"``/``"mean"``; a bad ``softcap``.
        TypeError: ``config`` is not a :class:`~jax_heads.pallas.BlockSizes`.
        NotImplementedError: when differentiated a second time.
    """
    o = _options(hidden, weight, ignore_index, reduction, config, interpret, softcap, label_smoothing,
                 lse_square_scale, bias is not None)
    if hidden.shape[0] == 0 or weight.shape[0] == 0:  # nothing to launch; the exact path gives the zeros
        return _forward_only(hidden, weight, bias, labels, jnp.zeros(labels.shape, bool), o)
    return _loss(hidden, weight, bias, labels, jnp.zeros(labels.shape, bool) if nan_rows is None else nan_rows, o)


def gradient_in_forward_grads(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    ignore_index: int,
    reduction: str,
    *,
    bias: jax.Array | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    interpret: bool = False,
    config: BlockSizes = DEFAULT_BLOCK_SIZES,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """The reduced loss and its three gradients for an upstream of 1, in one pass (torch's ``impl="pallas"``).

    Args: as :func:`gradient_in_forward_loss` (``N`` and ``V`` at least 1).

    Returns:
        ``(loss, d_hidden, d_weight, d_bias)``: a float32 scalar, ``(N, D)`` in hidden's dtype,
        ``(V, D)`` in weight's dtype and ``(V,)`` in bias's dtype (None without a bias).
    """
    o = _options(hidden, weight, ignore_index, reduction, config, interpret, softcap, label_smoothing,
                 lse_square_scale, bias is not None)
    return _gradients(hidden, weight, bias, labels, jnp.zeros(labels.shape, bool), o)
