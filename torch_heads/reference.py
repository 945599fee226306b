"""Reference linear cross-entropy: materialised logits, float32 (or float64) math.

Short and obviously right: the test oracle and the fallback every fast path is checked against.
Plain autograd, so it can be differentiated to any order and composes with ``torch.func``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torch_heads._autograd import autocast_disabled


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Logits(torch.autograd.Function):
    """``a @ b.T`` with autocast off in the forward and in every order of backward.

    A plain matmul's backward follows the autocast state at backward time (inside an autocast
    block it would run in the autocast dtype); this one computes the same thing inside or outside.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a, b):
        with autocast_disabled(a.device):
            return a @ b.T

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        return _Logits.apply(grad, b.T) if need_a else None, _Logits.apply(grad.T, a.T) if need_b else None

    @staticmethod
    def jvp(ctx, a_tangent, b_tangent):
        a, b = ctx.saved_tensors
        terms = [_Logits.apply(a_tangent, b) if a_tangent is not None else None,
                 _Logits.apply(a, b_tangent) if b_tangent is not None else None]
        present = [t for t in terms if t is not None]
        return present[0] if len(present) == 1 else present[0] + present[1]


def transform_logits(logits: torch.Tensor, bias: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    """``logits + bias``, then ``softcap·tanh(· / softcap)`` (each only when given), in the logits' dtype."""
    if bias is not None:
        logits = logits + bias.to(logits.dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
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


def reference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    bias: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss and log-sum-exp of flat inputs.

    Args:
        hidden: ``(N, D)`` floating tensor.
        weight: ``(V, D)`` tensor of the same dtype.
        labels: ``(N,)`` integer tensor, each in ``[0, V)`` or ``ignore_index``.
        ignore_index: label value that gives loss 0 and gradient 0.
        bias: None or ``(V,)``, added to the logits.
        softcap, label_smoothing, lse_square_scale: the loss options (``torch_heads.linear_cross_entropy``).
        return_lse: also return the per-token log-sum-exp.

    Returns:
        ``(N,)`` loss in float32 (float64 for float64 inputs), 0 where ignored; with ``return_lse``,
        ``(loss, lse)`` (``lse`` 0 where ignored). Differentiable in ``hidden``, ``weight`` and ``bias``,
        to any order.
    """
    acc = math_dtype(hidden.dtype)
    logits = transform_logits(_Logits.apply(hidden.to(acc), weight.to(acc)), bias, softcap)
    if not (return_lse or label_smoothing or lse_square_scale):
        return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none")
    labels = labels.long()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, safe[:, None]).squeeze(1)
    row_sum = logits.sum(dim=-1) if label_smoothing else None
    loss = loss_terms(lse, target, row_sum, weight.shape[0], label_smoothing, lse_square_scale)
    zero = torch.zeros((), dtype=acc, device=hidden.device)
    loss = torch.where(valid, loss, zero)
    return (loss, torch.where(valid, lse, zero)) if return_lse else loss
