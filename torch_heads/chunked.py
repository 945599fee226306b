"""Chunked linear cross-entropy for any device, as ``torch.autograd.Function``s.

The tokens are processed in chunks of ``chunk_rows``; at most one ``(chunk_rows, V)`` block of
logits (and its softmax, computed in place) exists at any time, in the forward and in the backward.
The forward saves only the per-token log-sum-exp; the backward recomputes each chunk's logits.

Three Functions, each the derivative of the one before: the loss, its gradients
(:func:`chunked_grads`, so a backward with ``create_graph=True`` can be differentiated again) and
their derivatives (:func:`chunked_second_order`, two ``(chunk_rows / 2, V)`` blocks at a time);
differentiating those raises (no third order). All three compute with autocast off, compose with
``torch.func.grad``/``vjp`` and ``vmap`` (a loop over the batch; ``torch_heads/_autograd.py``), and
refuse forward-mode AD with a ``RuntimeError`` naming ``impl="reference"``.

Memory beyond inputs and outputs: one logits chunk (``chunk_budget_bytes``, 32 MiB by default),
the float32 gradient accumulators, and — for float16/bfloat16 inputs — one float32 copy of the
weight so that every product accumulates and is rounded in float32.
"""

from __future__ import annotations

import torch

from torch_heads._autograd import autocast_disabled, vmap_by_loop
from torch_heads.reference import math_dtype

DEFAULT_CHUNK_BUDGET_BYTES = 32 * 2**20

_NO_FORWARD_MODE = (
    "forward-mode AD (torch.func.jvp, jacfwd, hessian) is not supported by linear_cross_entropy(impl='chunked'); "
    "impl='reference' (plain autograd) supports it"
)


def chunk_rows_for(vocab_size: int, itemsize: int, budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk so that one ``(rows, V)`` logits block fits ``budget_bytes``."""
    return max(1, budget_bytes // (vocab_size * itemsize))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token loss and (non-differentiable) log-sum-exp; the backward recomputes each chunk's logits."""

    @staticmethod
    def forward(hidden, weight, labels, ignore_index: int, chunk_rows: int):
        with autocast_disabled(hidden.device):
            valid = labels != ignore_index
            lse, target = chunked_lse_target(hidden, weight, torch.where(valid, labels, 0).long(), valid, chunk_rows)
            return torch.where(valid, lse - target, 0.0), lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, labels, ignore_index, chunk_rows = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(hidden, weight, labels, output[1])
        ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        d_hidden, d_weight = chunked_grads(
            hidden, weight, labels, lse, grad_loss, ctx.ignore_index, ctx.chunk_rows, need_h, need_w
        )
        return d_hidden, d_weight, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return vmap_by_loop(_ChunkedLinearCrossEntropy, info, in_dims, *args)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_NO_FORWARD_MODE)


class _ChunkedGrads(torch.autograd.Function):
    """The loss's gradients (:func:`chunked_backward`) as a Function, so that they can be differentiated."""

    @staticmethod
    def forward(hidden, weight, labels, lse, grad_loss, ignore_index: int, chunk_rows: int, need_h: bool, need_w: bool):
        with autocast_disabled(hidden.device):
            valid = labels != ignore_index
            safe_labels = torch.where(valid, labels, 0).long()
            return chunked_backward(
                hidden, weight, safe_labels, valid, valid, lse, grad_loss, (need_h, need_w), chunk_rows
            )

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, labels, lse, grad_loss, ignore_index, chunk_rows, _, _ = inputs
        ctx.save_for_backward(hidden, weight, labels, lse, grad_loss)
        ctx.ignore_index, ctx.chunk_rows = ignore_index, chunk_rows
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, u_hidden, u_weight):
        hidden, weight, labels, lse, grad_loss = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = _ChunkedSecondOrder.apply(
            hidden, weight, labels, lse, grad_loss, u_hidden, u_weight, ctx.ignore_index, ctx.chunk_rows,
            needs[0], needs[1], needs[4],
        )
        d_hidden, d_weight, d_grad_loss = grads
        return d_hidden, d_weight, None, None, d_grad_loss, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, *args):
        return vmap_by_loop(_ChunkedGrads, info, in_dims, *args)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_NO_FORWARD_MODE)


class _ChunkedSecondOrder(torch.autograd.Function):
    """The derivatives of the gradients (:func:`chunked_second_order`); a third order is refused."""

    @staticmethod
    def forward(hidden, weight, labels, lse, grad_loss, u_hidden, u_weight, ignore_index: int, chunk_rows: int,
                need_h: bool, need_w: bool, need_g: bool):
        with autocast_disabled(hidden.device):
            valid = labels != ignore_index
            safe_labels = torch.where(valid, labels, 0).long()
            return chunked_second_order(
                hidden, weight, safe_labels, valid, lse, grad_loss, u_hidden, u_weight, (need_h, need_w, need_g),
                max(1, chunk_rows // 2),  # two (rows, V) blocks per chunk: the memory of one first-order chunk
            )

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "third-order derivatives of linear_cross_entropy are not supported by impl='chunked' "
            "(it differentiates twice); impl='reference' (plain autograd) supports any order"
        )

    @staticmethod
    def vmap(info, in_dims, *args):
        return vmap_by_loop(_ChunkedSecondOrder, info, in_dims, *args)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_NO_FORWARD_MODE)


def chunked_grads(hidden, weight, labels, lse, grad_loss, ignore_index: int, chunk_rows: int, need_h: bool,
                  need_w: bool):
    """``(d_hidden, d_weight)`` of ``sum(grad_loss * loss)`` (None where not needed), differentiable once more.

    Args:
        hidden ``(N, D)``, weight ``(V, D)``: the forward's inputs.
        labels ``(N,)``: int64 in ``[0, V)`` or ``ignore_index``.
        lse ``(N,)``: the forward's log-sum-exp in the accumulation dtype.
        grad_loss ``(N,)``: upstream gradient of the per-token loss.
        chunk_rows: tokens per chunk. need_h, need_w: which gradients to compute.

    A second derivative (through ``hidden``, ``weight`` and ``grad_loss``) is computed chunk by chunk
    too (:func:`chunked_second_order`); a third raises ``RuntimeError``.
    """
    return _ChunkedGrads.apply(hidden, weight, labels, lse, grad_loss, ignore_index, chunk_rows, need_h, need_w)


def chunked_lse_target(hidden, weight, safe_labels, has_target, chunk_rows):
    """Per-token log-sum-exp over the rows of ``weight`` and the target logit, one chunk at a time.

    Args:
        hidden ``(N, D)``, weight ``(V, D)``.
        safe_labels ``(N,)`` int64 in ``[0, V)`` (any value where ``has_target`` is False).
        has_target ``(N,)`` bool: whether the token's label is a row of ``weight``.
        chunk_rows: tokens per chunk.

    Returns:
        ``(lse, target)``, each ``(N,)`` in the accumulation dtype; ``target`` is 0 where
        ``has_target`` is False.
    """
    acc = math_dtype(hidden.dtype)
    w = weight.to(acc)
    n = hidden.shape[0]
    lse = torch.empty(n, dtype=acc, device=hidden.device)
    target = torch.empty(n, dtype=acc, device=hidden.device)
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        logits = hidden[rows].to(acc) @ w.T
        lse[rows] = torch.logsumexp(logits, dim=-1)
        target[rows] = logits.gather(1, safe_labels[rows, None]).squeeze(1)
    return lse, torch.where(has_target, target, 0.0)


def chunked_backward(hidden, weight, safe_labels, has_target, counted, lse, grad_loss, needs_grad, chunk_rows):
    """Gradients of ``sum(grad_loss * loss)`` w.r.t. hidden and weight, one chunk of logits at a time.

    ``d loss / d logits = g · (exp(logits − lse) − onehot(label))``, with the one-hot term only
    where the label is a row of ``weight``. With a vocabulary-parallel weight shard, ``lse`` is the
    global log-sum-exp and ``has_target`` marks labels inside the shard.

    Args:
        hidden ``(N, D)``, weight ``(V, D)``: the forward's inputs.
        safe_labels ``(N,)`` int64 in ``[0, V)`` (any value where ``has_target`` is False).
        has_target ``(N,)`` bool: the label is a row of ``weight``.
        counted ``(N,)`` bool: the token is not ignored.
        lse ``(N,)``: per-token log-sum-exp in the accumulation dtype (unused where not counted).
        grad_loss ``(N,)``: upstream gradient (any layout, any values where not counted).
        needs_grad: (hidden, weight) flags; a gradient not needed is returned as None.
        chunk_rows: tokens per chunk.

    Returns:
        ``(d_hidden, d_weight)`` in the inputs' dtypes (or None where not needed).
    """
    need_h, need_w = needs_grad
    acc = lse.dtype
    w = weight.to(acc)
    n = hidden.shape[0]
    # Ignored rows get zero gradient whatever the upstream gradient holds (even NaN), and an
    # infinite lse so that their recomputed softmax is exactly 0 (never inf * 0).
    g = torch.where(counted, grad_loss.to(acc), 0.0)
    lse = torch.where(counted, lse, float("inf"))
    d_hidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
    d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        h = hidden[rows].to(acc)
        # d loss / d logits = g * (softmax - onehot(label)), built in place in the logits buffer.
        grad_logits = (h @ w.T).sub_(lse[rows, None]).exp_()
        idx = torch.arange(grad_logits.shape[0], device=h.device)
        grad_logits[idx, safe_labels[rows]] -= has_target[rows].to(acc)
        grad_logits.mul_(g[rows, None])
        if need_h:
            d_hidden[rows] = grad_logits @ w
        if need_w:
            d_weight.addmm_(grad_logits.T, h)
    return (
        d_hidden.to(hidden.dtype) if need_h else None,
        d_weight.to(weight.dtype) if need_w else None,
    )


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


def chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES,
) -> torch.Tensor:
    """Per-token loss of flat inputs without materialising the ``(N, V)`` logits.

    Args:
        hidden: ``(N, D)`` float16/bfloat16/float32/float64 tensor.
        weight: ``(V, D)`` tensor of the same dtype and device.
        labels: ``(N,)`` integer tensor, each in ``[0, V)`` or ``ignore_index``.
        ignore_index: label value that gives loss 0 and gradient 0.
        chunk_budget_bytes: the most bytes one logits chunk may take.

    Returns:
        ``(N,)`` loss, float32 (float64 for float64 inputs). Gradients come back in the inputs' dtype.
    """
    itemsize = torch.finfo(math_dtype(hidden.dtype)).bits // 8
    rows = chunk_rows_for(weight.shape[0], itemsize, chunk_budget_bytes)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, rows)[0]
