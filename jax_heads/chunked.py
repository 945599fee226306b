"""Chunked linear cross-entropy in plain XLA, under ``jax.custom_vjp``.

The tokens are padded with ignored rows to a whole number of chunks of ``chunk_rows`` and walked
with ``lax.scan``; one ``(chunk_rows, V)`` block of float32 logits exists per step, in the forward
and in the backward. The forward keeps only the per-token log-sum-exp; the backward recomputes each
chunk's logits, writes that chunk's ``d_hidden`` and adds its share to a float32 ``d_weight``.

Memory beyond inputs and outputs: one logits chunk (``chunk_budget_bytes``, 32 MiB by default),
a padded copy of ``hidden`` when ``N`` is not a multiple of the chunk, the float32 ``d_weight``
accumulator, and — for float16/bfloat16 inputs — one float32 copy of the weight in the backward so
that both gradient products are rounded in float32 (as in ``torch_heads/chunked.py``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jax_heads.reference import PRECISION, math_dtype, safe_labels

DEFAULT_CHUNK_BUDGET_BYTES = 32 * 2**20


def chunk_rows_for(vocab_size: int, itemsize: int, budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk so that one ``(rows, V)`` logits block fits ``budget_bytes``."""
    return max(1, budget_bytes // (vocab_size * itemsize))


@dataclasses.dataclass(frozen=True)
class _Options:
    """The static (hashable) arguments of one call."""

    ignore_index: int
    chunk_rows: int


def split_rows(x: jax.Array, rows: int, fill=0) -> jax.Array:
    """``(N, ...)`` -> ``(ceil(N / rows), rows, ...)``, padded with ``fill`` at the end."""
    pad = -x.shape[0] % rows
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape(-1, rows, *x.shape[1:])


def chunk_logits(h: jax.Array, weight: jax.Array, acc: jnp.dtype) -> jax.Array:
    """``h @ weight.T`` accumulated (and returned) in ``acc``."""
    # Products of two float16/bfloat16 numbers are exact in float32, so no upcast copy is needed.
    return jnp.dot(h, weight.T, preferred_element_type=acc, precision=PRECISION)


def chunked_lse_target(hidden, weight, local_labels, chunk_rows: int):
    """Per-token log-sum-exp over the rows of ``weight`` and the target logit, one chunk at a time.

    Args:
        hidden ``(N, D)``, weight ``(V, D)``.
        local_labels ``(N,)`` int: the target's row of ``weight``; any value outside ``[0, V)``
            means no target here (ignored, or in another vocabulary shard).
        chunk_rows: tokens per chunk.

    Returns:
        ``(lse, target)``, each ``(N,)`` in the accumulation dtype; ``target`` is 0 where there is
        no target.
    """
    acc = math_dtype(hidden.dtype)
    n, vocab = hidden.shape[0], weight.shape[0]
    has_target = (local_labels >= 0) & (local_labels < vocab)
    index = jnp.where(has_target, local_labels, 0)

    def chunk(_, xs):
        h, idx = xs
        logits = chunk_logits(h, weight, acc)
        target = jnp.take_along_axis(logits, idx[:, None], axis=1)[:, 0]
        return None, (jax.nn.logsumexp(logits, axis=-1), target)

    xs = (split_rows(hidden, chunk_rows), split_rows(index, chunk_rows))
    _, (lse, target) = lax.scan(chunk, None, xs)
    return lse.reshape(-1)[:n], jnp.where(has_target, target.reshape(-1)[:n], 0.0)


def chunked_grads(hidden, weight, local_labels, lse, g, chunk_rows: int):
    """Gradients of ``sum(g * loss)`` w.r.t. hidden and weight, one chunk of logits at a time.

    ``d loss / d logits = g · (exp(logits − lse) − onehot(label))``, the one-hot term only where the
    label is a row of ``weight``. With a vocabulary shard, ``lse`` is the global log-sum-exp.

    Args:
        hidden ``(N, D)``, weight ``(V, D)``.
        local_labels ``(N,)`` int, as in :func:`chunked_lse_target`.
        lse ``(N,)``: per-token log-sum-exp in the accumulation dtype.
        g ``(N,)``: upstream gradient, already 0 at ignored rows.
        chunk_rows: tokens per chunk.

    Returns:
        ``(d_hidden, d_weight)`` in the inputs' dtypes.
    """
    acc = lse.dtype
    n, vocab = hidden.shape[0], weight.shape[0]
    w = weight.astype(acc)
    columns = jnp.arange(vocab, dtype=local_labels.dtype)

    def chunk(d_weight, xs):
        h, idx, lse_c, g_c = xs
        probs = jnp.exp(chunk_logits(h, weight, acc) - lse_c[:, None])
        grad_logits = (probs - (columns[None, :] == idx[:, None])) * g_c[:, None]
        d_h = jnp.dot(grad_logits, w, precision=PRECISION).astype(hidden.dtype)
        d_weight = d_weight + jnp.dot(grad_logits.T, h.astype(acc), precision=PRECISION)
        return d_weight, d_h

    xs = tuple(split_rows(x, chunk_rows) for x in (hidden, local_labels, lse, g.astype(acc)))
    d_weight, d_hidden = lax.scan(chunk, jnp.zeros(weight.shape, acc), xs)
    return d_hidden.reshape(-1, hidden.shape[1])[:n], d_weight.astype(weight.dtype)


def _forward(hidden, weight, labels, options: _Options):
    valid, index = safe_labels(labels, weight.shape[0], options.ignore_index)
    local_labels = jnp.where(valid, index, -1)
    lse, target = chunked_lse_target(hidden, weight, local_labels, options.chunk_rows)
    return jnp.where(valid, lse - target, 0.0), (hidden, weight, local_labels, valid, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(hidden, weight, labels, options: _Options):
    return _forward(hidden, weight, labels, options)[0]


def _chunked_bwd(options: _Options, residuals, grad_loss):
    hidden, weight, local_labels, valid, lse = residuals
    # Ignored rows (and the padding rows) get zero gradient whatever the upstream holds, even NaN.
    g = jnp.where(valid, grad_loss.astype(lse.dtype), 0.0)
    return (*chunked_grads(hidden, weight, local_labels, lse, g, options.chunk_rows), None)


_chunked.defvjp(_forward, _chunked_bwd)
_chunked_jit = jax.jit(_chunked, static_argnums=(3,))


def chunked_loss(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    ignore_index: int,
    chunk_budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES,
) -> jax.Array:
    """Per-token loss of flat inputs without materialising the ``(N, V)`` logits.

    Args:
        hidden: ``(N, D)`` float16/bfloat16/float32/float64 array.
        weight: ``(V, D)`` array of the same dtype.
        labels: ``(N,)`` integer array, each in ``[0, V)`` or ``ignore_index`` (an out-of-range
            label is clamped for the gather, never read out of bounds).
        ignore_index: label value that gives loss 0 and gradient 0.
        chunk_budget_bytes: the most bytes one logits chunk may take.

    Returns:
        ``(N,)`` loss, float32 (float64 for float64 inputs). Gradients come back in the inputs' dtype;
        the upstream gradient may be any ``(N,)`` array.
    """
    itemsize = math_dtype(hidden.dtype).itemsize
    rows = chunk_rows_for(weight.shape[0], itemsize, chunk_budget_bytes)
    # A chunk never needs more rows than there are tokens (no padding beyond N).
    rows = max(1, min(rows, hidden.shape[0]))
    return _chunked_jit(hidden, weight, labels, _Options(int(ignore_index), rows))
