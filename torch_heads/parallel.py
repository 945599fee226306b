"""Vocabulary-parallel linear cross-entropy on ``torch.distributed``.

Each rank of a process group holds one contiguous shard of the ``(V, D)`` weight (rows
``vocab_start : vocab_start + V_shard``) and the same hidden states and labels. Per rank:

* forward: the shard's per-token partial log-sum-exp ``lse_k`` and target logit (0 where the label
  lies in another shard), combined with three ``all_reduce`` calls (max, sum of ``exp(lse_k − m)``,
  sum of target logits) into the global loss;
* backward: the shard's gradient logits against the global ``lse``, giving the rank's own
  ``d_weight`` shard and a partial ``d_hidden`` that one ``all_reduce`` (sum, float32) completes.

How the shard's partials are computed (``impl=``):

* ``"pallas"`` — CUDA (float16/bfloat16/float32): our JAX Pallas kernels
  (``jax_heads/pallas/``) on the torch tensors, zero-copy through :mod:`interop.dlpack`
  (``torch_heads/_pallas.py``, :func:`~torch_heads._pallas._shard_programs`); ``interpret=True``
  runs them in Pallas interpret mode on any device (tests).
* ``"chunked"`` — any device and float dtype: our chunked building blocks
  (:func:`torch_heads.chunked.chunked_lse_target`, :func:`torch_heads.chunked.chunked_backward`),
  memory bounded by one ``(chunk, V_shard)`` block of logits (plus, for float16/bfloat16, a float32
  copy of the shard).
* None — ``"pallas"`` where it runs (:func:`torch_heads._pallas.unsupported_reason`), else ``"chunked"``.

cut-cross-entropy (``impl="cce"`` of the single-device op) is not offered: 25.1.1 returns neither
the log-sum-exp nor has a vocabulary-parallel mode. Collectives are the group's own (``gloo`` on
CPU, ``nccl`` on CUDA): no other transport.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from heads_common import LM_IGNORE_INDEX, check_ignore_index_fits, check_interpret, check_lce_shapes
from heads_common.options import check_shift_fits
from heads_common.registry import LossOptions
from torch_heads import _common, _pallas
from torch_heads._autograd import autocast_disabled, autocast_inputs
from torch_heads._chunk_loops import RowCoefficients, chunked_backward, chunked_lse_target, row_coefficients
from torch_heads.chunked import DEFAULT_CHUNK_BUDGET_BYTES, chunk_rows_for
from torch_heads.functional import (
    _check_bias,
    check_label_range,
    check_tensors,
    loss_options,
    nan_where_infinite,
    reduce_loss,
    shift_labels,
)
from torch_heads.reference import loss_terms, math_dtype

PARALLEL_IMPLEMENTATIONS = ("pallas", "chunked")


# ------------------------------------------------------------------------------------------
# Per-shard building blocks. ``local`` labels are the target's row of the shard, -1 where the
# token has no target there (ignored, or labelled in another shard).
# ------------------------------------------------------------------------------------------


class _ChunkedShard:
    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor):
        itemsize = torch.finfo(math_dtype(hidden.dtype)).bits // 8
        self.rows = chunk_rows_for(max(weight.shape[0], 1), itemsize, DEFAULT_CHUNK_BUDGET_BYTES)

    def lse_target(self, hidden, weight, local, bias=None, softcap=None, row_sum=False):
        has_target = local >= 0
        return chunked_lse_target(
            hidden, weight, local.clamp_min(0), has_target, self.rows, bias=bias, softcap=softcap, row_sum=row_sum
        )

    def grads(self, hidden, weight, local, counted, lse, grad, needs, bias=None, softcap=None):
        d_hidden, d_weight, d_bias = chunked_backward(
            hidden, weight, local.clamp_min(0), local >= 0, counted, lse, grad, (True, *needs[1:]), self.rows,
            bias=bias, softcap=softcap,
        )
        return d_hidden.to(lse.dtype), d_weight, d_bias


class _PallasShard:
    """One shard on our Pallas kernels (``torch_heads._pallas``), every loss option included."""

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def lse_target(self, hidden, weight, local, bias=None, softcap=None, row_sum=False):
        return _pallas.pallas_shard_lse_target(hidden, weight, local, bias=bias, softcap=softcap, row_sum=row_sum,
                                               interpret=self.interpret)

    def grads(self, hidden, weight, local, counted, lse, g, needs, bias=None, softcap=None):
        # An infinite lse at ignored rows makes their recomputed softmax exactly 0 (as in chunked_backward).
        lse = torch.where(counted, lse, float("inf"))
        a, coefficients = (g.a, (g.b, g.c)) if isinstance(g, RowCoefficients) else (g, None)
        d_hidden, d_weight, *d_bias = _pallas.pallas_shard_grads(
            hidden, weight, local, lse, a, bias=bias, softcap=softcap, coefficients=coefficients,
            interpret=self.interpret,
        )
        return d_hidden, d_weight, (d_bias[0] if d_bias else None)


class _VocabParallel(torch.autograd.Function):
    """Per-token loss and log-sum-exp (0 where ignored; differentiable with ``options.return_lse``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, vocab_start: int, vocab_size: int, options: LossOptions, group,
                shard):
        plain = not options.loss_options
        with autocast_disabled(hidden.device):
            counted = labels != options.ignore_index
            local = labels - vocab_start
            local = torch.where(counted & (local >= 0) & (local < weight.shape[0]), local, -1)
            eps = options.label_smoothing
            if plain:
                lse_k, target = shard.lse_target(hidden, weight, local)
            else:
                lse_k, target, *row_sum = shard.lse_target(hidden, weight, local, bias, options.softcap, eps > 0)
            m = lse_k.clone()
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            m = torch.where(torch.isfinite(m), m, 0.0)  # an all -inf row stays -inf below, never NaN
            total = torch.exp(lse_k - m)
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
            if eps:  # the smoothing's row sum of logits: summed over the shards with the target logit
                sums = torch.stack([target, row_sum[0]])
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
                target, row_sum = sums
            else:
                dist.all_reduce(target, op=dist.ReduceOp.SUM, group=group)
                row_sum = None
            lse = m + torch.log(total)
            loss = loss_terms(lse, target, row_sum, vocab_size, eps, options.lse_square_scale)
        ctx.save_for_backward(hidden, weight, bias, local, counted, lse)
        ctx.vocab_size, ctx.options, ctx.group, ctx.shard = vocab_size, options, group, shard
        ctx.set_materialize_grads(False)
        if not options.return_lse:
            ctx.mark_non_differentiable(lse)
            return torch.where(counted, loss, 0.0), lse
        return torch.where(counted, loss, 0.0), torch.where(counted, lse, 0.0)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, bias, local, counted, lse = ctx.saved_tensors
        if grad_loss is None:
            grad_loss = torch.zeros_like(lse)
        grads = _VocabParallelGrads.apply(
            hidden, weight, bias, local, counted, lse, grad_loss, grad_lse if ctx.options.return_lse else None,
            ctx.vocab_size, ctx.options, ctx.group, ctx.shard, tuple(ctx.needs_input_grad[:3]),
        )
        return *grads, None, None, None, None, None, None


class _VocabParallelGrads(torch.autograd.Function):
    """The op's gradients, as a Function so that differentiating them raises a clear error (no second order)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, local, counted, lse, grad_loss, grad_lse, vocab_size: int,
                options: LossOptions, group, shard, needs):
        with autocast_disabled(hidden.device):
            if options.loss_options:  # the coefficients of dL/dz' from the global lse and vocabulary
                grad = row_coefficients(
                    grad_loss, grad_lse, lse, counted, vocab_size, options.label_smoothing, options.lse_square_scale
                )
                d_hidden, d_weight, d_bias = shard.grads(
                    hidden, weight, local, counted, lse, grad, needs, bias, options.softcap
                )
            else:
                # Ignored rows get zero gradient whatever the upstream gradient holds (even NaN).
                g = torch.where(counted, grad_loss.to(lse.dtype), 0.0)
                d_hidden, d_weight, d_bias = shard.grads(hidden, weight, local, counted, lse, g, needs)
            # Every rank must join the all_reduce, whether or not it needs d_hidden itself.
            dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=group)
        return d_hidden.to(hidden.dtype) if needs[0] else None, d_weight if needs[1] else None, d_bias

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "second-order derivatives are not supported by the vocabulary-parallel op; "
            "torch_heads.linear_cross_entropy with impl='chunked' (twice) or impl='reference' (any order) on the "
            "full weight supports them"
        )


def check_parallel_impl(impl: object) -> None:
    """``impl`` must be None or one of ``PARALLEL_IMPLEMENTATIONS`` (raises ``ValueError`` otherwise)."""
    if impl is not None and impl not in PARALLEL_IMPLEMENTATIONS:
        hint = " (cut-cross-entropy has no vocabulary-parallel mode)" if impl == "cce" else ""
        raise ValueError(
            f"impl must be None or one of {PARALLEL_IMPLEMENTATIONS} for the vocabulary-parallel op, got {impl!r}{hint}"
        )


def select_parallel_implementation(
    hidden: torch.Tensor, impl: str | None, interpret: bool = False, loss_options: frozenset[str] = frozenset()
) -> str:
    """The per-shard implementation :func:`vocab_parallel_linear_cross_entropy` runs for ``hidden``.

    Args:
        hidden: the hidden states (their device and dtype decide).
        impl: ``"pallas"``, ``"chunked"`` or None (``"pallas"`` where it runs, else ``"chunked"``).
        interpret: run ``"pallas"`` in Pallas interpret mode (any device); only with ``impl="pallas"``.
        loss_options: the names of the loss options the call sets (``LossOptions.loss_options``);
            both implementations support every option, so they do not change the choice.

    Raises:
        TypeError: ``interpret`` is not a bool.
        ValueError: an unknown ``impl``, ``interpret=True`` with another ``impl``, or ``"pallas"``
            that cannot run on these inputs or options (saying why).
    """
    del loss_options  # every implementation takes every option
    check_interpret(interpret, impl, check_parallel_impl)
    if impl == "chunked":
        return "chunked"
    if interpret:
        reason = _common.tensor_reason(hidden, cuda=False)
        if reason is not None:
            raise ValueError(f"impl='pallas' cannot run on these inputs: {reason}")
        return "pallas"
    # Only CUDA inputs import JAX here: a CPU process never starts it for impl=None.
    reason = _pallas.unsupported_reason(hidden, None)
    if impl is None:
        return "chunked" if reason else "pallas"
    if reason is not None:
        hint = (
            "" if hidden.device.type == "cuda" else "; interpret=True runs the kernels in Pallas interpret mode (tests)"
        )
        raise ValueError(f"impl='pallas' cannot run on these inputs: {reason}{hint}")
    return "pallas"


def vocab_parallel_linear_cross_entropy(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_start: int,
    vocab_size: int,
    group: dist.ProcessGroup | None = None,
    bias_shard: torch.Tensor | None = None,
    ignore_index: int = LM_IGNORE_INDEX,
    reduction: str = "none",
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    shift: bool | int = 0,
    return_lse: bool = False,
    impl: str | None = None,
    interpret: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Linear cross-entropy with this rank holding rows ``vocab_start : vocab_start + V_shard`` of the weight.

    Collective: every rank of ``group`` must call it with the same ``hidden``, ``labels``,
    ``vocab_size``, reduction and loss options (and call backward).

    It shares the checks, the autocast rule, the loss options and the non-finite semantics of
    :func:`torch_heads.linear_cross_entropy`: under ``torch.autocast`` the inputs are cast to the
    autocast dtype at the entry and the op computes with autocast off, forward and backward; a
    token whose hidden state holds inf or NaN gets a NaN loss. Its gradients cannot be
    differentiated again (a second derivative raises ``RuntimeError``).

    Args:
        hidden: ``(..., D)`` float16/bfloat16/float32/float64, identical on every rank of ``group``.
        weight_shard: ``(V_shard, D)``, same dtype and device (a plain tensor: a ``DTensor`` is
            refused, pass its local shard).
        labels: ``(...)`` global ids in ``[0, vocab_size)`` or ``ignore_index``, identical on every rank.
        vocab_start: first global row of this rank's shard.
        vocab_size: total vocabulary ``V`` (the shards must tile ``[0, V)`` without overlap).
        group: the process group the vocabulary is split over (default: the world).
        bias_shard: None or ``(V_shard,)``, this rank's rows of the bias (sharded like the weight), of
            the weight's dtype and device; its gradient is this rank's shard of the bias gradient.
        ignore_index: label value with loss 0 and gradient 0.
        reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over non-ignored tokens).
        softcap, label_smoothing, lse_square_scale, shift, return_lse: the loss options of
            :func:`torch_heads.linear_cross_entropy`, the same on every rank: soft-capping per shard,
            the smoothing's row sum of logits and the log-sum-exp combined over the group, the
            z-loss and the gradient coefficients from the global log-sum-exp.
        impl: per-shard computation: ``"pallas"`` (our JAX Pallas kernels through DLPack; CUDA
            float16/bfloat16/float32; without bias, softcap, label_smoothing, lse_square_scale or
            return_lse), ``"chunked"`` (any device and float dtype, every option) or None
            (``"pallas"`` where it runs and supports the options, else ``"chunked"``). The same on every rank.
        interpret: run the ``"pallas"`` kernels in Pallas interpret mode, on any device (tests;
            slow). Only with ``impl="pallas"``.

    Returns:
        float32 loss (float64 for float64 inputs), the same on every rank: shape ``labels.shape``
        (``labels[..., k:].shape`` with ``shift=k``) for ``"none"``, else a scalar; with
        ``return_lse``, ``(loss, lse)``, ``lse`` float32 (float64 for float64 inputs) of the per-token
        shape, 0 where ignored. The gradient of ``weight_shard`` (and ``bias_shard``) is this rank's
        shard of the full gradient; the gradient of ``hidden`` is the full one on every rank.

    Raises:
        TypeError: non-tensor or DTensor inputs, mismatched or non-float dtypes, non-integer labels,
            a bad option type (as :func:`torch_heads.linear_cross_entropy`).
        ValueError: shapes (as :func:`torch_heads.linear_cross_entropy`, but a shard may hold no
            rows), a shard outside the vocabulary, labels out of range (eagerly on CPU; an unsigned
            label beyond int64 quoted as given), bad ``reduction`` or option values, an ``impl`` that
            is unknown or cannot run on these inputs or options.
        RuntimeError: ``torch.distributed`` is not initialised.

    Example (on every rank of a 2-process group)::

        start, stop = shard_range(V, rank, 2)
        loss = vocab_parallel_linear_cross_entropy(
            hidden, full_weight[start:stop], labels, vocab_start=start, vocab_size=V, reduction="mean")
        loss.backward()
    """
    hidden, weight_shard, bias_shard = autocast_inputs(hidden, weight_shard, bias_shard)
    check_tensors(hidden, weight_shard, labels, weight_name="weight_shard")
    check_lce_shapes(hidden.shape, weight_shard.shape, labels.shape, weight_name="weight_shard", allow_no_rows=True)
    if not (0 <= vocab_start and vocab_start + weight_shard.shape[0] <= vocab_size):
        raise ValueError(
            f"shard rows [{vocab_start}, {vocab_start + weight_shard.shape[0]}) fall outside the vocabulary "
            f"[0, {vocab_size})"
        )
    _check_bias(bias_shard, weight_shard)
    options = loss_options(
        None, ignore_index=ignore_index, reduction=reduction, softcap=softcap, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale, shift=shift, return_lse=return_lse, has_bias=bias_shard is not None,
    )
    check_shift_fits(options.shift, tuple(labels.shape))
    name = select_parallel_implementation(hidden, impl, interpret, options.loss_options)
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group first")
    check_ignore_index_fits(options.ignore_index, "int64", torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max)
    labels = check_label_range(labels, vocab_size, options.ignore_index)
    if options.shift:
        labels = shift_labels(labels, options.shift, options.ignore_index)
    flat_labels = labels.reshape(-1)
    shard = _PallasShard(interpret) if name == "pallas" else _ChunkedShard(hidden, weight_shard)
    with autocast_disabled(hidden.device):
        loss, lse = _VocabParallel.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight_shard, bias_shard, flat_labels, int(vocab_start),
            int(vocab_size), options, group, shard,
        )
        loss = reduce_loss(nan_where_infinite(loss), flat_labels != options.ignore_index, options.reduction)

    def per_token(x):  # the positions that have a target under the shift
        x = x.reshape(labels.shape)
        return x[..., : x.shape[-1] - options.shift] if options.shift else x

    if options.reduction == "none":
        loss = per_token(loss)
    return (loss, per_token(lse)) if options.return_lse else loss


def shard_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` rows of rank ``rank`` when ``vocab_size`` rows are split as evenly as possible."""
    base, extra = divmod(vocab_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)
