"""Reference linear cross-entropy: materialised logits, float32 (or float64) math.

Short and obviously right: the test oracle and the fallback every fast path is checked against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# True float32 (float64) products on every backend: XLA's default may round float32 matmul operands
# to tf32 (GPU) or bfloat16 (TPU), while torch_heads computes in full float32.
PRECISION = lax.Precision.HIGHEST


def math_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The accumulation dtype for inputs of ``dtype``: float64 stays float64, all else float32.

    float64 arrays only exist with ``jax_enable_x64`` on, so no check of that flag is needed here.
    """
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def safe_labels(labels: jax.Array, vocab_size: int, ignore_index: int) -> tuple[jax.Array, jax.Array]:
    """``(valid, index)``: the non-ignored mask and a gather index always inside ``[0, vocab_size)``.

    Ignored rows gather row 0, and an out-of-range label is clamped rather than read out of
    bounds; the caller (:func:`jax_heads.functional.linear_cross_entropy`) marks those rows NaN.
    """
    valid = labels != ignore_index
    return valid, jnp.clip(jnp.where(valid, labels, 0), 0, vocab_size - 1)


def transform_logits(logits: jax.Array, bias: jax.Array | None, softcap: float | None) -> jax.Array:
    """``logits + bias``, then ``softcap·tanh(· / softcap)`` (each only when given), in the logits' dtype."""
    if bias is not None:
        logits = logits + bias.astype(logits.dtype)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


def loss_terms(lse, target, row_sum, vocab_size: int, label_smoothing: float, lse_square_scale: float):
    """Per-token loss from its log-sum-exp, target logit and (for label smoothing) the row sum of the
    (transformed) logits: ``(1 − ε)(lse − target) + ε(lse − row_sum / V) + λ·lse²``; with the
    defaults exactly ``lse − target``."""
    loss = lse - target
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - row_sum / vocab_size)
    if lse_square_scale:
        loss = loss + lse_square_scale * lse * lse
    return loss


def grad_coefficients(g, g_lse, lse, vocab_size: int, label_smoothing: float, lse_square_scale: float):
    """Per-row coefficients of the gradient of :func:`loss_terms` (upstream ``g``) and of the
    log-sum-exp (upstream ``g_lse``, or None) with respect to the transformed logits ``z'``:
    ``dL/dz'_v = p_v·A − B·[v == y] − C`` with ``p = softmax(z')``, ``A = g(1 + 2λ·lse) + g_lse``,
    ``B = g(1 − ε)``, ``C = g·ε/V``.

    Returns:
        ``(A, B, C)``, each shaped like ``g``; ``B`` is None where it equals ``A`` and ``C`` None
        where it is 0 — so the defaults give ``(g, None, None)`` and cost no extra operation.
    """
    if not (label_smoothing or lse_square_scale or g_lse is not None):
        return g, None, None
    a = g * (1.0 + 2.0 * lse_square_scale * lse) if lse_square_scale else g
    if g_lse is not None:
        a = a + g_lse
    if not label_smoothing:
        return a, g, None
    return a, g * (1.0 - label_smoothing), g * (label_smoothing / vocab_size)


@functools.partial(
    jax.jit, static_argnames=("ignore_index", "softcap", "label_smoothing", "lse_square_scale")
)
def reference_loss(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    ignore_index: int,
    bias: jax.Array | None = None,
    *,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Per-token loss and log-sum-exp of flat inputs.

    Args:
        hidden: ``(N, D)`` floating array.
        weight: ``(V, D)`` array of the same dtype.
        labels: ``(N,)`` integer array, each in ``[0, V)`` or ``ignore_index``.
        ignore_index: label value that gives loss 0 and gradient 0.
        bias: None or ``(V,)``, added to the logits.
        softcap, label_smoothing, lse_square_scale: the loss options (``jax_heads.linear_cross_entropy``).

    Returns:
        ``(loss, lse)``, each ``(N,)`` in float32 (float64 for float64 inputs), 0 where ignored;
        differentiable in ``hidden``, ``weight`` and ``bias``.
    """
    acc = math_dtype(hidden.dtype)
    logits = jnp.dot(hidden.astype(acc), weight.astype(acc).T, precision=PRECISION)
    logits = transform_logits(logits, bias, softcap)
    valid, index = safe_labels(labels, weight.shape[0], ignore_index)
    target = jnp.take_along_axis(logits, index[:, None], axis=1)[:, 0]
    lse = jax.nn.logsumexp(logits, axis=-1)
    row_sum = jnp.sum(logits, axis=-1) if label_smoothing else None
    loss = loss_terms(lse, target, row_sum, weight.shape[0], label_smoothing, lse_square_scale)
    return jnp.where(valid, loss, 0.0), jnp.where(valid, lse, 0.0)
