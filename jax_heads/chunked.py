"""Chunked linear cross-entropy in plain XLA, under ``jax.custom_vjp``.

The tokens are padded with ignored rows to a whole number of chunks of ``chunk_rows`` and walked
with ``lax.scan``; one ``(chunk_rows, V)`` block of float32 logits exists per step, in the forward
and in the backward. The forward keeps only the per-token log-sum-exp; the backward recomputes each
chunk's logits, writes that chunk's ``d_hidden`` and adds its share to a float32 ``d_weight``.

The loss options are epilogue work on each chunk: the bias is added and the soft-cap applied to the
chunk's logits (:func:`chunk_logits`); label smoothing adds the row sum of the logits to the forward;
the backward forms ``dL/dz = p·A − B·onehot − C`` from per-row coefficients
(:func:`~jax_heads.reference.grad_coefficients`: z-loss, smoothing and the returned log-sum-exp's
upstream) times the soft-cap's derivative (:func:`logit_grads`), and sums its columns into
``d_bias``. With the defaults none of this work is traced.

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

from jax_heads.reference import PRECISION, grad_coefficients, loss_terms, math_dtype, safe_labels, transform_logits

DEFAULT_CHUNK_BUDGET_BYTES = 32 * 2**20


def chunk_rows_for(vocab_size: int, itemsize: int, budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk so that one ``(rows, V)`` logits block fits ``budget_bytes``."""
    return max(1, budget_bytes // (vocab_size * itemsize))


@dataclasses.dataclass(frozen=True)
class _Options:
    """The static (hashable) arguments of one call."""

    ignore_index: int
    chunk_rows: int
    softcap: float | None = None
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    return_lse: bool = False


def split_rows(x: jax.Array, rows: int, fill=0) -> jax.Array:
    """``(N, ...)`` -> ``(ceil(N / rows), rows, ...)``, padded with ``fill`` at the end."""
    pad = -x.shape[0] % rows
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape(-1, rows, *x.shape[1:])


def chunk_logits(h: jax.Array, weight: jax.Array, acc: jnp.dtype, bias=None, softcap: float | None = None) -> jax.Array:
    """``h @ weight.T`` accumulated (and returned) in ``acc``, then ``+ bias`` and soft-capped
    (:func:`~jax_heads.reference.transform_logits`; each only when given)."""
    # Products of two float16/bfloat16 numbers are exact in float32, so no upcast copy is needed.
    logits = jnp.dot(h, weight.T, preferred_element_type=acc, precision=PRECISION)
    return transform_logits(logits, bias, softcap)


def logit_grads(logits, lse, onehot, coefficients, softcap: float | None = None) -> jax.Array:
    """``dL/dz`` of one block of (transformed) logits ``z'``: ``p·A − B·onehot − C`` with
    ``p = exp(z' − lse)`` and the per-row ``(A, B, C)`` of
    :func:`~jax_heads.reference.grad_coefficients`, times ``1 − (z'/c)²`` with ``softcap`` ``c``.
    With the defaults ``(g, None, None)`` exactly ``(p − onehot)·g``."""
    a, b, c = coefficients
    probs = jnp.exp(logits - lse[:, None])
    if b is None:
        grad = (probs - onehot) * a[:, None]
    else:
        grad = probs * a[:, None] - jnp.where(onehot, b[:, None], 0.0)
    if c is not None:
        grad = grad - c[:, None]
    if softcap is not None:
        grad = grad * (1.0 - jnp.square(logits / softcap))
    return grad


def chunked_lse_target(hidden, weight, local_labels, chunk_rows: int, *, bias=None, softcap=None, row_sum=False):
    """Per-token log-sum-exp over the rows of ``weight`` and the target logit, one chunk at a time.

    Args:
        hidden ``(N, D)``, weight ``(V, D)``.
        local_labels ``(N,)`` int: the target's row of ``weight``; any value outside ``[0, V)``
            means no target here (ignored, or in another vocabulary shard).
        chunk_rows: tokens per chunk.
        bias: None or ``(V,)``, added to the logits; softcap: None or ``c``: logits become
            ``c·tanh(logits / c)``.
        row_sum: also return the row sum of the (transformed) logits (label smoothing).

    Returns:
        ``(lse, target, row_sum)``, each ``(N,)`` in the accumulation dtype (``row_sum`` None unless
        asked); ``target`` is 0 where there is no target.
    """
    acc = math_dtype(hidden.dtype)
    n, vocab = hidden.shape[0], weight.shape[0]
    has_target = (local_labels >= 0) & (local_labels < vocab)
    index = jnp.where(has_target, local_labels, 0)
    bias = None if bias is None else bias.astype(acc)

    def chunk(_, xs):
        h, idx = xs
        logits = chunk_logits(h, weight, acc, bias, softcap)
        target = jnp.take_along_axis(logits, idx[:, None], axis=1)[:, 0]
        sums = jnp.sum(logits, axis=-1) if row_sum else None
        return None, (jax.nn.logsumexp(logits, axis=-1), target, sums)

    xs = (split_rows(hidden, chunk_rows), split_rows(index, chunk_rows))
    _, (lse, target, sums) = lax.scan(chunk, None, xs)
    sums = None if sums is None else sums.reshape(-1)[:n]
    return lse.reshape(-1)[:n], jnp.where(has_target, target.reshape(-1)[:n], 0.0), sums


def chunked_grads(hidden, weight, local_labels, lse, coefficients, chunk_rows: int, *, bias=None, softcap=None):
    """Gradients with respect to hidden, weight and bias, one chunk of logits at a time.

    ``dL/dz = p·A − B·onehot − C`` (:func:`logit_grads`), the one-hot term only where the label is
    a row of ``weight``. With a vocabulary shard, ``lse`` is the global log-sum-exp and the
    coefficients come from it.

    Args:
        hidden ``(N, D)``, weight ``(V, D)``.
        local_labels ``(N,)`` int, as in :func:`chunked_lse_target`.
        lse ``(N,)``: per-token log-sum-exp in the accumulation dtype.
        coefficients: ``(A, B, C)`` of :func:`~jax_heads.reference.grad_coefficients`, each ``(N,)``
            (or None) in the accumulation dtype, already 0 at ignored rows.
        chunk_rows: tokens per chunk.
        bias, softcap: as in :func:`chunked_lse_target`.

    Returns:
        ``(d_hidden, d_weight, d_bias)`` in the inputs' dtypes (``d_bias`` None without a bias).
    """
    acc = lse.dtype
    n, vocab = hidden.shape[0], weight.shape[0]
    w = weight.astype(acc)
    columns = jnp.arange(vocab, dtype=local_labels.dtype)
    b = None if bias is None else bias.astype(acc)

    def chunk(carry, xs):
        d_weight, d_bias = carry
        h, idx, lse_c, coef_c = xs
        onehot = columns[None, :] == idx[:, None]
        grad_logits = logit_grads(chunk_logits(h, weight, acc, b, softcap), lse_c, onehot, coef_c, softcap)
        d_h = jnp.dot(grad_logits, w, precision=PRECISION).astype(hidden.dtype)
        d_weight = d_weight + jnp.dot(grad_logits.T, h.astype(acc), precision=PRECISION)
        if d_bias is not None:
            d_bias = d_bias + jnp.sum(grad_logits, axis=0)
        return (d_weight, d_bias), d_h

    # Padding rows have zero coefficients; with a bias their logits are not 0, so their lse is +inf
    # (probabilities 0) rather than 0, which could overflow exp to inf and give inf·0 = NaN.
    lse_fill = 0.0 if bias is None else jnp.inf
    coefficients = tuple(None if x is None else split_rows(x.astype(acc), chunk_rows) for x in coefficients)
    xs = (split_rows(hidden, chunk_rows), split_rows(local_labels, chunk_rows), split_rows(lse, chunk_rows, lse_fill),
          coefficients)
    init = (jnp.zeros(weight.shape, acc), None if bias is None else jnp.zeros(bias.shape, acc))
    (d_weight, d_bias), d_hidden = lax.scan(chunk, init, xs)
    d_bias = None if bias is None else d_bias.astype(bias.dtype)
    return d_hidden.reshape(-1, hidden.shape[1])[:n], d_weight.astype(weight.dtype), d_bias


def _forward(hidden, weight, bias, labels, o: _Options):
    vocab = weight.shape[0]
    valid, index = safe_labels(labels, vocab, o.ignore_index)
    local_labels = jnp.where(valid, index, -1)
    lse, target, row_sum = chunked_lse_target(
        hidden, weight, local_labels, o.chunk_rows, bias=bias, softcap=o.softcap, row_sum=bool(o.label_smoothing)
    )
    loss = jnp.where(valid, loss_terms(lse, target, row_sum, vocab, o.label_smoothing, o.lse_square_scale), 0.0)
    out = (loss, jnp.where(valid, lse, 0.0)) if o.return_lse else loss
    return out, (hidden, weight, bias, local_labels, valid, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked(hidden, weight, bias, labels, options: _Options):
    return _forward(hidden, weight, bias, labels, options)[0]


def _chunked_bwd(o: _Options, residuals, cotangent):
    hidden, weight, bias, local_labels, valid, lse = residuals
    grad_loss, grad_lse = cotangent if o.return_lse else (cotangent, None)
    # Ignored rows (and the padding rows) get zero gradient whatever the upstream holds, even NaN.
    g = jnp.where(valid, grad_loss.astype(lse.dtype), 0.0)
    g_lse = None if grad_lse is None else jnp.where(valid, grad_lse.astype(lse.dtype), 0.0)
    coefficients = grad_coefficients(g, g_lse, lse, weight.shape[0], o.label_smoothing, o.lse_square_scale)
    grads = chunked_grads(hidden, weight, local_labels, lse, coefficients, o.chunk_rows, bias=bias, softcap=o.softcap)
    return (*grads, None)


_chunked.defvjp(_forward, _chunked_bwd)
_chunked_jit = jax.jit(_chunked, static_argnums=(4,))


def chunked_loss(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    ignore_index: int,
    chunk_budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES,
    *,
    bias: jax.Array | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Per-token loss of flat inputs without materialising the ``(N, V)`` logits.

    Args:
        hidden: ``(N, D)`` float16/bfloat16/float32/float64 array.
        weight: ``(V, D)`` array of the same dtype.
        labels: ``(N,)`` integer array, each in ``[0, V)`` or ``ignore_index`` (an out-of-range
            label is clamped for the gather, never read out of bounds).
        ignore_index: label value that gives loss 0 and gradient 0.
        chunk_budget_bytes: the most bytes one logits chunk may take.
        bias, softcap, label_smoothing, lse_square_scale, return_lse: the loss options of
            :func:`jax_heads.linear_cross_entropy` (validated by the caller); the defaults add no work.

    Returns:
        ``(N,)`` loss, float32 (float64 for float64 inputs); with ``return_lse``, ``(loss, lse)``,
        ``lse`` 0 at ignored rows. Gradients come back in the inputs' dtype; the upstream
        gradients may be any ``(N,)`` arrays.
    """
    itemsize = math_dtype(hidden.dtype).itemsize
    rows = chunk_rows_for(weight.shape[0], itemsize, chunk_budget_bytes)
    # A chunk never needs more rows than there are tokens (no padding beyond N).
    rows = max(1, min(rows, hidden.shape[0]))
    o = _Options(int(ignore_index), rows, softcap, float(label_smoothing), float(lse_square_scale), bool(return_lse))
    return _chunked_jit(hidden, weight, bias, labels, o)
