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


def filtered_tile_maxima(hidden, weight, labels, upstream, block_n: int, block_v: int, ignore_index: int = -100,
                         separate_targets: bool = False):
    """Per (token block × vocabulary tile) of a ``block_n × block_v`` grid: the largest ``|softmax − onehot|``
    over counted rows (label not ignored, upstream gradient non-zero) — the quantity a gradient filter
    compares with its threshold. ``(ceil(N / block_n), ceil(V / block_v))`` float64, 0 for a tile with no
    counted row. ``separate_targets``: the largest probability instead (targets are handled apart)."""
    h = np.asarray(hidden, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    counted = (y != ignore_index) & (np.asarray(upstream) != 0)
    logits = h @ w.T
    m = logits.max(axis=-1, keepdims=True)
    p = np.exp(logits - (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))))
    if not separate_targets:
        p[np.arange(len(y)), np.where(counted, y, 0)] -= np.where(counted, 1.0, 0.0)
    diff = np.where(counted[:, None], np.abs(p), 0.0)
    nb, vb = -(-len(y) // block_n), -(-w.shape[0] // block_v)
    padded = np.zeros((nb * block_n, vb * block_v))
    padded[: diff.shape[0], : diff.shape[1]] = diff
    return padded.reshape(nb, block_n, vb, block_v).max(axis=(1, 3))


def lce_filtered_ground_truth(hidden, weight, labels, upstream, eps: float, block_n: int, block_v: int,
                              ignore_index: int = -100, separate_targets: bool = False):
    """:func:`lce_ground_truth` with gradient filtering: every tile of the ``block_n × block_v`` grid
    whose :func:`filtered_tile_maxima` is below ``eps`` contributes nothing to the two gradients
    (``separate_targets``: nothing but its targets' exact ``−g`` entries)."""
    loss, _, _ = lce_ground_truth(hidden, weight, labels, upstream, ignore_index)
    h = np.asarray(hidden, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    valid = y != ignore_index
    safe = np.where(valid, y, 0)
    logits = h @ w.T
    m = logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits - (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))))
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(y)), safe] = 1.0
    maxima = filtered_tile_maxima(hidden, weight, labels, upstream, block_n, block_v, ignore_index, separate_targets)
    keep = maxima >= eps
    mask = np.repeat(np.repeat(keep, block_n, axis=0), block_v, axis=1)[: len(y), : w.shape[0]]
    grad_logits = probs * mask - onehot if separate_targets else (probs - onehot) * mask
    grad_logits *= np.where(valid, np.asarray(upstream, dtype=np.float64), 0.0)[:, None]
    return loss, grad_logits @ w, grad_logits.T @ h, keep


def threshold_between_tiles(tile_maxima, quantile: float = 0.5) -> float:
    """A filter threshold near ``quantile`` of the positive tile maxima, halfway (geometrically) across the
    widest gap among its neighbours, so no tile sits within rounding distance of it."""
    values = np.unique(tile_maxima[tile_maxima > 0])
    k = int(np.clip(round(quantile * (len(values) - 1)), 1, len(values) - 1))
    lo = max(1, k - 3)
    gaps = values[lo : k + 4] / values[lo - 1 : k + 3]
    j = lo + int(np.argmax(gaps))
    return float(np.sqrt(values[j - 1] * values[j]))


def lce_options_ground_truth(hidden, weight, labels, upstream, *, bias=None, softcap=None, label_smoothing=0.0,
                             lse_square_scale=0.0, upstream_lse=None, ignore_index: int = -100):
    """:func:`lce_ground_truth` with the loss options, written out by hand in float64.

    Per token: ``z = h·Wᵀ + b``; ``z' = c·tanh(z / c)`` with ``softcap`` ``c``; ``lse = logsumexp(z')``;
    ``loss = (1 − ε)(lse − z'_y) + ε(lse − mean_v z') + λ·lse²`` (0 where ignored). The gradients are
    those of ``sum(upstream · loss) + sum(upstream_lse · lse)`` (``lse`` 0 where ignored).

    Returns:
        ``(loss (N,), lse (N,), d_hidden (N, D), d_weight (V, D), d_bias (V,))`` in float64.
    """
    h = np.asarray(hidden, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    vocab = w.shape[0]
    valid = y != ignore_index
    safe = np.where(valid, y, 0)
    g = np.where(valid, np.asarray(upstream, dtype=np.float64), 0.0)
    g_lse = np.zeros_like(g) if upstream_lse is None else np.where(valid, np.asarray(upstream_lse, np.float64), 0.0)
    z = h @ w.T + (0.0 if bias is None else np.asarray(bias, dtype=np.float64)[None, :])
    zc = z if softcap is None else softcap * np.tanh(z / softcap)
    m = zc.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(zc - m).sum(axis=-1, keepdims=True)))[:, 0]
    target = zc[np.arange(len(y)), safe]
    eps, lam = float(label_smoothing), float(lse_square_scale)
    loss = (1 - eps) * (lse - target) + eps * (lse - zc.mean(axis=-1)) + lam * lse**2
    loss = np.where(valid, loss, 0.0)
    probs = np.exp(zc - lse[:, None])
    grad = probs * (g * (1 + 2 * lam * lse) + g_lse)[:, None] - (g * eps / vocab)[:, None]
    grad[np.arange(len(y)), safe] -= g * (1 - eps)
    if softcap is not None:
        grad *= 1 - (zc / softcap) ** 2
    return loss, np.where(valid, lse, 0.0), grad @ w, grad.T @ h, grad.sum(axis=0)


def shifted_options_ground_truth(hidden, weight, labels, upstream=None, *, shift: int = 0, reduction: str = "none",
                                 upstream_lse=None, ignore_index: int = -100, **options):
    """:func:`lce_options_ground_truth` as ``linear_cross_entropy`` sees it: ``(..., S, D)`` hidden,
    ``(..., S)`` labels, position ``t`` predicting ``labels[..., t + shift]`` (the last ``shift``
    positions ignored), the loss reduced by ``reduction``.

    Args:
        upstream: the per-token upstream gradient of shape ``labels[..., shift:].shape`` for
            ``"none"`` (ignored for ``"sum"``/``"mean"``, which imply theirs).
        upstream_lse: None or the upstream gradient of the returned lse, same shape.
        options: ``bias``, ``softcap``, ``label_smoothing``, ``lse_square_scale``.

    Returns:
        ``(loss, lse, d_hidden, d_weight, d_bias)`` in float64: ``loss`` of shape
        ``labels[..., shift:].shape`` for ``"none"`` (else a scalar), ``lse`` of that shape,
        ``d_hidden`` of the hidden's shape, ``d_bias`` None without a bias.
    """
    y = np.asarray(labels).astype(np.int64)
    lead, s, d = y.shape[:-1], y.shape[-1], np.shape(hidden)[-1]
    if shift:
        y = np.concatenate([y[..., shift:], np.full((*lead, shift), ignore_index)], axis=-1)
    kept = y[..., : s - shift]

    def pad(x):  # (..., S - shift) -> flat (N,), zeros at the positions without a target
        return np.concatenate([np.asarray(x, np.float64), np.zeros((*lead, shift))], axis=-1).reshape(-1)

    count = max(int((kept != ignore_index).sum()), 1)
    factor = {"sum": 1.0, "mean": 1.0 / count}.get(reduction)
    g = np.full(kept.shape, factor) if factor is not None else upstream
    loss, lse, d_hidden, d_weight, d_bias = lce_options_ground_truth(
        np.reshape(hidden, (-1, d)), weight, y.reshape(-1), pad(g),
        upstream_lse=None if upstream_lse is None else pad(upstream_lse), ignore_index=ignore_index, **options,
    )
    loss = loss.reshape(y.shape)[..., : s - shift]
    if factor is not None:
        loss = loss.sum() * factor
    d_bias = d_bias if options.get("bias") is not None else None
    return loss, lse.reshape(y.shape)[..., : s - shift], d_hidden.reshape(np.shape(hidden)), d_weight, d_bias
