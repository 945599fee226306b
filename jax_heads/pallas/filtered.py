"""The filtered backward's two block-sparse products and the exact re-add of skipped targets.

With gradient filtering the gradient-logits kernel (``backward.py``) also flags, per token block
and vocabulary tile, whether the tile holds a value that matters; an unflagged tile is never
written. The two products below read flagged tiles only:

* ``d_hidden[n-block, d-block] += Σ_tiles G[n-block, tile] @ W[tile, d-block]``
* ``d_weight[rows, d-block] = Σ_token-blocks G[block, rows]ᵀ @ H[block, d-block]``

With ``separate_targets`` the filter judges a tile by its probabilities alone, and the targets that
fell in unflagged tiles get their ``−g`` entries afterwards, exactly (:func:`add_skipped_targets`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jax_heads.pallas.config import BackwardConfig, FilterConfig, triton_params
from jax_heads.pallas.plan import Plan, pick_block_d


def _filtered_dh_kernel(
    bounds_ref, flag_ref, gl_ref, w_ref, acc_ref, out_ref, *, block_n, block_v, block_k, block_dd, num_tiles,
    precision
):
    """``d_hidden[n-block, d-block] += Σ_tiles G[n-block, tile] @ W[tile, d-block]`` over flagged tiles.

    The accumulator block is read and written only when some tile of the chunk is flagged for this
    token block (the output aliases the accumulator, so an untouched block keeps its value).
    """
    i, k = pl.program_id(0), pl.program_id(1)
    start = bounds_ref[1]
    n0 = pl.multiple_of(i * block_n, block_n)
    d0 = pl.multiple_of(k * block_dd, block_dd)

    def tile(t, acc):
        def add(acc):
            def step(kk, acc):
                c0 = pl.multiple_of(t * block_v + kk * block_k, block_k)
                gt = gl_ref[pl.ds(n0, block_n), pl.ds(c0, block_k)]
                wt = w_ref[pl.ds(pl.multiple_of(start + c0, block_k), block_k), pl.ds(d0, block_dd)]
                return acc + lax.dot_general(
                    gt, wt, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
                )

            return lax.fori_loop(0, block_v // block_k, step, acc)

        return lax.cond(flag_ref[i, t] != 0, add, lambda acc: acc, acc)

    any_flag = lax.fori_loop(0, num_tiles, lambda t, a: jnp.maximum(a, flag_ref[i, t]), jnp.int32(0))

    @pl.when(any_flag != 0)
    def _():
        acc = acc_ref[pl.ds(n0, block_n), pl.ds(d0, block_dd)]
        out_ref[pl.ds(n0, block_n), pl.ds(d0, block_dd)] = lax.fori_loop(0, num_tiles, tile, acc)


def _filtered_dw_kernel(
    flag_ref, gl_ref, h_ref, out_ref, *, block_n, block_rows, block_v, block_k, block_dd, num_blocks, precision
):
    """``d_weight[rows, d-block] = Σ_token-blocks G[block, rows]ᵀ @ H[block, d-block]`` over flagged tiles."""
    r, k = pl.program_id(0), pl.program_id(1)
    c0 = pl.multiple_of(r * block_rows, block_rows)
    d0 = pl.multiple_of(k * block_dd, block_dd)
    t = c0 // block_v

    def block(i, acc):
        def add(acc):
            def step(kk, acc):
                n0 = pl.multiple_of(i * block_n + kk * block_k, block_k)
                gt = gl_ref[pl.ds(n0, block_k), pl.ds(c0, block_rows)]
                ht = h_ref[pl.ds(n0, block_k), pl.ds(d0, block_dd)]
                return acc + lax.dot_general(
                    gt, ht, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
                )

            return lax.fori_loop(0, block_n // block_k, step, acc)

        return lax.cond(flag_ref[i, t] != 0, add, lambda acc: acc, acc)

    acc = lax.fori_loop(0, num_blocks, block, jnp.zeros((block_rows, block_dd), jnp.float32))
    out_ref[pl.ds(c0, block_rows), pl.ds(d0, block_dd)] = acc.astype(out_ref.dtype)


def sparse_products(plan: Plan, backward: BackwardConfig, filtered: FilterConfig, *, chunk_v: int, dtype,
                    precision, interpret: bool):
    """The two block-sparse products of one chunk, as ``(d_hidden_product, d_weight_product)``.

    * ``d_hidden_product(bounds, flags, G, weight, d_hidden)``: ``d_hidden`` ``(n_pad, d_pad)``
      float32 plus the chunk's share (``bounds = (lo, start, dense)`` as for the gradient logits);
    * ``d_weight_product(flags, G, hidden)``: the chunk's ``(chunk_v, d_pad)`` weight-gradient
      rows in ``dtype``.

    ``G`` is the chunk's ``(n_pad, chunk_v)`` gradient logits, ``flags`` its
    ``(n_pad / backward.block_n, chunk_v / backward.block_v)`` int32 tile flags.
    """
    tiles = chunk_v // backward.block_v
    n_blocks = plan.n_pad // backward.block_n
    block_dd = pick_block_d(plan.d_pad, filtered.block_d)
    block_rows = min(filtered.block_rows, backward.block_v)
    block_k = min(filtered.block_k, backward.block_v, backward.block_n)
    d_hidden_product = pl.pallas_call(
        functools.partial(
            _filtered_dh_kernel, block_n=backward.block_n, block_v=backward.block_v, block_k=block_k,
            block_dd=block_dd, num_tiles=tiles, precision=precision,
        ),
        out_shape=jax.ShapeDtypeStruct((plan.n_pad, plan.d_pad), jnp.float32),
        grid=(n_blocks, plan.d_pad // block_dd),
        input_output_aliases={4: 0},
        compiler_params=triton_params(filtered),
        interpret=interpret,
        name="lce_filtered_d_hidden",
    )
    d_weight_product = pl.pallas_call(
        functools.partial(
            _filtered_dw_kernel, block_n=backward.block_n, block_rows=block_rows, block_v=backward.block_v,
            block_k=block_k, block_dd=block_dd, num_blocks=n_blocks, precision=precision,
        ),
        out_shape=jax.ShapeDtypeStruct((chunk_v, plan.d_pad), dtype),
        grid=(chunk_v // block_rows, plan.d_pad // block_dd),
        compiler_params=triton_params(filtered),
        interpret=interpret,
        name="lce_filtered_d_weight",
    )
    return d_hidden_product, d_weight_product


def add_skipped_targets(hidden, weight, labels, g_skipped, d_hidden, d_weight, plan: Plan, rows=1024, *,
                        bias=None, softcap=None, d_bias=None):
    """Add ``−g`` at each target whose tile the filter skipped: ``d_hidden[n] −= g_n · W[y_n]``
    (float32 accumulator) and ``d_weight[y_n] −= g_n · h_n``.

    Tokens sharing a target are summed in float32 before the weight row is touched: the tokens are
    sorted by target and walked ``rows`` at a time, each chunk's equal targets segment-summed, and
    each touched row rounded to the weight dtype once per chunk it appears in (a target's tokens are
    contiguous after the sort, so at most ``ceil(count / rows) + 1`` times).

    With ``softcap`` the entry is ``−g · (1 − (z'_y / c)²)``, the target logit ``z_y = h · W[y] (+ b[y])``
    recomputed in float32; with ``bias`` (float32 ``(v_pad,)``) the float32 ``d_bias`` gets the entries
    too and is returned third.
    """
    safe = jnp.clip(labels, 0, plan.v - 1)
    w_target = weight[safe].astype(jnp.float32)
    if softcap is not None:
        z = jnp.sum(hidden.astype(jnp.float32) * w_target, axis=1) + (0.0 if bias is None else bias[safe])
        g_skipped = g_skipped * (1.0 - jnp.square(jnp.tanh(z / softcap)))
    if d_bias is not None:
        d_bias = d_bias.at[safe].add(-g_skipped)
    d_hidden = d_hidden - g_skipped[:, None] * w_target
    sentinel = plan.v_pad  # out of range: dropped by the scatter
    key = jnp.where(g_skipped != 0, safe, sentinel)
    order = jnp.argsort(key)
    pad = -labels.shape[0] % rows
    order = jnp.pad(order, (0, pad))
    keys = jnp.pad(key[order[: labels.shape[0]]], (0, pad), constant_values=sentinel)
    num = order.shape[0] // rows

    def chunk(c, d_weight):
        idx = lax.dynamic_slice_in_dim(order, c * rows, rows)
        k = lax.dynamic_slice_in_dim(keys, c * rows, rows)
        upd = -(g_skipped[idx][:, None] * hidden[idx].astype(jnp.float32))
        first = jnp.concatenate([jnp.ones((1,), bool), k[1:] != k[:-1]])
        seg = jnp.cumsum(first) - 1
        sums = jax.ops.segment_sum(upd, seg, num_segments=rows)
        seg_key = jnp.full((rows,), sentinel, k.dtype).at[seg].set(k)
        current = d_weight.at[seg_key].get(mode="fill", fill_value=0).astype(jnp.float32)
        return d_weight.at[seg_key].set((current + sums).astype(d_weight.dtype), mode="drop")

    d_weight = lax.fori_loop(0, num, chunk, d_weight)
    return (d_hidden, d_weight) if d_bias is None else (d_hidden, d_weight, d_bias)
