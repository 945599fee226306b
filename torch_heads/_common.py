"""Helpers shared by the CUDA paths of ``torch_heads`` (``_cce.py`` and ``_pallas.py``)."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # of the cce and pallas paths


def tensor_reason(hidden: torch.Tensor, *, cuda: bool = True) -> str | None:
    """Why the CUDA paths (``cce``, ``pallas``) cannot take ``hidden``'s device (when ``cuda``)
    or dtype, or None."""
    if cuda and hidden.device.type != "cuda":
        return f"needs CUDA tensors, got device {hidden.device}"
    if hidden.dtype not in SUPPORTED_DTYPES:
        return f"supports {[str(d) for d in SUPPORTED_DTYPES]}, got {hidden.dtype}"
    return None


class ZeroLoss(torch.autograd.Function):
    """Zeros of shape ``(N,)`` with zero gradients for hidden and weight (every label ignored)."""

    @staticmethod
    def forward(ctx, hidden, weight):
        ctx.save_for_backward(hidden, weight)
        return hidden.new_zeros(hidden.shape[0], dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight = ctx.saved_tensors
        return torch.zeros_like(hidden), torch.zeros_like(weight)
