"""The CUDA path on ``cut_cross_entropy`` (imported lazily), without its 25.1.1 pitfalls.

* Its backward calls ``grad_out.view(-1)``, which raises for a non-contiguous upstream gradient:
  the loss passes through :class:`_ContiguousGrad`, so CCE always receives a contiguous one.
* We always ask it for ``reduction="none"`` and reduce ourselves, so ``mean`` means the mean over
  non-ignored tokens in every implementation.
* With every label ignored its kernels would see an empty set of rows: we return zeros with zero
  gradients instead.
* Its backward accepts only float16/bfloat16 (an ``assert`` in 25.1.1). For float32 inputs that
  need gradients, the forward runs on CCE and the backward on our chunked recompute
  (:func:`torch_heads.chunked.chunked_grads`), from the log-sum-exp that CCE's loss implies
  (``lse = loss + target logit``, the target soft-capped like CCE's). The gradients are exact (no
  filter exists in that backward).
* Of the loss options, CCE has ``softcap`` (``c·tanh(logits / c)``, the same convention) and a
  boolean ``shift``; ``torch_heads.linear_cross_entropy`` shifts the labels itself, so only
  ``softcap`` is passed on. Bias, label smoothing, z-loss and a returned log-sum-exp are refused
  by the registry (``impl=None`` then picks ``chunked``).
"""

from __future__ import annotations

import torch

from torch_heads._autograd import autocast_disabled
from torch_heads._common import ZeroLoss, tensor_reason
from torch_heads.chunked import DEFAULT_CHUNK_BUDGET_BYTES, chunk_rows_for, chunked_grads


def unsupported_reason(hidden: torch.Tensor, filter_eps: object) -> str | None:
    """Why ``cce`` cannot run on these inputs, or None when it can."""
    reason = tensor_reason(hidden)
    if reason is not None:
        return reason
    try:
        import cut_cross_entropy  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        return f"cut_cross_entropy is not importable ({exc})"
    return None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _Float32Backward(torch.autograd.Function):
    """float32: CCE's loss (computed by the caller), our chunked gradients from ``lse = loss + target``.

    Autocast is off inside, and the gradients are :func:`torch_heads.chunked.chunked_grads`: they can
    be differentiated once more (second order), as on the ``chunked`` path.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, loss, ignore_index: int, softcap: float | None):
        with autocast_disabled(hidden.device):
            valid = labels != ignore_index
            safe_labels = torch.where(valid, labels, 0).long()
            target = torch.einsum("nd,nd->n", hidden, weight[safe_labels])
            if softcap is not None:
                target = target.div_(softcap).tanh_().mul_(softcap)
            ctx.save_for_backward(hidden, weight, labels, loss + target)
        ctx.ignore_index, ctx.softcap = ignore_index, softcap
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, labels, lse = ctx.saved_tensors
        rows = chunk_rows_for(weight.shape[0], 4, DEFAULT_CHUNK_BUDGET_BYTES)
        need_h, need_w = ctx.needs_input_grad[:2]
        d_hidden, d_weight = chunked_grads(
            hidden, weight, labels, lse, grad_loss, ctx.ignore_index, rows, need_h, need_w, softcap=ctx.softcap
        )
        return d_hidden, d_weight, None, None, None, None


def cce_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    filter_eps: float | str | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-token loss ``(N,)`` float32 of flat CUDA inputs through ``cut_cross_entropy``.

    ``filter_eps``: ``"auto"`` is CCE's default gradient filter (approximate gradients by
    design), ``None`` exact gradients, a float a custom threshold. ``softcap``: None or ``c > 0``,
    the logits ``c·tanh(hidden @ weight.T / c)``.
    """
    from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

    # CCE finds the valid rows with a nonzero() (a host sync) itself; this check costs one more.
    if hidden.shape[0] == 0 or not bool((labels != ignore_index).any()):
        return ZeroLoss.apply(hidden, weight)
    if hidden.dtype == torch.float32:
        with torch.no_grad():
            loss = cce_linear_cross_entropy(
                hidden, weight, labels, ignore_index=ignore_index, softcap=softcap, reduction="none", filter_eps=None,
                impl="cce",
            )
        return _Float32Backward.apply(hidden, weight, labels, loss.float(), ignore_index, softcap)
    loss = cce_linear_cross_entropy(
        hidden,
        weight,
        labels,
        ignore_index=ignore_index,
        softcap=softcap,
        reduction="none",
        filter_eps=filter_eps,
        impl="cce",
    )
    return _ContiguousGrad.apply(loss.float())
