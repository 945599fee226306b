"""The chunk loops of the chunked implementation and of the vocabulary-parallel op's shards.

Each loop walks the tokens in chunks of ``chunk_rows``, with at most one ``(chunk_rows, V)`` block
of logits alive (the second order: two blocks of half as many rows; the softcap's backward: one
block and a quarter), and accumulates in float32 (float64 for float64 inputs). The autograd
Functions that call them are in ``torch_heads/chunked.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from torch_heads.reference import math_dtype


class RowCoefficients(NamedTuple):
    """Per-row coefficients of the gradient logits ``dL/dz' = p·a − b·onehot(label) − c`` (``(N,)`` each,
    in the accumulation dtype, 0 at ignored rows; ``c`` None when there is no label smoothing)."""

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor | None


def row_coefficients(grad_loss, grad_lse, lse, counted, vocab_size: int, label_smoothing: float,
                     lse_square_scale: float) -> RowCoefficients:
    """The coefficients of ``dL/dz'`` for the upstream gradients of the per-token loss and log-sum-exp.

    ``loss = (1 − ε)(lse − z'_y) + ε(lse − Σ z' / V) + λ·lse²`` gives ``a = g·(1 + 2λ·lse) + g_lse``,
    ``b = g·(1 − ε)``, ``c = g·ε / V``.

    Args:
        grad_loss ``(N,)``: upstream gradient of the per-token loss (any values where not counted).
        grad_lse ``(N,)`` or None: upstream gradient of the returned log-sum-exp.
        lse ``(N,)``: the (global) log-sum-exp in the accumulation dtype.
        counted ``(N,)`` bool: the token is not ignored.
        vocab_size: the (global) vocabulary size ``V``.
        label_smoothing, lse_square_scale: ``ε`` and ``λ``.
    """
    acc = lse.dtype
    g = torch.where(counted, grad_loss.to(acc), 0.0)
    a = g * (1.0 + (2.0 * lse_square_scale) * lse) if lse_square_scale else g
    if grad_lse is not None:
        a = a + grad_lse.to(acc)
    a = torch.where(counted, a, 0.0)  # also where lse or grad_lse is not finite at an ignored row
    b = g * (1.0 - label_smoothing) if label_smoothing else g
    c = g * (label_smoothing / vocab_size) if label_smoothing else None
    return RowCoefficients(a, b, c)


def chunked_lse_target(hidden, weight, safe_labels, has_target, chunk_rows, *, bias=None, softcap=None,
                       row_sum: bool = False):
    """Per-token log-sum-exp over the rows of ``weight`` and the target logit, one chunk at a time.

    Args:
        hidden ``(N, D)``, weight ``(V, D)``.
        safe_labels ``(N,)`` int64 in ``[0, V)`` (any value where ``has_target`` is False).
        has_target ``(N,)`` bool: whether the token's label is a row of ``weight``.
        chunk_rows: tokens per chunk.
        bias: None or ``(V,)``, added to the logits. softcap: None or ``c``: the logits become
            ``c·tanh(logits / c)`` (after the bias).
        row_sum: also return each token's sum of the (transformed) logits.

    Returns:
        ``(lse, target)``, each ``(N,)`` in the accumulation dtype, and ``row_sum`` after them when
        asked; ``target`` is 0 where ``has_target`` is False.
    """
    acc = math_dtype(hidden.dtype)
    w = weight.to(acc)
    b = None if bias is None else bias.to(acc)
    n = hidden.shape[0]
    lse = torch.empty(n, dtype=acc, device=hidden.device)
    target = torch.empty(n, dtype=acc, device=hidden.device)
    sums = torch.empty(n, dtype=acc, device=hidden.device) if row_sum else None
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        h = hidden[rows].to(acc)
        logits = h @ w.T if b is None else torch.addmm(b, h, w.T)
        if softcap is not None:
            logits.div_(softcap).tanh_().mul_(softcap)
        lse[rows] = torch.logsumexp(logits, dim=-1)
        target[rows] = logits.gather(1, safe_labels[rows, None]).squeeze(1)
        if row_sum:
            sums[rows] = logits.sum(dim=-1)
    target = torch.where(has_target, target, 0.0)
    return (lse, target, sums) if row_sum else (lse, target)


def chunked_backward(hidden, weight, safe_labels, has_target, counted, lse, grad, needs_grad, chunk_rows, *,
                     bias=None, softcap=None):
    """Gradients of the loss w.r.t. hidden, weight and bias, one chunk of logits at a time.

    Plain loss (``grad`` a tensor ``g``): ``d loss / d logits = g · (exp(logits − lse) − onehot(label))``,
    with the one-hot term only where the label is a row of ``weight``. With loss options (``grad`` a
    :class:`RowCoefficients`): ``d loss / d z' = p·a − b·onehot − c`` on the transformed logits ``z'``
    (``p = exp(z' − lse)``), times ``1 − (z' / softcap)²`` with ``softcap``. With a
    vocabulary-parallel weight shard, ``lse`` is the global log-sum-exp, ``has_target`` marks labels
    inside the shard and the coefficients come from the global loss.

    Args:
        hidden ``(N, D)``, weight ``(V, D)``: the forward's inputs.
        safe_labels ``(N,)`` int64 in ``[0, V)`` (any value where ``has_target`` is False).
        has_target ``(N,)`` bool: the label is a row of ``weight``.
        counted ``(N,)`` bool: the token is not ignored.
        lse ``(N,)``: per-token log-sum-exp in the accumulation dtype (unused where not counted).
        grad: the upstream gradient ``(N,)`` of the plain loss (any layout, any values where not
            counted), or the :class:`RowCoefficients` of a loss with options.
        needs_grad: (hidden, weight, bias) flags; a gradient not needed is returned as None.
        chunk_rows: tokens per chunk.
        bias: None or ``(V,)``, added to the logits. softcap: None or ``c`` (after the bias).

    Returns:
        ``(d_hidden, d_weight, d_bias)`` in the dtypes of hidden, weight and bias (or None where not needed).
    """
    need_h, need_w, need_b = needs_grad
    acc = lse.dtype
    w = weight.to(acc)
    b = None if bias is None else bias.to(acc)
    n = hidden.shape[0]
    if isinstance(grad, RowCoefficients) or softcap is not None:
        if not isinstance(grad, RowCoefficients):
            grad = RowCoefficients(*(torch.where(counted, grad.to(acc), 0.0),) * 2, None)
        coefficients = (grad.a, torch.where(has_target, grad.b, 0.0), grad.c)
    else:
        coefficients = None
        # Ignored rows get zero gradient whatever the upstream gradient holds (even NaN).
        g = torch.where(counted, grad.to(acc), 0.0)
    # An infinite lse at ignored rows makes their recomputed softmax exactly 0 (never inf * 0).
    lse = torch.where(counted, lse, float("inf"))
    d_hidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    d_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        h = hidden[rows].to(acc)
        logits = h @ w.T if b is None else torch.addmm(b, h, w.T)
        idx = torch.arange(logits.shape[0], device=h.device)
        if coefficients is None:
            # d loss / d logits = g * (softmax - onehot(label)), built in place in the logits buffer.
            grad_logits = logits.sub_(lse[rows, None]).exp_()
            grad_logits[idx, safe_labels[rows]] -= has_target[rows].to(acc)
            grad_logits.mul_(g[rows, None])
        else:
            a, bt, c = (None if x is None else x[rows] for x in coefficients)
            grad_logits = _option_grad_logits_(logits, idx, safe_labels[rows], lse[rows], a, bt, c, softcap)
        if need_h:
            d_hidden[rows] = grad_logits @ w
        if need_w:
            d_weight.addmm_(grad_logits.T, h)
        if need_b:
            d_bias += grad_logits.sum(dim=0)
    return (
        d_hidden.to(hidden.dtype) if need_h else None,
        d_weight.to(weight.dtype) if need_w else None,
        d_bias.to(bias.dtype) if need_b else None,
    )


def _option_grad_logits_(logits, idx, labels, lse, a, b, c, softcap):
    """``dL/dz`` of one chunk in place of its ``logits`` (``(rows, V)``, bias included):
    ``(p·a − b·onehot − c)·(1 − (z'/softcap)²)``, ``p = exp(z' − lse)``,
    ``z' = softcap·tanh(logits/softcap)``."""
    if softcap is None:
        grad = logits.sub_(lse[:, None]).exp_().mul_(a[:, None])
        if c is not None:
            grad.sub_(c[:, None])
        grad[idx, labels] -= b
        return grad
    t = logits.div_(softcap).tanh_()  # z' / softcap
    t_target = t[idx, labels]
    # p needs t and so does the softcap's derivative: a quarter of the chunk at a time in a temporary.
    step = max(1, -(-t.shape[0] // 4))
    for start in range(0, t.shape[0], step):
        part = slice(start, start + step)
        tp = t[part]
        p_term = tp.mul(softcap).sub_(lse[part, None]).exp_().mul_(a[part, None])
        if c is not None:
            p_term.sub_(c[part, None])
        tp.square_().neg_().add_(1.0).mul_(p_term)
    t[idx, labels] -= b * (1.0 - t_target * t_target)
    return t


def chunked_second_order(hidden, weight, safe_labels, valid, lse, grad_loss, u_hidden, u_weight, needs, chunk_rows):
    """Derivatives of ``<u_hidden, d_hidden> + <u_weight, d_weight>``, the gradients of :func:`chunked_backward`
    contracted with their cotangents, w.r.t. hidden, weight and grad_loss, one chunk of logits at a time.

    Per counted row, with ``P = softmax(logits)``, ``G = g · (P − onehot(label))`` (so that
    ``d_hidden = G W`` and ``d_weight = Gᵀ H``) and ``A = U Wᵀ + H Qᵀ`` (``U = u_hidden``,
    ``Q = u_weight``: the cotangent of ``G``): ``d g = ⟨A, P − onehot⟩``,
    ``d logits = g · P ⊙ (A − ⟨P, A⟩)`` (the softmax Jacobian), ``d H = (d logits) W + G Q`` and
    ``d W = (d logits)ᵀ H + Gᵀ U``. Ignored rows contribute nothing.

    Args:
        hidden ``(N, D)``, weight ``(V, D)``, safe_labels ``(N,)`` int64 in ``[0, V)``, valid ``(N,)``
            bool, lse ``(N,)`` in the accumulation dtype, grad_loss ``(N,)``: as for :func:`chunked_backward`.
        u_hidden ``(N, D)``, u_weight ``(V, D)``: the cotangents, or None for zero.
        needs: (hidden, weight, grad_loss) flags; a derivative not needed is returned as None.
        chunk_rows: tokens per chunk (two ``(chunk_rows, V)`` blocks exist at a time).

    Returns:
        ``(d_hidden, d_weight, d_grad_loss)`` in the dtypes of hidden, weight and grad_loss.
    """
    need_h, need_w, need_g = needs
    acc = lse.dtype
    w = weight.to(acc)
    q = None if u_weight is None else u_weight.to(acc)
    n = hidden.shape[0]
    g = torch.where(valid, grad_loss.to(acc), 0.0)
    lse = torch.where(valid, lse, float("inf"))  # a recomputed softmax of exactly 0 at ignored rows
    d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    d_grad = torch.zeros(n, dtype=acc, device=hidden.device) if need_g else None
    for start in range(0, n if u_hidden is not None or q is not None else 0, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        h = hidden[rows].to(acc)
        u = None if u_hidden is None else u_hidden[rows].to(acc)
        idx = torch.arange(h.shape[0], device=h.device)
        target = safe_labels[rows]
        p = (h @ w.T).sub_(lse[rows, None]).exp_()
        a = torch.zeros_like(p)
        if u is not None:
            a.addmm_(u, w.T)
        if q is not None:
            a.addmm_(h, q.T)
        pa = torch.einsum("nv,nv->n", p, a)
        if need_g:
            d_grad[rows] = torch.where(valid[rows], pa - a[idx, target], 0.0)
        d_logits = a.sub_(pa[:, None]).mul_(p).mul_(g[rows, None])
        grad_logits = p.mul_(g[rows, None])
        grad_logits[idx, target] -= g[rows]  # g is 0 at ignored rows
        if need_h:
            d_hidden[rows] = d_logits @ w
            if q is not None:
                d_hidden[rows] += grad_logits @ q
        if need_w:
            d_weight.addmm_(d_logits.T, h)
            if u is not None:
                d_weight.addmm_(grad_logits.T, u)
    return (
        d_hidden.to(hidden.dtype) if need_h else None,
        d_weight.to(weight.dtype) if need_w else None,
        d_grad.to(grad_loss.dtype) if need_g else None,
    )
