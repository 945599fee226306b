"""Reference linear cross-entropy: materialised logits, float32 (or float64) math.

Short and obviously right: the test oracle and the fallback every fast path is checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for inputs of ``dtype``: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-token loss of flat inputs.

    Args:
        hidden: ``(N, D)`` floating tensor.
        weight: ``(V, D)`` tensor of the same dtype.
        labels: ``(N,)`` integer tensor, each in ``[0, V)`` or ``ignore_index``.
        ignore_index: label value that gives loss 0 and gradient 0.

    Returns:
        ``(N,)`` loss in float32 (float64 for float64 inputs); differentiable in both inputs.
    """
    acc = math_dtype(hidden.dtype)
    logits = hidden.to(acc) @ weight.to(acc).T
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none")
