"""Float64 ground truth in NumPy, shared by the torch, JAX and interop tests.

Independent of both frameworks: loss and the two gradients written out by hand
(d loss_i / d logits_i = softmax_i - onehot(y_i) for non-ignored rows).
"""

from __future__ import annotations

import numpy as np


def lce_ground_truth(hidden, weight, labels, upstream, ignore_index: int = -100):
    """Per-token loss and the gradients of ``sum(upstream * loss)``.

    Args:
        hidden: ``(N, D)``, weight: ``(V, D)``, labels: ``(N,)``, upstream: ``(N,)``; any numeric arrays.

    Returns:
        ``(loss (N,), d_hidden (N, D), d_weight (V, D))`` in float64.
    """
    h = np.asarray(hidden, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    g = np.asarray(upstream, dtype=np.float64)
    valid = y != ignore_index
    safe = np.where(valid, y, 0)
    logits = h @ w.T
    m = logits.max(axis=-1, keepdims=True) if logits.shape[-1] else 0.0
    lse = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]
    target = np.take_along_axis(logits, safe[:, None], axis=1)[:, 0]
    loss = np.where(valid, lse - target, 0.0)
    grad_logits = np.exp(logits - lse[:, None])
    grad_logits[np.arange(len(y)), safe] -= 1.0
    grad_logits *= np.where(valid, g, 0.0)[:, None]
    return loss, grad_logits @ w, grad_logits.T @ h


def upstream_for(loss_shape, reduction: str, labels, rng, ignore_index: int = -100):
    """The per-token upstream gradient that ``reduction`` implies (random for "none")."""
    n = int(np.prod(loss_shape))
    if reduction == "none":
        return rng.standard_normal(n)
    if reduction == "sum":
        return np.ones(n)
    count = max(int((np.asarray(labels).reshape(-1) != ignore_index).sum()), 1)
    return np.full(n, 1.0 / count)
