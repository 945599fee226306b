"""Chunked linear cross-entropy for any device, as a ``torch.autograd.Function``.

The tokens are processed in chunks of ``chunk_rows``; at most one ``(chunk_rows, V)`` block of
logits (and its softmax, computed in place) exists at any time, in the forward and in the backward.
The forward saves only the per-token log-sum-exp; the backward recomputes each chunk's logits.

Memory beyond inputs and outputs: one logits chunk (``chunk_budget_bytes``, 32 MiB by default),
the float32 gradient accumulators, and — for float16/bfloat16 inputs — one float32 copy of the
weight so that every product accumulates and is rounded in float32.
"""

from __future__ import annotations

import torch

from torch_heads.reference import math_dtype

DEFAULT_CHUNK_BUDGET_BYTES = 32 * 2**20


def chunk_rows_for(vocab_size: int, itemsize: int, budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk so that one ``(rows, V)`` logits block fits ``budget_bytes``."""
    return max(1, budget_bytes // (vocab_size * itemsize))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk_rows: int):
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, 0).long()
        lse, target = chunked_lse_target(hidden, weight, safe_labels, valid, chunk_rows)
        ctx.save_for_backward(hidden, weight, safe_labels, valid, lse)
        ctx.chunk_rows = chunk_rows
        return torch.where(valid, lse - target, 0.0)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, safe_labels, valid, lse = ctx.saved_tensors
        d_hidden, d_weight = chunked_backward(
            hidden, weight, safe_labels, valid, valid, lse, grad_loss, ctx.needs_input_grad[:2], ctx.chunk_rows
        )
        return d_hidden, d_weight, None, None, None


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
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, rows)
