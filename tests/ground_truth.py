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


def lce_condition_scales(hidden, weight, labels, upstream, ignore_index: int = -100):
    """The magnitudes that bound the rounding error of the loss and of the two gradients.

    Every quantity of row ``i`` is computed from logit-scale numbers of size at most
    ``c_i = 1 + |lse_i| + max_v (|h_i| @ |w_v|)``: the loss is ``lse - target`` (error ~ eps * c_i),
    and each probability ``exp(logit - lse)`` carries a relative error ~ eps * c_i. Summing the
    magnitudes of the terms of each result (the forward-error bound of a floating-point sum) gives
    scales to take relative errors against (``tolerances.assert_close(..., scale=...)``), which stay
    meaningful where the result itself is a tiny difference (a near-certain token).

    Returns:
        ``(loss_scale (N,), d_hidden_scale (N, D), d_weight_scale (V, D))`` in float64, for the
        per-token loss and the gradients of ``sum(upstream * loss)``.
    """
    h = np.asarray(hidden, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    g = np.abs(np.asarray(upstream, dtype=np.float64))
    valid = y != ignore_index
    logits = h @ w.T
    m = logits.max(axis=-1, keepdims=True) if logits.shape[-1] else 0.0
    lse = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[:, 0]
    magnitude = np.abs(h) @ np.abs(w).T
    c = 1.0 + np.abs(lse) + (magnitude.max(axis=-1) if magnitude.size else 0.0)
    terms = np.exp(logits - lse[:, None]) * c[:, None]
    terms[np.arange(len(y)), np.where(valid, y, 0)] += 1.0
    terms *= np.where(valid, g, 0.0)[:, None]
    return np.where(valid, c, 0.0), terms @ np.abs(w), terms.T @ np.abs(h)


def upstream_for(loss_shape, reduction: str, labels, rng, ignore_index: int = -100):
    """The per-token upstream gradient that ``reduction`` implies (random for "none")."""
    n = int(np.prod(loss_shape))
    if reduction == "none":
        return rng.standard_normal(n)
    if reduction == "sum":
        return np.ones(n)
    count = max(int((np.asarray(labels).reshape(-1) != ignore_index).sum()), 1)
    return np.full(n, 1.0 / count)
