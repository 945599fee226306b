"""Chunked linear cross-entropy for any device, as ``torch.autograd.Function``s.

The tokens are processed in chunks of ``chunk_rows``; at most one ``(chunk_rows, V)`` block of
logits (and its softmax, computed in place) exists at any time, in the forward and in the backward.
The forward saves only the per-token log-sum-exp; the backward recomputes each chunk's logits.

Three Functions, each the derivative of the one before: the loss, its gradients
(:func:`chunked_grads`, so a backward with ``create_graph=True`` can be differentiated again) and
their derivatives (``chunked_second_order``, two ``(chunk_rows / 2, V)`` blocks at a time);
differentiating those raises (no third order). With loss options (bias, softcap, label smoothing,
z-loss, returned log-sum-exp) the loss and its gradients are two other Functions, differentiable
once (a second order raises). The backward then builds ``dL/dz' = p·A − B·onehot − C`` from three
per-row coefficients (``row_coefficients``) and applies the softcap's derivative in place. All
compute with autocast off, compose with ``torch.func.grad``/``vjp`` and ``vmap`` (a loop over the
batch; ``torch_heads/_autograd.py``), and refuse forward-mode AD with a ``RuntimeError`` naming
``impl="reference"``. The chunk loops themselves are in ``torch_heads/_chunk_loops.py``.

Memory beyond inputs and outputs: one logits chunk (``chunk_budget_bytes``, 32 MiB by default;
the softcap's backward adds a quarter of one as a temporary), the float32 gradient accumulators,
and — for float16/bfloat16 inputs — one float32 copy of the weight (and bias) so that every
product accumulates and is rounded in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from torch_heads._autograd import autocast_disabled, vmap_by_loop
from torch_heads._chunk_loops import chunked_backward, chunked_lse_target, chunked_second_order, row_coefficients
from torch_heads.reference import loss_terms, math_dtype

DEFAULT_CHUNK_BUDGET_BYTES = 32 * 2**20

_NO_FORWARD_MODE = (
    "forward-mode AD (torch.func.jvp, jacfwd, hessian) is not supported by linear_cross_entropy(impl='chunked'); "
    "impl='reference' (plain autograd) supports it"
)


def chunk_rows_for(vocab_size: int, itemsize: int, budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk so that one ``(rows, V)`` logits block fits ``budget_bytes``."""
    return max(1, budget_bytes // (vocab_size * itemsize))


class _ChunkedFunction(torch.autograd.Function):
    """What every autograd Function of this module shares: ``torch.func.vmap`` by a loop over the
    batch (:func:`~torch_heads._autograd.vmap_by_loop`) and forward-mode AD refused with a clear error."""

    @classmethod
    def vmap(cls, info, in_dims, *args):
        return vmap_by_loop(cls, info, in_dims, *args)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_NO_FORWARD_MODE)


@dataclass(frozen=True)
class ChunkedOptions:
    """The static options of one chunked call with loss options (hashable; the loss options as
    ``torch_heads.linear_cross_entropy`` documents them)."""

    ignore_index: int
    chunk_rows: int
    softcap: float | None = None
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    return_lse: bool = False


class _ChunkedLinearCrossEntropy(_ChunkedFunction):
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


class _ChunkedGrads(_ChunkedFunction):
    """The loss's gradients (:func:`chunked_backward`) as a Function, so that they can be differentiated."""

    @staticmethod
    def forward(hidden, weight, labels, lse, grad_loss, ignore_index: int, chunk_rows: int, need_h: bool, need_w: bool):
        with autocast_disabled(hidden.device):
            valid = labels != ignore_index
            safe_labels = torch.where(valid, labels, 0).long()
            return chunked_backward(
                hidden, weight, safe_labels, valid, valid, lse, grad_loss, (need_h, need_w, False), chunk_rows
            )[:2]

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


class _ChunkedSecondOrder(_ChunkedFunction):
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


class _ChunkedOptionsLoss(_ChunkedFunction):
    """Per-token loss and log-sum-exp (0 where ignored) with loss options; the log-sum-exp is
    differentiable when ``options.return_lse``."""

    @staticmethod
    def forward(hidden, weight, bias, labels, options: ChunkedOptions):
        with autocast_disabled(hidden.device):
            valid = labels != options.ignore_index
            eps = options.label_smoothing
            lse, target, *row_sum = chunked_lse_target(
                hidden, weight, torch.where(valid, labels, 0).long(), valid, options.chunk_rows, bias=bias,
                softcap=options.softcap, row_sum=eps > 0,
            )
            loss = loss_terms(lse, target, row_sum[0] if eps else None, weight.shape[0], eps, options.lse_square_scale)
            return torch.where(valid, loss, 0.0), torch.where(valid, lse, 0.0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, bias, labels, options = inputs
        if not options.return_lse:
            ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(hidden, weight, bias, labels, output[1])
        ctx.options = options

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        grads = _ChunkedOptionGrads.apply(
            hidden, weight, bias, labels, lse, grad_loss, grad_lse if ctx.options.return_lse else None, ctx.options,
            *ctx.needs_input_grad[:3],
        )
        return *grads, None, None


class _ChunkedOptionGrads(_ChunkedFunction):
    """``(d_hidden, d_weight, d_bias)`` of the loss with options (None where not needed); a second order is refused."""

    @staticmethod
    def forward(hidden, weight, bias, labels, lse, grad_loss, grad_lse, options: ChunkedOptions, need_h: bool,
                need_w: bool, need_b: bool):
        with autocast_disabled(hidden.device):
            valid = labels != options.ignore_index
            coefficients = row_coefficients(
                grad_loss, grad_lse, lse, valid, weight.shape[0], options.label_smoothing, options.lse_square_scale
            )
            return chunked_backward(
                hidden, weight, torch.where(valid, labels, 0).long(), valid, valid, lse, coefficients,
                (need_h, need_w, need_b), options.chunk_rows, bias=bias, softcap=options.softcap,
            )

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "second-order derivatives of linear_cross_entropy with loss options (bias, softcap, label_smoothing, "
            "lse_square_scale, return_lse) are not supported by impl='chunked' (without them it differentiates "
            "twice); impl='reference' (plain autograd) supports any order"
        )


def chunked_grads(hidden, weight, labels, lse, grad_loss, ignore_index: int, chunk_rows: int, need_h: bool,
                  need_w: bool, *, softcap: float | None = None):
    """``(d_hidden, d_weight)`` of ``sum(grad_loss * loss)`` (None where not needed), differentiable once more
    (without ``softcap``).

    Args:
        hidden ``(N, D)``, weight ``(V, D)``: the forward's inputs.
        labels ``(N,)``: int64 in ``[0, V)`` or ``ignore_index``.
        lse ``(N,)``: the forward's log-sum-exp in the accumulation dtype.
        grad_loss ``(N,)``: upstream gradient of the per-token loss.
        chunk_rows: tokens per chunk. need_h, need_w: which gradients to compute.
        softcap: None, or the soft-cap ``c`` of the loss (its logits ``c·tanh(hidden @ weight.T / c)``).

    A second derivative (through ``hidden``, ``weight`` and ``grad_loss``) is computed chunk by chunk
    too (:func:`chunked_second_order`); a third, or a second with ``softcap``, raises ``RuntimeError``.
    """
    if softcap is None:
        return _ChunkedGrads.apply(hidden, weight, labels, lse, grad_loss, ignore_index, chunk_rows, need_h, need_w)
    options = ChunkedOptions(ignore_index, chunk_rows, softcap=softcap)
    return _ChunkedOptionGrads.apply(
        hidden, weight, None, labels, lse, grad_loss, None, options, need_h, need_w, False
    )[:2]


def chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    chunk_budget_bytes: int = DEFAULT_CHUNK_BUDGET_BYTES,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss of flat inputs without materialising the ``(N, V)`` logits.

    Args:
        hidden: ``(N, D)`` float16/bfloat16/float32/float64 tensor.
        weight: ``(V, D)`` tensor of the same dtype and device.
        labels: ``(N,)`` integer tensor, each in ``[0, V)`` or ``ignore_index``.
        ignore_index: label value that gives loss 0 and gradient 0.
        chunk_budget_bytes: the most bytes one logits chunk may take.
        bias, softcap, label_smoothing, lse_square_scale, return_lse: the loss options, as
            ``torch_heads.linear_cross_entropy`` documents them (validated there; ``bias`` ``(V,)`` of
            the weight's dtype and device). With any of them set the loss can be differentiated once.

    Returns:
        ``(N,)`` loss, float32 (float64 for float64 inputs), 0 where ignored; with ``return_lse``,
        ``(loss, lse)``, ``lse`` ``(N,)`` of the loss's dtype, 0 where ignored. Gradients come back in the
        inputs' dtypes.
    """
    itemsize = torch.finfo(math_dtype(hidden.dtype)).bits // 8
    rows = chunk_rows_for(weight.shape[0], itemsize, chunk_budget_bytes)
    if bias is None and softcap is None and not (label_smoothing or lse_square_scale or return_lse):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, rows)[0]
    options = ChunkedOptions(ignore_index, rows, softcap, label_smoothing, lse_square_scale, return_lse)
    loss, lse = _ChunkedOptionsLoss.apply(hidden, weight, bias, labels, options)
    return (loss, lse) if return_lse else loss
