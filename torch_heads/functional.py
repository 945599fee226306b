"""``linear_cross_entropy`` for PyTorch: one entry point, a registry of implementations.

Implementations (``impl=``):

* ``"cce"`` — CUDA, through ``cut_cross_entropy`` (float16/bfloat16/float32).
* ``"chunked"`` — any device, our own chunked ``autograd.Function`` (all float dtypes).
* ``"reference"`` — materialised logits, float32 math; the test oracle.
* ``"pallas"`` — CUDA (float16/bfloat16/float32, exact gradients), our JAX Pallas kernels called
  through ``interop`` zero-copy (``torch_heads/_pallas.py``; JAX is imported on first use).

``impl=None`` picks the first of ``AUTO_ORDER`` that supports the inputs; a named implementation
that cannot run raises ``ValueError`` saying why, never falling back silently. ``"pallas"`` is
not in ``AUTO_ORDER``: on CUDA ``impl=None`` stays ``"cce"`` until the benchmark
(``benchmarks/bench.py``, rows ``torch_heads-pallas`` against ``cce`` and ``jax-pallas``) shows
otherwise, and choosing it would start JAX in a PyTorch process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from heads_common import (
    LM_IGNORE_INDEX,
    check_filter_eps,
    check_ignore_index,
    check_ignore_index_fits,
    check_lce_shapes,
    check_reduction,
    choose_implementation,
    label_range_message,
)
from torch_heads import _cce, _pallas
from torch_heads.chunked import chunked_loss
from torch_heads.reference import reference_loss

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Reduction = Literal["none", "sum", "mean"]


def _exact_only(hidden: torch.Tensor, filter_eps: object) -> str | None:
    if isinstance(filter_eps, float):
        return f"computes exact gradients only (filter_eps={filter_eps} asks for gradient filtering)"
    return None


# name -> (why it cannot run on these inputs or None, flat per-token loss function)
_IMPLEMENTATIONS: dict[str, tuple[Callable[..., str | None], Callable[..., torch.Tensor]]] = {
    "cce": (_cce.unsupported_reason, _cce.cce_loss),
    "chunked": (_exact_only, lambda h, w, y, ignore_index, filter_eps: chunked_loss(h, w, y, ignore_index)),
    "reference": (_exact_only, lambda h, w, y, ignore_index, filter_eps: reference_loss(h, w, y, ignore_index)),
    "pallas": (
        _pallas.unsupported_reason,
        # "auto" is exact for our kernel; a float turns its gradient filtering on.
        lambda h, w, y, ignore_index, filter_eps: _pallas.pallas_loss(
            h, w, y, ignore_index, filter_eps=filter_eps if isinstance(filter_eps, float) else None
        ),
    ),
}
AUTO_ORDER = ("cce", "chunked")
IMPLEMENTATIONS = tuple(_IMPLEMENTATIONS)


def _check_tensors(hidden: object, weight: object, labels: object) -> None:
    for name, value in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    for name, value in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if is_dtensor(value):
            raise TypeError(
                f"{name} is a DTensor ({value.placements}): pass a plain tensor, e.g. `.full_tensor()`, or use "
                "torch_heads.parallel.vocab_parallel_linear_cross_entropy with the weight's local vocabulary shard"
            )
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be a floating tensor of {[str(d) for d in FLOAT_DTYPES]}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    devices = {hidden.device, weight.device, labels.device}
    if len(devices) != 1:
        raise ValueError(
            f"hidden, weight and labels must be on one device, got {hidden.device}, {weight.device}, {labels.device}"
        )


def is_dtensor(value: torch.Tensor) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (FSDP2/tensor-parallel parameters)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(value, DTensor)


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels must lie in ``[0, vocab_size)`` or equal ``ignore_index``.

    On CPU this raises ``ValueError`` at once. On CUDA it enqueues an asynchronous device assert
    (``torch._assert_async``) instead of synchronising with the host: a bad label then surfaces as a
    ``RuntimeError`` at the next synchronisation, and the CUDA context is unusable afterwards
    (a device assert cannot be recovered from). A CUDA caller who wants a catchable error should
    validate labels on the host first.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if labels.device.type == "cuda":
        torch._assert_async(~bad.any(), f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}")
        return
    if labels.numel() and bool(bad.any()):
        position = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(label_range_message(int(labels[tuple(position)]), position, vocab_size, ignore_index))


def select_implementation(hidden: torch.Tensor, impl: str | None, filter_eps: object = "auto") -> str:
    """The implementation that will run for ``hidden`` (and a weight of its dtype and device).

    Raises:
        ValueError: ``impl`` is unknown, or it (or, with ``impl=None``, every candidate) cannot run.
    """
    return choose_implementation(
        impl, IMPLEMENTATIONS, AUTO_ORDER, lambda name: _IMPLEMENTATIONS[name][0](hidden, filter_eps)
    )


def reduce_loss(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` to a per-token loss; ``mean`` divides by the non-ignored count (0 if none)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp_min(1).to(total.dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = LM_IGNORE_INDEX,
    reduction: Reduction = "none",
    impl: str | None = None,
    filter_eps: float | Literal["auto"] | None = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without materialising the logits.

    Args:
        hidden: ``(..., D)`` float16/bfloat16/float32/float64 tensor.
        weight: ``(V, D)`` tensor, same dtype and device as ``hidden``.
        labels: ``(...)`` integer tensor (``hidden.shape[:-1]``), values in ``[0, V)`` or ``ignore_index``.
        ignore_index: label value that contributes loss 0 and gradient 0.
        reduction: ``"none"`` (per-token loss, shape of ``labels``), ``"sum"`` or ``"mean"``
            (mean over non-ignored tokens; 0 when every label is ignored).
        impl: ``"cce"``, ``"chunked"``, ``"reference"``, ``"pallas"`` or None for the best
            available (``"cce"`` on CUDA, ``"chunked"`` elsewhere; ``"pallas"`` only when named).
        filter_eps: gradient filtering. ``"auto"``: the implementation's default (CCE filters
            gradient tiles below about ``eps(dtype)/32``; the others are exact); ``None``: exact
            gradients everywhere; a float: the threshold below which a gradient tile is skipped
            (``cce`` and ``pallas``; ``pallas`` is exact under ``"auto"``).

    Returns:
        float32 loss (float64 for float64 inputs): shape ``labels.shape`` for ``"none"``, else a scalar.
        Gradients with respect to ``hidden`` and ``weight`` come back in their dtype. A token whose
        hidden state holds inf or NaN gets a NaN loss (and NaN gradients); the other tokens' losses
        and ``hidden`` gradients are unaffected. See ``docs/robustness.md``.

    Raises:
        TypeError: non-tensor inputs, a non-float ``hidden``, mismatched dtypes, non-integer labels.
        ValueError: shape mismatch, labels out of range (eagerly on CPU; see
            :func:`check_label_range` for CUDA), bad ``reduction``/``filter_eps``, an ``impl`` that
            cannot run on these inputs.

    Example:
        >>> h = torch.randn(2, 5, 16, requires_grad=True)
        >>> w = torch.randn(100, 16, requires_grad=True)
        >>> y = torch.randint(0, 100, (2, 5))
        >>> linear_cross_entropy(h, w, y, reduction="mean").backward()
    """
    _check_tensors(hidden, weight, labels)
    check_lce_shapes(hidden.shape, weight.shape, labels.shape)
    check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    filter_eps = check_filter_eps(filter_eps)
    name = select_implementation(hidden, impl, filter_eps)
    # Comparisons with a Python int wrap in narrow and unsigned dtypes (a uint8 label 156 equals
    # -100; an int8 label 50 is >= 300), so labels are widened to int64 before any check.
    labels = labels.long()
    check_ignore_index_fits(ignore_index, "int64", torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max)
    check_label_range(labels, weight.shape[0], ignore_index)

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    loss = _IMPLEMENTATIONS[name][1](flat_hidden, weight, flat_labels, ignore_index, filter_eps)
    # A row with non-finite logits (inf/NaN in its hidden state) is NaN in every implementation
    # (some log-sum-exps give inf there). Adding a constant keeps the gradient flowing unchanged.
    loss = loss + torch.where(torch.isinf(loss), float("nan"), 0.0)
    loss = reduce_loss(loss, flat_labels != ignore_index, reduction)
    return loss.reshape(labels.shape) if reduction == "none" else loss
