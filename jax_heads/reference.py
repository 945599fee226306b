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


@functools.partial(jax.jit, static_argnames="ignore_index")
def reference_loss(hidden: jax.Array, weight: jax.Array, labels: jax.Array, ignore_index: int) -> jax.Array:
    """Per-token loss of flat inputs.

    Args:
        hidden: ``(N, D)`` floating array.
        weight: ``(V, D)`` array of the same dtype.
        labels: ``(N,)`` integer array, each in ``[0, V)`` or ``ignore_index``.
        ignore_index: label value that gives loss 0 and gradient 0.

    Returns:
        ``(N,)`` loss in float32 (float64 for float64 inputs); differentiable in both inputs.
    """
    acc = math_dtype(hidden.dtype)
    logits = jnp.dot(hidden.astype(acc), weight.astype(acc).T, precision=PRECISION)
    valid, index = safe_labels(labels, weight.shape[0], ignore_index)
    target = jnp.take_along_axis(logits, index[:, None], axis=1)[:, 0]
    return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - target, 0.0)
