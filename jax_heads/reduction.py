"""From a per-token loss to the registry's result: the NaN rows and the reduction (plain ``jax.numpy``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def reduce_loss(loss: jax.Array, valid: jax.Array, reduction: str) -> jax.Array:
    """Apply ``reduction`` to a per-token loss; ``mean`` divides by the non-ignored count (0 if none)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / jnp.maximum(valid.sum(), 1).astype(total.dtype)


def nan_where_infinite(loss: jax.Array) -> jax.Array:
    """``loss`` with NaN where it is ±inf: a row with non-finite logits (inf/NaN in its hidden state) is
    NaN in every implementation (some log-sum-exps give inf there). Adding a constant keeps the
    gradient flowing unchanged."""
    return loss + jnp.where(jnp.isinf(loss), jnp.nan, 0.0)


def finish_loss(loss: jax.Array, valid: jax.Array, bad: jax.Array | None, reduction: str) -> jax.Array:
    """The per-token loss's NaN rows (:func:`nan_where_infinite`, and ``bad``: out-of-range traced
    labels, NaN in loss and gradients), then ``reduction``."""
    if bad is not None:
        loss = loss * jnp.where(bad, jnp.nan, 1.0)
    return reduce_loss(nan_where_infinite(loss), valid, reduction)


def scaled_by_upstream(saved: tuple, grad: jax.Array) -> tuple:
    """Gradients formed in the forward (``saved``: arrays or None), times the reduced loss's upstream
    scalar ``grad``; an upstream of 1 (the loss itself differentiated) returns them as they are,
    without a scaled copy. Each keeps its dtype."""

    def scaled(x):
        if x is None:
            return None
        return lax.cond(grad == 1, lambda: x, lambda: (x.astype(grad.dtype) * grad).astype(x.dtype))

    return tuple(scaled(x) for x in saved)
