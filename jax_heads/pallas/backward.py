"""The backward: the gradient-logits kernel and the loop over vocabulary chunks.

Per vocabulary chunk of ``chunk_v`` rows, the ``lce_grad_logits`` kernel recomputes the logits tile
by tile and writes ``g * (softmax - onehot)`` for that chunk (``(N, chunk_v)`` in the input dtype,
with the chunk's buffers at most ``BackwardConfig.chunk_bytes``); two matrix products then add the
chunk's share to ``d_hidden`` (a float32 ``(N, D)`` accumulator) and give ``d_weight`` for the
chunk's rows. With the forward, 8·N·D·V FLOPs in all, no tokens × vocabulary buffer, no atomics
(``docs/kernel-notes.md`` says why this split). The products are XLA's, or with gradient filtering
the block-sparse ones of ``filtered.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jax_heads.pallas.config import BackwardConfig, BlockSizes, matmul_precision, triton_params
from jax_heads.pallas.epilogue import LOG2E, softcap_and_derivative
from jax_heads.pallas.filtered import add_skipped_targets, sparse_products
from jax_heads.pallas.mosaic_backward import backward_kernel_for, grad_logits_call
from jax_heads.pallas.plan import Plan, sm_count


def _logits_tile(h_ref, w_ref, n0, v0, *, block_n, block_v, block_d, precision):
    """float32 ``(block_n, block_v)`` logits of rows ``n0:`` against vocabulary rows ``v0:``."""
    num_d = h_ref.shape[1] // block_d

    def step(k, acc):
        d0 = pl.multiple_of(k * block_d, block_d)
        h = h_ref[pl.ds(n0, block_n), pl.ds(d0, block_d)]
        w = w_ref[pl.ds(v0, block_v), pl.ds(d0, block_d)]
        return acc + lax.dot_general(
            h, w, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )

    return lax.fori_loop(0, num_d, step, jnp.zeros((block_n, block_v), jnp.float32))


def _grad_logits_kernel(
    bounds_ref, h_ref, w_ref, y_ref, lse_ref, g_ref, *refs, block_n, block_v, block_d, vocab_size, precision,
    filter_eps, separate_targets=False, coefficients=0, has_bias=False, softcap=None,
):
    """One (token block, vocabulary tile) of a chunk: ``g * (softmax - onehot)``.

    The chunk covers vocabulary rows ``start : start + chunk_v`` with ``(lo, start, dense) = bounds_ref``;
    columns below ``lo`` (done by the previous chunk) and at or past the real vocabulary size are
    written as zeros.

    With ``filter_eps`` (gradient filtering) a second output flags the tiles that matter: a tile
    whose ``|softmax - onehot|`` is below ``filter_eps`` everywhere on counted rows (``g != 0``) —
    so it holds no target of a counted row — gets flag 0 and is not written at all; the two
    filtered products read only flagged tiles. With ``separate_targets`` the test is on the
    probabilities alone (``|softmax|`` below ``filter_eps``): a tile holding targets but only small
    probabilities is skipped too, and the caller adds those targets' ``−g`` entries exactly. With
    ``dense`` set, an unflagged tile is written as zeros instead, so that dense products of the
    chunk give the filtered values.

    Options (static; the default program has none of their operations): ``coefficients`` (1 or 2:
    that many more ``(n_pad,)`` float32 refs, B then C, follow ``g_ref``, which holds A: the tile is
    ``p·A − B·onehot (− C)``), ``has_bias`` (a float32 ``(v_pad,)`` bias ref follows, added to the
    logits), ``softcap`` (logits ``z' = c·tanh(z / c)``, the tile times ``1 − tanh²(z / c)``; both from
    one ``exp2``, :mod:`jax_heads.pallas.epilogue`).
    """
    b_ref, c_ref = (tuple(refs[:coefficients]) + (None, None))[:2]
    refs = refs[coefficients:]
    bias_ref, out_refs = (refs[0], refs[1:]) if has_bias else (None, refs)
    i, j = pl.program_id(0), pl.program_id(1)
    lo, start = bounds_ref[0], bounds_ref[1]
    n0 = pl.multiple_of(i * block_n, block_n)
    c0 = pl.multiple_of(j * block_v, block_v)
    v0 = start + c0
    logits = _logits_tile(h_ref, w_ref, n0, v0, block_n=block_n, block_v=block_v, block_d=block_d, precision=precision)
    if has_bias:
        logits = logits + bias_ref[pl.ds(pl.multiple_of(v0, block_v), block_v)][None, :]
    # p = exp(z' − lse) as exp2((z' − lse)·log2(e)): the difference first (exact near the row maximum,
    # where z'·log2(e) − lse·log2(e) would round each term at |z'|·2⁻²⁴), then one multiply and ex2.
    lse = lse_ref[pl.ds(n0, block_n)]
    if softcap is None:
        probs = jnp.exp2((logits - lse[:, None]) * LOG2E)
    else:  # z' = c·tanh(z / c) and its derivative from one exp2 (epilogue.py)
        capped, slope = softcap_and_derivative(logits, softcap)
        probs = jnp.exp2((capped - lse[:, None]) * LOG2E)
    g = g_ref[pl.ds(n0, block_n)]
    labels = y_ref[pl.ds(n0, block_n)]
    # Column indices relative to v0: a (1, block_v) row for the masks, compared with each row's label − v0.
    col = lax.broadcasted_iota(jnp.int32, (1, block_v), 1)
    hit = col == (labels - v0)[:, None]
    in_vocab = (col >= lo - v0) & (col < vocab_size - v0)
    b = None if b_ref is None else b_ref[pl.ds(n0, block_n)]
    # dL/dz' = p·A − B·[v == y] − C (A = B = g, C = 0 without coefficients)
    value = probs * g[:, None] - jnp.where(hit, (g if b is None else b)[:, None], 0.0)
    if c_ref is not None:
        value = value - c_ref[pl.ds(n0, block_n)][:, None]
    if softcap is not None:  # d(c·tanh(z/c))/dz = 1 − tanh²(z/c)
        value = value * slope
    grad = jnp.where(in_vocab, value, 0.0).astype(out_refs[0].dtype)
    if filter_eps is None:
        out_refs[0][pl.ds(n0, block_n), pl.ds(c0, block_v)] = grad
        return
    out_ref, flag_ref = out_refs
    # A row counts when its gradient can be non-zero; a NaN upstream gradient counts (NaN != 0).
    live = (g != 0.0) if b is None else (g != 0.0) | (b != 0.0)
    finite = (g == g) if b is None else (g == g) & (b == b)
    counted = in_vocab & live[:, None]
    value = probs if separate_targets else jnp.abs(probs - jnp.where(hit, 1.0, 0.0))
    # "not below eps" rather than ">= eps": a NaN (a non-finite hidden state or upstream gradient)
    # keeps its tile, so it reaches the gradients as in the exact path instead of being skipped.
    big = counted & jnp.logical_not((value < filter_eps) & finite[:, None])
    flag = jnp.max(jnp.where(big, jnp.int32(1), jnp.int32(0)))
    keep = flag > 0
    flag_ref[i, j] = flag

    @pl.when(keep | (bounds_ref[2] != 0))
    def _():
        out_ref[pl.ds(n0, block_n), pl.ds(c0, block_v)] = jnp.where(keep, grad, jnp.zeros_like(grad))


def _unfilled(shape, dtype):
    """An array the caller writes in full: no fill on the GPU (``lax.empty``; zeros elsewhere)."""
    return lax.empty(shape, dtype)


def chunk_v_for(plan: Plan, config: BackwardConfig, itemsize: int) -> int:
    """Vocabulary rows per backward chunk within ``config.chunk_bytes``: a multiple of
    ``config.chunk_multiple`` where that is a whole number of ``plan.block_v`` tiles and fits, else
    whole tiles; at least one tile, at most ``plan.v_pad``.

    Per vocabulary row a chunk holds its gradient-logits column (``n_pad`` values) and ``d_pad``
    values: first the copy of the chunk's weight rows that the ``d_hidden`` product reads, then (in
    the same memory: the products are ordered) the chunk's ``d_weight`` product before it is
    copied into place.
    """
    per_row = (plan.n_pad + plan.d_pad) * itemsize
    fit = config.chunk_bytes // per_row
    rows = fit // config.chunk_multiple * config.chunk_multiple
    if rows == 0 or rows % plan.block_v:
        rows = fit // plan.block_v * plan.block_v
    return int(min(plan.v_pad, max(plan.block_v, rows)))


def backward(
    hidden, weight, labels, lse, g, *, plan: Plan, config: BlockSizes, interpret: bool,
    filter_eps: float | None = None, separate_targets: bool = False, coefficients=None, bias=None,
    softcap: float | None = None,
):
    """``(d_hidden, d_weight)`` of padded inputs for per-token upstream gradient ``g`` (0 where ignored).

    Args:
        hidden, weight, labels: padded to ``plan`` (:func:`jax_heads.pallas.plan.pad_inputs`); a label
            outside ``[0, plan.v)`` has no target.
        lse: ``(n_pad,)`` float32 log-sum-exp the softmax is taken against.
        g: ``(n_pad,)`` float32 upstream gradient, 0 at ignored and padded rows; with
            ``coefficients`` the per-row A of ``dL/dz' = p·A − B·onehot − C``.
        plan, config, interpret: geometry, tiles, Pallas interpret mode.
        filter_eps, separate_targets: gradient filtering (None: exact).
        coefficients: None (``A = B = g``, ``C = 0``) or ``(B, C)``, each ``(n_pad,)`` float32; ``C`` may
            be None (0: the kernel then has no ``C`` term).
        bias: None or ``(v_pad,)`` float32 added to the logits (its gradient is then returned too).
        softcap: None or ``c``: the logits are ``c·tanh(z / c)``.

    Returns:
        ``d_hidden`` ``(n_pad, d_pad)`` in hidden's dtype and ``d_weight`` ``(v_pad, d_pad)`` in
        weight's dtype; with ``bias`` also ``d_bias`` ``(v_pad,)`` float32 (the column sums of G).

    The vocabulary is walked in ``ceil(v_pad / chunk_v)`` chunks of ``chunk_v`` rows: per chunk,
    the gradient logits ``G_c`` ``(N_pad, chunk_v)`` in the input dtype, ``d_hidden += G_c @ W_c``
    into a float32 accumulator and ``d_weight[c] = G_cᵀ @ H`` in the weight dtype (the product
    accumulates in float32 and is complete for its rows: every token is in it; ``d_weight`` is
    allocated without a fill, every row is written once). When ``chunk_v`` does not divide the
    vocabulary, the last chunk is placed at ``v_pad − chunk_v``, overlapping the one before: its
    kernel writes zeros for the columns already done, which then add nothing to ``d_hidden``, and
    only its new rows are written to ``d_weight``. Every chunk has one shape, so the loop's buffers
    are all there is (no separate tail buffers).

    Exact (``filter_eps`` None): the two products are XLA matrix products. Filtered: the
    gradient-logits kernel also flags the tiles that hold a value ≥ ``filter_eps``, and two Pallas
    kernels form the products from flagged tiles only (block-sparse), skipping the rest; a chunk
    after one with more than ``config.filtered.dense_above`` of its tiles flagged uses the dense
    products on a gradient-logits block whose unflagged tiles are zeros (the same values, the dense
    rate). With ``separate_targets`` a tile is flagged on its probabilities alone, and the targets
    that fell in unflagged tiles get their ``−g`` entries afterwards, exactly.
    """
    bwd = config.backward
    separate_targets = bool(separate_targets) and filter_eps is not None
    dtype = hidden.dtype
    precision = matmul_precision(dtype)
    chunk_v = chunk_v_for(plan, bwd, jnp.dtype(dtype).itemsize)
    num_chunks = -(-plan.v_pad // chunk_v)
    tiles = chunk_v // bwd.block_v
    n_blocks = plan.n_pad // bwd.block_n

    kernel = backward_kernel_for(dtype, plan, config, interpret, filtered=filter_eps is not None)
    if kernel == "mosaic":  # the same arguments and result (mosaic_backward.py); it reads B and C both
        extra_rows = () if coefficients is None else tuple(jnp.zeros_like(g) if x is None else x for x in coefficients)
        grad_logits = grad_logits_call(
            plan, config.mosaic, chunk_v=chunk_v, dtype=dtype, sm_count=config.sm_count or sm_count(),
            interpret=interpret, coefficients=coefficients is not None, has_bias=bias is not None, softcap=softcap,
        )
    else:
        extra_rows = () if coefficients is None else tuple(x for x in coefficients if x is not None)  # B[, C]
        grad_logits = pl.pallas_call(
            functools.partial(
                _grad_logits_kernel, block_n=bwd.block_n, block_v=bwd.block_v, block_d=plan.bwd_block_d,
                vocab_size=plan.v, precision=precision, filter_eps=filter_eps, separate_targets=separate_targets,
                coefficients=len(extra_rows), has_bias=bias is not None, softcap=softcap,
            ),
            out_shape=(
                jax.ShapeDtypeStruct((plan.n_pad, chunk_v), dtype),
                *(() if filter_eps is None else (jax.ShapeDtypeStruct((n_blocks, tiles), jnp.int32),)),
            ),
            grid=(n_blocks, tiles),
            compiler_params=triton_params(bwd),
            interpret=interpret,
            name="lce_grad_logits" if filter_eps is None else "lce_grad_logits_filtered",
        )
    if filter_eps is not None:
        d_hidden_product, d_weight_product = sparse_products(
            plan, bwd, config.filtered, chunk_v=chunk_v, dtype=weight.dtype, precision=precision, interpret=interpret
        )

    row_block = lax.broadcasted_iota(jnp.int32, labels.shape, 0) // bwd.block_n  # each token's flag row
    dense_above = None if filter_eps is None else config.filtered.dense_above
    if dense_above:  # chunks choose between dense and sparse products at run time
        # Token blocks holding a counted row: the share of flagged tiles is taken over these only (a
        # block of ignored or padding rows is never flagged, and would otherwise dilute the share).
        active_blocks = jnp.any((g != 0).reshape(n_blocks, bwd.block_n), axis=1)
        active_tiles = jnp.maximum(jnp.sum(active_blocks.astype(jnp.float32)), 1.0) * tiles

    def dense_products(gl, start, d_hidden):
        w_chunk = lax.dynamic_slice_in_dim(weight, start, chunk_v, axis=0)  # XLA copies these rows
        d_hidden = d_hidden + jnp.dot(gl, w_chunk, preferred_element_type=jnp.float32, precision=precision)
        # The d_weight product after the d_hidden one: the weight rows' copy is dead before the
        # product's (chunk_v, D) result is allocated, so the two share memory.
        gl, d_hidden = lax.optimization_barrier((gl, d_hidden))
        dw_chunk = lax.dot_general(
            gl, hidden, (((0,), (0,)), ((), ())), preferred_element_type=weight.dtype, precision=precision
        )
        return d_hidden, dw_chunk

    def filtered_products(gl, flags, d_hidden, bounds):
        return d_hidden_product(bounds, flags, gl, weight, d_hidden), d_weight_product(flags, gl, hidden)

    extra = (*extra_rows, *(() if bias is None else (bias,)))

    def body(k, carry):
        d_hidden, d_weight, target_kept, dense, *d_bias = carry
        lo = k * chunk_v
        start = jnp.minimum(lo, plan.v_pad - chunk_v)  # the last chunk may overlap the one before
        bounds = jnp.stack([lo, start, dense]).astype(jnp.int32)
        if filter_eps is None:
            (gl,) = grad_logits(bounds, hidden, weight, labels, lse, g, *extra)
            d_hidden, dw_chunk = dense_products(gl, start, d_hidden)
        else:
            gl, flags = grad_logits(bounds, hidden, weight, labels, lse, g, *extra)
            if dense_above is None:
                d_hidden, dw_chunk = filtered_products(gl, flags, d_hidden, bounds)
            elif dense_above == 0:
                d_hidden, dw_chunk = dense_products(gl, start, d_hidden)
            else:  # chosen from the previous chunk's share of flagged tiles (this one's G is written for it)
                d_hidden, dw_chunk = lax.cond(
                    dense != 0,
                    lambda: dense_products(gl, start, d_hidden),
                    lambda: filtered_products(gl, flags, d_hidden, bounds),
                )
                dense = (jnp.sum(flags.astype(jnp.float32)) / active_tiles > dense_above).astype(jnp.int32)
            if separate_targets:  # was each token's target tile (if in this chunk's new columns) flagged?
                in_chunk = (labels >= lo) & (labels < start + chunk_v)
                tile = jnp.clip((labels - start) // bwd.block_v, 0, tiles - 1)
                target_kept = jnp.where(in_chunk, flags[row_block, tile], target_kept)
        # Rows below `lo` (an overlapping last chunk's, whose product has zeros there) keep the previous
        # chunk's values; every other row is written once (d_weight starts unfilled).
        old = lax.dynamic_slice_in_dim(d_weight, start, chunk_v, axis=0)
        new_rows = lax.broadcasted_iota(jnp.int32, (chunk_v, 1), 0) >= lo - start
        d_weight = lax.dynamic_update_slice_in_dim(d_weight, jnp.where(new_rows, dw_chunk, old), start, axis=0)
        if bias is not None:  # d_bias = Σ_rows G; unflagged tiles of a filtered chunk are not written
            kept = gl if filter_eps is None else jnp.where(
                jnp.repeat(jnp.repeat(flags != 0, bwd.block_n, axis=0), bwd.block_v, axis=1), gl, 0)
            old = lax.dynamic_slice_in_dim(d_bias[0], start, chunk_v)
            d_bias = [lax.dynamic_update_slice_in_dim(d_bias[0], old + jnp.sum(kept, 0, jnp.float32), start, 0)]
        return d_hidden, d_weight, target_kept, dense, *d_bias

    init = (
        jnp.zeros((plan.n_pad, plan.d_pad), jnp.float32),
        _unfilled((plan.v_pad, plan.d_pad), weight.dtype),  # every row is written once
        jnp.ones(labels.shape, jnp.int32),
        jnp.int32(dense_above == 0),  # the first chunk: sparse unless every chunk is dense
        *(() if bias is None else (jnp.zeros((plan.v_pad,), jnp.float32),)),
    )
    d_hidden, d_weight, target_kept, _, *d_bias = lax.fori_loop(0, num_chunks, body, init)
    if separate_targets:
        b = g if coefficients is None else coefficients[0]
        live = (g != 0) if coefficients is None else (g != 0) | (b != 0)
        skipped = (labels >= 0) & (labels < plan.v) & live & (target_kept == 0)
        d_hidden, d_weight, *d_bias = add_skipped_targets(
            hidden, weight, labels, jnp.where(skipped, b, 0.0), d_hidden, d_weight, plan,
            bias=bias, softcap=softcap, d_bias=d_bias[0] if d_bias else None,
        )
    return (d_hidden.astype(dtype), d_weight, *d_bias)
