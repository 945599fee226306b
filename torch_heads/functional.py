"""``linear_cross_entropy`` for PyTorch: one entry point, a registry of implementations.

Implementations (``impl=``), each an :class:`~heads_common.registry.Implementation` record of
``REGISTRY`` with its own support check:

* ``"cce"`` — CUDA, through ``cut_cross_entropy`` (float16/bfloat16/float32).
* ``"chunked"`` — any device, our own chunked ``autograd.Function`` (all float dtypes).
* ``"reference"`` — materialised logits, float32 math; the test oracle. Named only.
* ``"pallas"`` — CUDA (float16/bfloat16/float32), our JAX Pallas kernels called through
  ``interop`` zero-copy (``torch_heads/_pallas.py``; JAX is imported on first use). Named only.
  Reductions ``"sum"``/``"mean"`` form the gradients in the forward
  (``jax_heads.pallas.gradient_in_forward``) unless ``return_lse`` or a float ``filter_eps`` asks
  for the exact recomputing kernels.

``impl=None`` picks the first record marked ``auto`` (``"cce"``, then ``"chunked"``) that supports
the inputs and options; a named implementation that cannot run raises ``ValueError`` saying why,
never falling back silently. ``"pallas"`` is never picked by None: choosing it would start JAX in a
PyTorch process, and on near-uniform batches CCE's default gradient filter is faster than exact
gradients (``docs/benchmarks.md``).
"""

from __future__ import annotations

from typing import Literal

import torch

from heads_common import (
    LM_IGNORE_INDEX,
    check_filter_eps,
    check_ignore_index,
    check_ignore_index_fits,
    check_lce_shapes,
    check_reduction,
    label_range_message,
)
from heads_common.options import (
    check_bias_shape,
    check_label_smoothing,
    check_lse_square_scale,
    check_return_lse,
    check_shift,
    check_shift_fits,
    check_softcap,
)
from heads_common.registry import LOSS_OPTIONS, Implementation, LossOptions, Registry
from torch_heads import _cce, _pallas
from torch_heads._autograd import autocast_disabled, autocast_inputs
from torch_heads.chunked import chunked_loss
from torch_heads.reference import reference_loss

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Reduction = Literal["none", "sum", "mean"]


def _exact_reason(hidden: torch.Tensor, options: LossOptions) -> str | None:
    if options.filtered:
        return f"computes exact gradients only (filter_eps={options.filter_eps} asks for gradient filtering)"
    return None


def nan_where_infinite(per_token: torch.Tensor) -> torch.Tensor:
    """``per_token`` with NaN where it is ±inf: a token with inf/NaN in its hidden state has a NaN loss
    in every implementation and op (some log-sum-exps give inf there).

    Adding a constant (0 or NaN) keeps the gradient flowing unchanged.
    """
    return per_token + torch.where(torch.isinf(per_token), float("nan"), 0.0)


def _per_token(single):
    """The registry's loss function of a per-token implementation: the loss, its NaN rows, ``reduction``.
    ``single(hidden, weight, labels, options, bias)`` returns the per-token loss, or ``(loss, lse)``
    when ``options.return_lse``."""

    def loss(hidden, weight, labels, options: LossOptions, *, bias=None, bad=None):
        out = single(hidden, weight, labels, options, bias)
        per_token, lse = out if options.return_lse else (out, None)
        loss = reduce_loss(nan_where_infinite(per_token), labels != options.ignore_index, options.reduction)
        return loss if lse is None else (loss, lse)

    return loss


def _reference_tokens(hidden, weight, labels, o: LossOptions, bias):
    return reference_loss(
        hidden, weight, labels, o.ignore_index, bias, softcap=o.softcap, label_smoothing=o.label_smoothing,
        lse_square_scale=o.lse_square_scale, return_lse=o.return_lse,
    )


def _chunked_tokens(hidden, weight, labels, o: LossOptions, bias):
    return chunked_loss(
        hidden, weight, labels, o.ignore_index, bias=bias, softcap=o.softcap, label_smoothing=o.label_smoothing,
        lse_square_scale=o.lse_square_scale, return_lse=o.return_lse,
    )


def _pallas_tokens(hidden, weight, labels, options: LossOptions, bias):
    # "auto" is exact for our kernel; a float turns its gradient filtering on.
    eps = options.filter_eps if options.filtered else None
    return _pallas.pallas_loss(
        hidden, weight, labels, options.ignore_index, filter_eps=eps, bias=bias, softcap=options.softcap,
        label_smoothing=options.label_smoothing, lse_square_scale=options.lse_square_scale,
        return_lse=options.return_lse,
    )


def _pallas_loss(hidden, weight, labels, options: LossOptions, *, bias=None, bad=None):
    """The Pallas record: ``"sum"``/``"mean"`` form the gradients in the forward, else the per-token kernels."""
    from jax_heads.pallas import uses_gradient_in_forward

    if not uses_gradient_in_forward(options):
        return _per_token(_pallas_tokens)(hidden, weight, labels, options, bias=bias, bad=bad)
    return nan_where_infinite(_pallas.pallas_reduced_loss(
        hidden, weight, labels, options.ignore_index, options.reduction, bias=bias, softcap=options.softcap,
        label_smoothing=options.label_smoothing, lse_square_scale=options.lse_square_scale,
    ))


REGISTRY = Registry([
    Implementation("cce", lambda h, o: _cce.unsupported_reason(h, o.filter_eps),
                   _per_token(lambda h, w, y, o, b: _cce.cce_loss(h, w, y, o.ignore_index, o.filter_eps, o.softcap)),
                   options=frozenset({"softcap"})),
    Implementation("chunked", _exact_reason, _per_token(_chunked_tokens), options=frozenset(LOSS_OPTIONS)),
    Implementation("reference", _exact_reason, _per_token(_reference_tokens), auto=False,
                   options=frozenset(LOSS_OPTIONS)),
    Implementation("pallas", lambda h, o: _pallas.unsupported_reason(h, o.filter_eps, o.label_smoothing),
                   _pallas_loss, auto=False, options=frozenset(LOSS_OPTIONS)),
])
IMPLEMENTATIONS = REGISTRY.names


def check_tensors(hidden: object, weight: object, labels: object, weight_name: str = "weight") -> None:
    """The tensor checks both torch ops share (the vocabulary-parallel op names its weight ``weight_shard``).

    Raises:
        TypeError: a non-tensor or DTensor input, a non-float ``hidden``, a weight of another dtype,
            non-integer (bool, floating or complex) labels.
        ValueError: inputs on more than one device.
    """
    for name, value in (("hidden", hidden), (weight_name, weight), ("labels", labels)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    for name, value in (("hidden", hidden), (weight_name, weight), ("labels", labels)):
        if is_dtensor(value):
            raise TypeError(
                f"{name} is a DTensor ({value.placements}): pass a plain tensor, e.g. `.full_tensor()` for "
                "linear_cross_entropy, or the weight's local vocabulary shard (`.to_local()`) for "
                "torch_heads.parallel.vocab_parallel_linear_cross_entropy"
            )
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be a floating tensor of {[str(d) for d in FLOAT_DTYPES]}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{weight_name} dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    devices = {hidden.device, weight.device, labels.device}
    if len(devices) != 1:
        raise ValueError(
            f"hidden, {weight_name} and labels must be on one device, got {hidden.device}, {weight.device}, "
            f"{labels.device}"
        )


def is_dtensor(value: torch.Tensor) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (FSDP2/tensor-parallel parameters)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(value, DTensor)


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """Labels must lie in ``[0, vocab_size)`` or equal ``ignore_index``; returns them as int64.

    Labels are compared as the integers they are: widened to int64 before any comparison (a uint8
    label 156 would equal -100, an int8 50 would be >= 300), and a uint64 label of ``2**63`` or more,
    which int64 cannot hold (it would wrap onto a negative value, possibly ``ignore_index``), is out
    of range. The error quotes the offending label as given.

    On CPU this raises ``ValueError`` at once. On CUDA it enqueues an asynchronous device assert
    (``torch._assert_async``) instead of synchronising with the host: a bad label then surfaces as a
    ``RuntimeError`` at the next synchronisation, and the CUDA context is unusable afterwards
    (a device assert cannot be recovered from). A CUDA caller who wants a catchable error should
    validate labels on the host first.
    """
    wide = labels.long()
    bad = (wide != ignore_index) & ((wide < 0) | (wide >= vocab_size))
    if labels.dtype == torch.uint64:
        bad = bad | (wide < 0)  # wrapped: at least 2**63 as given (an unsigned label is never negative)
    if labels.device.type == "cuda":
        torch._assert_async(~bad.any(), f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}")
        return wide
    if labels.numel() and bool(bad.any()):
        position = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(label_range_message(labels[tuple(position)].item(), position, vocab_size, ignore_index))
    return wide


class _CheckedLabels(torch.autograd.Function):
    """:func:`check_label_range` as a Function: under ``torch.func.vmap`` its rule sees the whole batch of
    labels, where a data-dependent check of one element could not run (positions then count the mapped
    dimension first)."""

    @staticmethod
    def forward(labels, vocab_size: int, ignore_index: int):
        return check_label_range(labels, vocab_size, ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return None, None, None

    @staticmethod
    def vmap(info, in_dims, labels, vocab_size, ignore_index):
        return _CheckedLabels.apply(labels.movedim(in_dims[0], 0), vocab_size, ignore_index), 0


def loss_options(
    impl: object,
    *,
    ignore_index: object = LM_IGNORE_INDEX,
    reduction: object = "none",
    filter_eps: object = "auto",
    softcap: object = None,
    label_smoothing: object = 0.0,
    lse_square_scale: object = 0.0,
    shift: object = 0,
    return_lse: object = False,
    has_bias: bool = False,
) -> LossOptions:
    """Validate the options of :func:`linear_cross_entropy` into a :class:`~heads_common.registry.LossOptions`.

    Raises:
        TypeError, ValueError: as :func:`linear_cross_entropy` documents.
    """
    REGISTRY.check_name(impl)
    return LossOptions(
        ignore_index=check_ignore_index(ignore_index),
        reduction=check_reduction(reduction),
        filter_eps=check_filter_eps(filter_eps),
        softcap=check_softcap(softcap),
        label_smoothing=check_label_smoothing(label_smoothing),
        lse_square_scale=check_lse_square_scale(lse_square_scale),
        shift=check_shift(shift),
        return_lse=check_return_lse(return_lse),
        has_bias=has_bias,
    )


def select_implementation(hidden: torch.Tensor, impl: str | None, filter_eps: object = "auto", **options) -> str:
    """The implementation that will run for ``hidden`` (and a weight of its dtype and device).

    ``**options``: the other keyword options of :func:`linear_cross_entropy` (``reduction``, ``ignore_index``).

    Raises:
        ValueError: ``impl`` is unknown, or it (or, with ``impl=None``, every candidate) cannot run.
    """
    return REGISTRY.choose(impl, hidden, loss_options(impl, filter_eps=filter_eps, **options)).name


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
    bias: torch.Tensor | None = None,
    ignore_index: int = LM_IGNORE_INDEX,
    reduction: Reduction = "none",
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    shift: bool | int = 0,
    return_lse: bool = False,
    impl: str | None = None,
    filter_eps: float | Literal["auto"] | None = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without materialising the logits.

    Autocast: when ``torch.autocast`` is enabled for the inputs' device type at call time,
    ``hidden`` and ``weight`` are first cast (differentiably) to the autocast dtype, as ``F.linear``
    under autocast casts them (float16/bfloat16/float32 inputs; float64 stays), so a bfloat16
    ``hidden`` with a float32 ``weight`` works there; the implementation then computes with autocast
    off, in its forward and its backward, so a backward called inside or outside the autocast block
    gives the same gradients. Outside autocast, the dtype rules below apply as stated.

    Higher order: ``"chunked"`` and ``"reference"`` can be differentiated twice
    (``torch.autograd.grad(..., create_graph=True)``; ``"chunked"`` computes the second derivative
    chunk by chunk and refuses a third with a ``RuntimeError``, or a second when a loss option other
    than ``shift`` is set; ``"reference"`` supports any order),
    and compose with ``torch.func.grad``, ``vjp`` and ``vmap`` (``"chunked"`` maps by looping over
    the batch). See ``docs/robustness.md``.

    Args:
        hidden: ``(..., D)`` float16/bfloat16/float32/float64 tensor.
        weight: ``(V, D)`` tensor, same dtype and device as ``hidden`` (after autocast's cast).
        labels: ``(...)`` integer tensor (``hidden.shape[:-1]``), values in ``[0, V)`` or ``ignore_index``.
        bias: None or ``(V,)`` of the weight's dtype and device, added to the logits first; differentiable.
        ignore_index: label value that contributes loss 0 and gradient 0.
        reduction: ``"none"`` (per-token loss, shape of ``labels``), ``"sum"`` or ``"mean"``
            (mean over non-ignored tokens; 0 when every label is ignored).
        softcap: None or ``c > 0``: logits become ``c·tanh(logits / c)`` (after the bias).
        label_smoothing: ``ε`` in ``[0, 1)``: per counted token
            ``(1 − ε)·nll + ε·(lse − mean over V of the logits)`` (``F.cross_entropy``'s definition).
        lse_square_scale: ``λ >= 0``: adds ``λ·lse²`` per counted token (z-loss).
        shift: ``k >= 0`` (``True`` is 1): hidden position ``t`` predicts ``labels[..., t + k]`` (the
            labels are shifted, the hidden states are not copied); with ``"none"`` the loss has the
            shape of ``labels[..., k:]``. ``k`` must be smaller than the labels' last dimension.
        return_lse: also return the per-token log-sum-exp (float32, the per-token loss's shape
            whatever the reduction, 0 where ignored; differentiable).
        impl: ``"cce"``, ``"chunked"``, ``"reference"``, ``"pallas"`` or None for the best
            available (``"cce"`` on CUDA, ``"chunked"`` elsewhere; ``"pallas"`` only when named).
        filter_eps: gradient filtering. ``"auto"``: the implementation's default (CCE filters
            gradient tiles below about ``eps(dtype)/32``; the others are exact); ``None``: exact
            gradients everywhere; a float: the threshold below which a gradient tile is skipped
            (``cce`` and ``pallas``; ``pallas`` is exact under ``"auto"``).

    Returns:
        float32 loss (float64 for float64 inputs): shape ``labels.shape`` (``labels[..., k:].shape``
        with ``shift``) for ``"none"``, else a scalar; with ``return_lse``, ``(loss, lse)``.
        Gradients with respect to ``hidden`` and ``weight`` come back in their dtype. A token whose
        hidden state holds inf or NaN gets a NaN loss (and NaN gradients); the other tokens' losses
        and ``hidden`` gradients are unaffected. See ``docs/robustness.md``.

    Raises:
        TypeError: non-tensor inputs, a non-float ``hidden``, mismatched dtypes, non-integer labels.
        ValueError: shape mismatch, labels out of range, also an unsigned label beyond int64, quoted
            as given (eagerly on CPU; see :func:`check_label_range` for CUDA), bad
            ``reduction``/``filter_eps``, an ``impl`` that cannot run on these inputs.

    Example:
        >>> h = torch.randn(2, 5, 16, requires_grad=True)
        >>> w = torch.randn(100, 16, requires_grad=True)
        >>> y = torch.randint(0, 100, (2, 5))
        >>> linear_cross_entropy(h, w, y, reduction="mean").backward()
    """
    hidden, weight, bias = autocast_inputs(hidden, weight, bias)
    check_tensors(hidden, weight, labels)
    check_lce_shapes(hidden.shape, weight.shape, labels.shape)
    _check_bias(bias, weight)
    options = loss_options(
        impl, ignore_index=ignore_index, reduction=reduction, filter_eps=filter_eps, softcap=softcap,
        label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, shift=shift, return_lse=return_lse,
        has_bias=bias is not None,
    )
    check_shift_fits(options.shift, tuple(labels.shape))
    implementation = REGISTRY.choose(impl, hidden, options)
    check_ignore_index_fits(options.ignore_index, "int64", torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max)
    labels = _CheckedLabels.apply(labels, weight.shape[0], options.ignore_index)
    if options.shift:
        labels = shift_labels(labels, options.shift, options.ignore_index)

    n = labels.numel()  # not reshape(-1): under torch.func.vmap an empty batch could not infer it
    with autocast_disabled(hidden.device):
        out = implementation.loss(hidden.reshape(n, hidden.shape[-1]), weight, labels.reshape(n), options, bias=bias)
    loss, lse = out if options.return_lse else (out, None)
    if reduction == "none":
        loss = _unshift(loss.reshape(labels.shape), options.shift)
    if lse is None:
        return loss
    return loss, _unshift(lse.reshape(labels.shape), options.shift)


def shift_labels(labels: torch.Tensor, shift: int, ignore_index: int) -> torch.Tensor:
    """``labels[..., t + shift]`` at position ``t``, ``ignore_index`` at the last ``shift`` positions."""
    return torch.nn.functional.pad(labels[..., shift:], (0, shift), value=ignore_index)


def _unshift(x: torch.Tensor, shift: int) -> torch.Tensor:
    """The positions that have a target under ``shift``: ``x[..., :S - shift]``."""
    return x[..., : x.shape[-1] - shift] if shift else x


def _check_bias(bias: object, weight: torch.Tensor) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must equal the weight dtype {weight.dtype}")
    if bias.device != weight.device:
        raise ValueError(f"bias must be on the weight's device {weight.device}, got {bias.device}")
    check_bias_shape(tuple(bias.shape), weight.shape[0])
