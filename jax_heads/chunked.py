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


def _split_rows(x: jax.Array, rows: int) -> jax.Array:
    """``(N, ...)`` -> ``(ceil(N / rows), rows, ...)``, zero-padded at the end."""
    pad = -x.shape[0] % rows
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(-1, rows, *x.shape[1:])


def _logits(h: jax.Array, weight: jax.Array, acc: jnp.dtype) -> jax.Array:
    # Products of two float16/bfloat16 numbers are exact in float32, so no upcast copy is needed.
    return jnp.dot(h, weight.T, preferred_element_type=acc, precision=PRECISION)


def _forward(hidden, weight, labels, options: _Options):
    acc = math_dtype(hidden.dtype)
    n = hidden.shape[0]
    valid, index = safe_labels(labels, weight.shape[0], options.ignore_index)

    def chunk(_, xs):
        h, idx = xs
        logits = _logits(h, weight, acc)
        target = jnp.take_along_axis(logits, idx[:, None], axis=1)[:, 0]
        return None, (jax.nn.logsumexp(logits, axis=-1), target)

    xs = (_split_rows(hidden, options.chunk_rows), _split_rows(index, options.chunk_rows))
    _, (lse, target) = lax.scan(chunk, None, xs)
    lse, target = lse.reshape(-1)[:n], target.reshape(-1)[:n]
    loss = jnp.where(valid, lse - target, 0.0)
    return loss, (hidden, weight, index, valid, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(hidden, weight, labels, options: _Options):
    return _forward(hidden, weight, labels, options)[0]


def _chunked_bwd(options: _Options, residuals, grad_loss):
    hidden, weight, index, valid, lse = residuals
    acc = lse.dtype
    n, vocab = hidden.shape[0], weight.shape[0]
    w = weight.astype(acc)
    # Ignored rows (and the padding rows) get zero gradient whatever the upstream holds, even NaN.
    g = jnp.where(valid, grad_loss.astype(acc), 0.0)
    columns = jnp.arange(vocab, dtype=index.dtype)

    def chunk(d_weight, xs):
        h, idx, lse_c, g_c = xs
        # d loss / d logits = g * (softmax - onehot(label)).
        probs = jnp.exp(_logits(h, weight, acc) - lse_c[:, None])
        grad_logits = (probs - (columns[None, :] == idx[:, None])) * g_c[:, None]
        d_h = jnp.dot(grad_logits, w, precision=PRECISION).astype(hidden.dtype)
        d_weight = d_weight + jnp.dot(grad_logits.T, h.astype(acc), precision=PRECISION)
        return d_weight, d_h

    rows = options.chunk_rows
    xs = tuple(_split_rows(x, rows) for x in (hidden, index, lse, g))
    d_weight, d_hidden = lax.scan(chunk, jnp.zeros(weight.shape, acc), xs)
    d_hidden = d_hidden.reshape(-1, hidden.shape[1])[:n]
    return d_hidden, d_weight.astype(weight.dtype), None


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
