"""The Triton-backend forward kernel: per-split partial log-sum-exp and target logit.

A grid of (token block × vocabulary split). Each program walks the vocabulary tiles of its split,
computes a ``(block_n, block_v)`` tile of logits over all of ``D`` in ``block_d`` steps (float32
accumulation), and keeps an online log-sum-exp (running max and sum of exponentials) and the
target logit. The partials of the splits are combined by the caller
(:func:`jax_heads.pallas.op.combine_partials`). Splitting the vocabulary fills the GPU when there
are few token blocks. Kernels index rows and columns, never ``N × V`` flat offsets; the largest
flat offset is into the ``(V, D)`` weight.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jax_heads.pallas.config import PLAIN_LOGITS, LogitOptions, TritonForwardConfig, matmul_precision, triton_params
from jax_heads.pallas.epilogue import LOG2E, softcapped
from jax_heads.pallas.plan import Plan, choose_splits

_NEG_INF = float("-inf")


def _forward_kernel(
    h_ref, w_ref, y_ref, *refs, block_n, block_v, block_d, tiles_per_split, num_tiles, vocab_size, precision,
    has_bias=False, softcap=None, row_sum=False,
):
    """One (token block, vocabulary split): partial max, sum of exp and target logit per token.

    One loop over (tile, D step) pairs rather than a loop over tiles around a loop over D steps,
    so that the compiler's software pipeline does not drain at every tile boundary; the online
    log-sum-exp update runs (under a condition) after each tile's last D step.

    Options (static; the default program has none of their operations): ``has_bias`` (a float32
    ``(v_pad,)`` bias ref follows the labels; its tile is added to the logits), ``softcap``
    (``c·tanh(z / c)`` of the logits), ``row_sum`` (a 4th output: the row sum of the transformed
    logits over the split's real columns).
    """
    b_ref = refs[0] if has_bias else None
    m_ref, s_ref, t_ref, *r_ref = refs[1:] if has_bias else refs
    i, split = pl.program_id(0), pl.program_id(1)
    n0 = pl.multiple_of(i * block_n, block_n)
    labels = y_ref[pl.ds(n0, block_n)]
    first = split * tiles_per_split
    count = jnp.minimum(tiles_per_split, num_tiles - first)

    def update(t, logits, m, s, target, *rsum):
        v0 = (first + t) * block_v
        if has_bias:
            logits = logits + b_ref[pl.ds(pl.multiple_of(v0, block_v), block_v)][None, :]
        if softcap is not None:  # c·tanh(z / c) from one exp2 (epilogue.py)
            logits = softcapped(logits, softcap)
        cols = v0 + lax.broadcasted_iota(jnp.int32, (block_n, block_v), 1)
        if row_sum:  # padded columns hold the bias padding (0), transformed: left out
            real = logits if vocab_size % block_v == 0 else jnp.where(cols < vocab_size, logits, 0.0)
            rsum = (rsum[0] + jnp.sum(real, axis=1),)
        if vocab_size % block_v:  # padded vocabulary rows never count
            logits = jnp.where(cols < vocab_size, logits, _NEG_INF)
        target = target + jnp.sum(jnp.where(cols == labels[:, None], logits, 0.0), axis=1)
        # Online log-sum-exp (Milakov & Gimelshein): rescale the running sum to the new maximum.
        # exp(z − m) as exp2((z − m)·log2(e)): the difference first (exact near the maximum), then ex2.
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        p = jnp.exp2((logits - m_new[:, None]) * LOG2E)
        s = s * jnp.exp2((m - m_new) * LOG2E) + jnp.sum(p, axis=1)
        return m_new, s, target, *rsum

    init = (
        jnp.full((block_n,), _NEG_INF, jnp.float32),
        jnp.zeros((block_n,), jnp.float32),
        jnp.zeros((block_n,), jnp.float32),
        *((jnp.zeros((block_n,), jnp.float32),) if row_sum else ()),
    )
    num_d = h_ref.shape[1] // block_d
    zeros = jnp.zeros((block_n, block_v), jnp.float32)

    def step(k, carry):
        acc, *stats = carry
        t = k // num_d
        dd = k - t * num_d
        v0 = pl.multiple_of((first + t) * block_v, block_v)
        d0 = pl.multiple_of(dd * block_d, block_d)
        h = h_ref[pl.ds(n0, block_n), pl.ds(d0, block_d)]
        w = w_ref[pl.ds(v0, block_v), pl.ds(d0, block_d)]
        acc = acc + lax.dot_general(
            h, w, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )

        def finish(args):
            acc, *stats = args
            return (zeros, *update(t, acc, *stats))

        return lax.cond(dd == num_d - 1, finish, lambda args: args, (acc, *stats))

    _, *stats = lax.fori_loop(0, count * num_d, step, (zeros, *init))
    for ref, value in zip((m_ref, s_ref, t_ref, *r_ref), stats):
        ref[split, pl.ds(n0, block_n)] = value


def forward_partials(
    hidden: jax.Array, weight: jax.Array, labels: jax.Array, *, plan: Plan, config: TritonForwardConfig,
    sm_count: int, interpret: bool, bias: jax.Array | None = None, options: LogitOptions = PLAIN_LOGITS,
) -> tuple[jax.Array, ...]:
    """Per-split partial max, sum of exponentials and target logit of padded inputs.

    Args:
        hidden: ``(plan.n_pad, plan.d_pad)`` float16/bfloat16/float32.
        weight: ``(plan.v_pad, plan.d_pad)``, same dtype; rows at or past ``plan.v`` are padding.
        labels: ``(plan.n_pad,)`` int32; a label outside ``[0, plan.v)`` must pick no column of the
            padded weight (e.g. -1).
        plan: the padded geometry (:func:`jax_heads.pallas.plan.plan_for`).
        config: tiles and launch options.
        sm_count: multiprocessors the grid is sized for.
        interpret: Pallas interpret mode.
        bias: None or ``(plan.v_pad,)`` float32, added to the logits.
        options: softcap and row sum (:class:`~jax_heads.pallas.config.LogitOptions`).

    Returns:
        ``(m, s, t)``, each ``(splits, n_pad)`` float32: per split, the maximum (transformed) logit
        over the split's real columns, ``Σ exp(logit − m)``, and the target logit if the label lies
        in the split (else 0); with ``options.row_sum`` a 4th, the sum of the logits over the
        split's real columns.
    """
    n_blocks = plan.n_pad // config.block_n
    num_tiles = plan.v_pad // config.block_v
    splits, tiles_per_split = choose_splits(n_blocks, num_tiles, config.min_programs, config.programs_per_sm * sm_count)
    kernel = functools.partial(
        _forward_kernel,
        block_n=config.block_n,
        block_v=config.block_v,
        block_d=plan.block_d,
        tiles_per_split=tiles_per_split,
        num_tiles=num_tiles,
        vocab_size=plan.v,
        precision=matmul_precision(hidden.dtype),
        has_bias=bias is not None,
        softcap=options.softcap,
        row_sum=options.row_sum,
    )
    part = jax.ShapeDtypeStruct((splits, plan.n_pad), jnp.float32)
    return pl.pallas_call(
        kernel,
        out_shape=(part,) * (4 if options.row_sum else 3),
        grid=(n_blocks, splits),
        compiler_params=triton_params(config),
        interpret=interpret,
        name="lce_forward" if bias is None and options == PLAIN_LOGITS else "lce_forward_options",
    )(hidden, weight, labels, *(() if bias is None else (bias,)))

