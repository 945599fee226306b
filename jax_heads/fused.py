"""Linear cross-entropy whose gradients are formed during the forward pass (6·N·D·V FLOPs).

For the reductions ``"sum"`` and ``"mean"`` the upstream gradient of every token is the same
number, so ``d_hidden`` and ``d_weight`` are fixed up to one scalar before the backward starts. This
path walks the tokens in chunks of ``chunk_rows``; per chunk it materialises the chunk's float32
logits against the whole vocabulary, takes the log-sum-exp, and with the probabilities still at
hand forms ``G = softmax − onehot`` (in the input dtype), the chunk's ``d_hidden = G @ W`` (complete:
the product runs over all of ``V``) and adds ``Gᵀ @ H_chunk`` into a float32 ``d_weight``
accumulator. The backward only scales the two saved gradients by the upstream scalar.

Three matrix products per token (6·N·D·V) instead of the four of a recomputing kernel
(``jax_heads.pallas``: 8·N·D·V), all of them cuBLAS products through XLA. The price is memory: one
``(chunk_rows, V)`` float32 logits block (``logits_budget_bytes``, 512 MiB by default) and the float32
``(V, D)`` accumulator, plus the saved gradients themselves between forward and backward. This is
Liger-Kernel's schedule with a float32 weight-gradient accumulator (Liger adds the chunks' weight
gradients in the weight dtype).

Without differentiation (evaluation) the primal runs the plain chunked forward (2·N·D·V): the
gradient work happens only under ``jax.grad``/``jax.vjp``.

Loss options: the bias and soft-capping transform the chunk's logits; label smoothing and the
z-loss change the per-row coefficients of ``G = p·A − B·onehot − C`` (times the soft-cap's
derivative), all known in the forward since the upstream is one scalar; the bias gradient is the
column sum of ``G``, accumulated like ``d_weight``. A returned log-sum-exp is not supported: its
upstream gradient ``g_lse`` differs per token and adds ``g_lse·p`` to each row of ``G``, which
cannot be formed before ``g_lse`` is known — that is, not in the forward (``impl="chunked"``
returns it).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jax_heads.chunked import chunk_logits, logit_grads, split_rows
from jax_heads.reduction import scaled_by_upstream
from jax_heads.reference import PRECISION, grad_coefficients, loss_terms, math_dtype, safe_labels

DEFAULT_LOGITS_BUDGET_BYTES = 512 * 2**20
REDUCTIONS = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class _Options:
    ignore_index: int
    reduction: str
    chunk_rows: int
    softcap: float | None = None
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0


def _chunk_loss(h, weight, bias, y, o: _Options):
    """Transformed logits, validity, safe index, log-sum-exp and per-token loss of one chunk."""
    acc = math_dtype(h.dtype)
    vocab = weight.shape[0]
    logits = chunk_logits(h, weight, acc, bias, o.softcap)
    valid, index = safe_labels(y, vocab, o.ignore_index)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, index[:, None], axis=1)[:, 0]
    row_sum = jnp.sum(logits, axis=-1) if o.label_smoothing else None
    loss = loss_terms(lse, target, row_sum, vocab, o.label_smoothing, o.lse_square_scale)
    return logits, lse, valid, index, jnp.where(valid, loss, 0.0)


def _forward_only(hidden, weight, bias, labels, nan_rows, o: _Options):
    def step(total, xs):
        h, y, bad = xs
        loss = _chunk_loss(h, weight, bias, y, o)[-1]
        return total + jnp.sum(jnp.where(bad, jnp.nan, loss)), None

    acc = math_dtype(hidden.dtype)
    total, _ = lax.scan(step, jnp.zeros((), acc), _token_chunks(hidden, labels, nan_rows, o))
    return total


def _token_chunks(hidden, labels, nan_rows, o: _Options):
    return (
        split_rows(hidden, o.chunk_rows),
        split_rows(labels, o.chunk_rows, o.ignore_index),
        split_rows(nan_rows, o.chunk_rows, False),
    )


def _with_gradients(hidden, weight, bias, labels, nan_rows, scale, o: _Options):
    """Total loss, ``d_hidden`` (input dtype), ``d_weight`` and ``d_bias`` (float32; None without a
    bias) of ``scale · Σ loss``.

    ``scale`` is folded into ``G = p·A − B·onehot − C`` (the per-row coefficients of
    :func:`~jax_heads.reference.grad_coefficients` for an upstream ``scale``, times the softcap
    derivative) before its rounding to the input dtype, as differentiation of the scaled loss would
    do. Rows in ``nan_rows`` get a NaN loss and NaN gradient rows (their share of ``d_weight`` makes
    it NaN, as in every implementation).
    """
    acc = math_dtype(hidden.dtype)
    vocab = weight.shape[0]

    def step(carry, xs):
        d_weight, d_bias = carry
        h, y, bad = xs
        logits, lse, valid, index, loss = _chunk_loss(h, weight, bias, y, o)
        onehot = index[:, None] == lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        row_scale = jnp.where(bad, jnp.nan, jnp.where(valid, scale, 0.0))
        coefficients = grad_coefficients(row_scale, None, lse, vocab, o.label_smoothing, o.lse_square_scale)
        g = logit_grads(logits, lse, onehot, coefficients, o.softcap).astype(hidden.dtype)
        d_h = jnp.dot(g, weight, preferred_element_type=hidden.dtype, precision=PRECISION)
        d_weight = d_weight + lax.dot_general(
            g, h, (((0,), (0,)), ((), ())), preferred_element_type=acc, precision=PRECISION
        )
        if d_bias is not None:
            d_bias = d_bias + jnp.sum(g, axis=0, dtype=acc)
        return (d_weight, d_bias), (jnp.sum(jnp.where(bad, jnp.nan, loss)), d_h)

    init = (jnp.zeros(weight.shape, acc), None if bias is None else jnp.zeros(bias.shape, acc))
    (d_weight, d_bias), (totals, d_h) = lax.scan(step, init, _token_chunks(hidden, labels, nan_rows, o))
    d_hidden = d_h.reshape(-1, hidden.shape[1])[: hidden.shape[0]]
    return jnp.sum(totals), d_hidden, d_weight, d_bias


def _scale(labels, o: _Options, dtype):
    if o.reduction == "sum":
        return jnp.ones((), dtype)
    return 1.0 / jnp.maximum(jnp.sum(labels != o.ignore_index), 1).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused(hidden, weight, bias, labels, nan_rows, o: _Options):
    acc = math_dtype(hidden.dtype)
    return _forward_only(hidden, weight, bias, labels, nan_rows, o) * _scale(labels, o, acc)


def _fused_fwd(hidden, weight, bias, labels, nan_rows, o: _Options):
    acc = math_dtype(hidden.dtype)
    scale = _scale(labels, o, acc)
    total, d_hidden, d_weight, d_bias = _with_gradients(hidden, weight, bias, labels, nan_rows, scale, o)
    # Saved in the parameters' dtype: the float32 accumulators do not outlive the forward.
    d_bias = None if bias is None else d_bias.astype(bias.dtype)
    return total * scale, (d_hidden, d_weight.astype(weight.dtype), d_bias)


def _fused_bwd(o: _Options, residuals, grad):
    return (*scaled_by_upstream(residuals, grad), None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)
# Compiled once per options and shapes: eager calls neither dispatch op by op nor retrace the scans.
_fused_jit = jax.jit(_fused, static_argnums=(5,))


def fused_loss(
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
    logits_budget_bytes: int = DEFAULT_LOGITS_BUDGET_BYTES,
    nan_rows: jax.Array | None = None,
) -> jax.Array:
    """Summed or mean linear cross-entropy of flat inputs, gradients formed in the forward pass.

    Args:
        hidden: ``(N, D)`` float16/bfloat16/float32 (float64 in 64-bit mode).
        weight: ``(V, D)``, same dtype.
        labels: ``(N,)`` integer, each in ``[0, V)`` or ``ignore_index`` (validated by the caller).
        ignore_index: label value with loss 0 and gradient 0.
        reduction: ``"sum"`` or ``"mean"`` (over non-ignored tokens; 0 when all are ignored).
        bias, softcap, label_smoothing, lse_square_scale: the loss options of
            :func:`jax_heads.linear_cross_entropy` (validated by the caller). There is no
            ``return_lse``: the log-sum-exp's upstream gradient differs per token and is unknown
            while the forward forms the gradients (module docstring).
        logits_budget_bytes: bytes of one float32 ``(chunk_rows, V)`` logits block.
        nan_rows: ``(N,)`` bool or None: tokens whose loss and gradient rows are to be NaN (the
            caller's out-of-range labels under a transformation); the other rows stay exact.

    Returns:
        A float32 (float64) scalar, differentiable in ``hidden``, ``weight`` and ``bias``
        (gradients in their dtype).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"the fused path needs a uniform upstream gradient: reduction in {REDUCTIONS}, got {reduction!r}"
        )
    itemsize = math_dtype(hidden.dtype).itemsize
    rows = max(1, min(hidden.shape[0], logits_budget_bytes // (weight.shape[0] * itemsize)))
    if rows >= 16:
        rows -= rows % 16
    o = _Options(int(ignore_index), reduction, int(rows), softcap, float(label_smoothing), float(lse_square_scale))
    if nan_rows is None:
        nan_rows = jnp.zeros(labels.shape, bool)
    return _fused_jit(hidden, weight, bias, labels, nan_rows, o)
