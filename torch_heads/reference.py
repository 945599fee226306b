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


def reference_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-token loss of flat inputs.

    Args:
        hidden: ``(N, D)`` floating tensor.
        weight: ``(V, D)`` tensor of the same dtype.
        labels: ``(N,)`` integer tensor, each in ``[0, V)`` or ``ignore_index``.
        ignore_index: label value that gives loss 0 and gradient 0.

    Returns:
        ``(N,)`` loss in float32 (float64 for float64 inputs); differentiable in both inputs, to any order.
    """
    acc = math_dtype(hidden.dtype)
    logits = _Logits.apply(hidden.to(acc), weight.to(acc))
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none")
