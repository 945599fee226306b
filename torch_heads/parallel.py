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

from heads_common import (
    LM_IGNORE_INDEX,
    check_ignore_index,
    check_ignore_index_fits,
    check_interpret,
    check_lce_shapes,
    check_reduction,
)
from torch_heads import _common, _pallas
from torch_heads._autograd import autocast_disabled, autocast_inputs
from torch_heads.chunked import DEFAULT_CHUNK_BUDGET_BYTES, chunk_rows_for, chunked_backward, chunked_lse_target
from torch_heads.functional import check_label_range, check_tensors, nan_where_infinite, reduce_loss
from torch_heads.reference import math_dtype

PARALLEL_IMPLEMENTATIONS = ("pallas", "chunked")


# ------------------------------------------------------------------------------------------
# Per-shard building blocks. ``local`` labels are the target's row of the shard, -1 where the
# token has no target there (ignored, or labelled in another shard).
# ------------------------------------------------------------------------------------------


class _ChunkedShard:
    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor):
        itemsize = torch.finfo(math_dtype(hidden.dtype)).bits // 8
        self.rows = chunk_rows_for(max(weight.shape[0], 1), itemsize, DEFAULT_CHUNK_BUDGET_BYTES)

    def lse_target(self, hidden, weight, local):
        has_target = local >= 0
        return chunked_lse_target(hidden, weight, local.clamp_min(0), has_target, self.rows)

    def grads(self, hidden, weight, local, counted, lse, g, need_weight):
        d_hidden, d_weight = chunked_backward(
            hidden, weight, local.clamp_min(0), local >= 0, counted, lse, g, (True, need_weight), self.rows
        )
        return d_hidden.to(lse.dtype), d_weight


class _PallasShard:
    def __init__(self, interpret: bool):
        self.interpret = interpret

    def lse_target(self, hidden, weight, local):
        return _pallas.pallas_shard_lse_target(hidden, weight, local, interpret=self.interpret)

    def grads(self, hidden, weight, local, counted, lse, g, need_weight):
        # An infinite lse at ignored rows makes their recomputed softmax exactly 0 (as in chunked_backward).
        lse = torch.where(counted, lse, float("inf"))
        return _pallas.pallas_shard_grads(hidden, weight, local, lse, g, interpret=self.interpret)


class _VocabParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start: int, ignore_index: int, group, shard):
        with autocast_disabled(hidden.device):
            counted = labels != ignore_index
            local = labels - vocab_start
            local = torch.where(counted & (local >= 0) & (local < weight.shape[0]), local, -1)
            lse_k, target = shard.lse_target(hidden, weight, local)
            m = lse_k.clone()
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            m = torch.where(torch.isfinite(m), m, 0.0)  # an all -inf row stays -inf below, never NaN
            total = torch.exp(lse_k - m)
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(target, op=dist.ReduceOp.SUM, group=group)
            lse = m + torch.log(total)
        ctx.save_for_backward(hidden, weight, local, counted, lse)
        ctx.group, ctx.shard = group, shard
        return torch.where(counted, lse - target, 0.0)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local, counted, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        d_hidden, d_weight = _VocabParallelGrads.apply(
            hidden, weight, local, counted, lse, grad_loss, ctx.group, ctx.shard, need_h, need_w
        )
        return d_hidden, d_weight, None, None, None, None, None


class _VocabParallelGrads(torch.autograd.Function):
    """The op's gradients, as a Function so that differentiating them raises a clear error (no second order)."""

    @staticmethod
    def forward(ctx, hidden, weight, local, counted, lse, grad_loss, group, shard, need_h: bool, need_w: bool):
        with autocast_disabled(hidden.device):
            # Ignored rows get zero gradient whatever the upstream gradient holds (even NaN).
            g = torch.where(counted, grad_loss.to(lse.dtype), 0.0)
            d_hidden, d_weight = shard.grads(hidden, weight, local, counted, lse, g, need_w)
            # Every rank must join the all_reduce, whether or not it needs d_hidden itself.
            dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=group)
        return d_hidden.to(hidden.dtype) if need_h else None, d_weight if need_w else None

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


def select_parallel_implementation(hidden: torch.Tensor, impl: str | None, interpret: bool = False) -> str:
    """The per-shard implementation :func:`vocab_parallel_linear_cross_entropy` runs for ``hidden``.

    Args:
        hidden: the hidden states (their device and dtype decide).
        impl: ``"pallas"``, ``"chunked"`` or None (``"pallas"`` where it runs, else ``"chunked"``).
        interpret: run ``"pallas"`` in Pallas interpret mode (any device); only with ``impl="pallas"``.

    Raises:
        TypeError: ``interpret`` is not a bool.
        ValueError: an unknown ``impl``, ``interpret=True`` with another ``impl``, or ``"pallas"``
            that cannot run on these inputs (saying why).
    """
    check_interpret(interpret, impl, check_parallel_impl)
    if impl == "chunked":
        return impl
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
        hint = "" if hidden.device.type == "cuda" else "; interpret=True runs the kernels in Pallas interpret mode (tests)"
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
    ignore_index: int = LM_IGNORE_INDEX,
    reduction: str = "none",
    impl: str | None = None,
    interpret: bool = False,
) -> torch.Tensor:
    """Linear cross-entropy with this rank holding rows ``vocab_start : vocab_start + V_shard`` of the weight.

    Collective: every rank of ``group`` must call it with the same ``hidden``, ``labels``,
    ``vocab_size`` and reduction (and call backward).

    It shares the checks, the autocast rule and the non-finite semantics of
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
        ignore_index: label value with loss 0 and gradient 0.
        reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over non-ignored tokens).
        impl: per-shard computation: ``"pallas"`` (our JAX Pallas kernels through DLPack; CUDA
            float16/bfloat16/float32), ``"chunked"`` (any device and float dtype) or None
            (``"pallas"`` where it runs, else ``"chunked"``). The same on every rank.
        interpret: run the ``"pallas"`` kernels in Pallas interpret mode, on any device (tests;
            slow). Only with ``impl="pallas"``.

    Returns:
        float32 loss (float64 for float64 inputs), the same on every rank. The gradient of
        ``weight_shard`` is this rank's shard of the full gradient; the gradient of ``hidden`` is the
        full one on every rank.

    Raises:
        TypeError: non-tensor or DTensor inputs, mismatched or non-float dtypes, non-integer labels
            (as :func:`torch_heads.linear_cross_entropy`).
        ValueError: shapes (as :func:`torch_heads.linear_cross_entropy`, but a shard may hold no
            rows), a shard outside the vocabulary, labels out of range (eagerly on CPU; an unsigned
            label beyond int64 quoted as given), bad ``reduction``, an ``impl`` that is unknown or
            cannot run on these inputs.
        RuntimeError: ``torch.distributed`` is not initialised.

    Example (on every rank of a 2-process group)::

        start, stop = shard_range(V, rank, 2)
        loss = vocab_parallel_linear_cross_entropy(
            hidden, full_weight[start:stop], labels, vocab_start=start, vocab_size=V, reduction="mean")
        loss.backward()
    """
    hidden, weight_shard = autocast_inputs(hidden, weight_shard)
    check_tensors(hidden, weight_shard, labels, weight_name="weight_shard")
    check_lce_shapes(hidden.shape, weight_shard.shape, labels.shape, weight_name="weight_shard", allow_no_rows=True)
    if not (0 <= vocab_start and vocab_start + weight_shard.shape[0] <= vocab_size):
        raise ValueError(
            f"shard rows [{vocab_start}, {vocab_start + weight_shard.shape[0]}) fall outside the vocabulary [0, {vocab_size})"
        )
    check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    name = select_parallel_implementation(hidden, impl, interpret)
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group first")
    check_ignore_index_fits(ignore_index, "int64", torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max)
    labels = check_label_range(labels, vocab_size, ignore_index)
    flat_labels = labels.reshape(-1)
    shard = _PallasShard(interpret) if name == "pallas" else _ChunkedShard(hidden, weight_shard)
    with autocast_disabled(hidden.device):
        loss = _VocabParallel.apply(
            hidden.reshape(-1, hidden.shape[-1]), weight_shard, flat_labels, int(vocab_start), ignore_index, group, shard
        )
        loss = reduce_loss(nan_where_infinite(loss), flat_labels != ignore_index, reduction)
    return loss.reshape(labels.shape) if reduction == "none" else loss


def shard_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` rows of rank ``rank`` when ``vocab_size`` rows are split as evenly as possible."""
    base, extra = divmod(vocab_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)
