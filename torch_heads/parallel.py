"""Vocabulary-parallel linear cross-entropy on ``torch.distributed``.

Each rank of a process group holds one contiguous shard of the ``(V, D)`` weight (rows
``vocab_start : vocab_start + V_shard``) and the same hidden states and labels. Per rank:

* forward: the shard's per-token partial log-sum-exp ``lse_k`` and target logit (0 where the label
  lies in another shard), combined with three ``all_reduce`` calls (max, sum of ``exp(lse_k − m)``,
  sum of target logits) into the global loss;
* backward: the shard's gradient logits against the global ``lse``, giving the rank's own
  ``d_weight`` shard and a partial ``d_hidden`` that one ``all_reduce`` (sum) completes.

How the shard's partials are computed: cut-cross-entropy 25.1.1 returns neither the log-sum-exp
nor a vocabulary-parallel mode, so every device uses our chunked building blocks
(:func:`torch_heads.chunked.chunked_lse_target`, :func:`torch_heads.chunked.chunked_backward`):
memory is bounded by one ``(chunk, V_shard)`` block of logits (plus, for float16/bfloat16, a float32
copy of the shard), with float32 accumulation on any device. Collectives are the group's own
(``gloo`` on CPU, ``nccl`` on CUDA): no other transport.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from heads_common import LM_IGNORE_INDEX, check_ignore_index, check_reduction
from torch_heads.chunked import DEFAULT_CHUNK_BUDGET_BYTES, chunk_rows_for, chunked_backward, chunked_lse_target
from torch_heads.functional import FLOAT_DTYPES, check_label_range, is_dtensor, reduce_loss
from torch_heads.reference import math_dtype


class _VocabParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start: int, ignore_index: int, group):
        counted = labels != ignore_index
        local = labels - vocab_start
        has_target = counted & (local >= 0) & (local < weight.shape[0])
        safe = torch.where(has_target, local, 0).long()
        rows = chunk_rows_for(weight.shape[0], torch.finfo(math_dtype(hidden.dtype)).bits // 8, DEFAULT_CHUNK_BUDGET_BYTES)
        lse_k, target = chunked_lse_target(hidden, weight, safe, has_target, rows)
        m = lse_k.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = torch.where(torch.isfinite(m), m, 0.0)  # an all -inf row stays -inf below, never NaN
        total = torch.exp(lse_k - m)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(target, op=dist.ReduceOp.SUM, group=group)
        lse = m + torch.log(total)
        ctx.save_for_backward(hidden, weight, safe, has_target, counted, lse)
        ctx.rows, ctx.group = rows, group
        return torch.where(counted, lse - target, 0.0)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, safe, has_target, counted, lse = ctx.saved_tensors
        need_h = ctx.needs_input_grad[0]
        d_hidden, d_weight = chunked_backward(
            hidden, weight, safe, has_target, counted, lse, grad_loss.contiguous(), (True, ctx.needs_input_grad[1]),
            ctx.rows,
        )
        # Every rank must join the all_reduce, whether or not it needs d_hidden itself.
        d_hidden = d_hidden.to(lse.dtype)
        dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
        return (d_hidden.to(hidden.dtype) if need_h else None), d_weight, None, None, None, None


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
) -> torch.Tensor:
    """Linear cross-entropy with this rank holding rows ``vocab_start : vocab_start + V_shard`` of the weight.

    Collective: every rank of ``group`` must call it with the same ``hidden``, ``labels``,
    ``vocab_size`` and reduction (and call backward).

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

    Returns:
        float32 loss (float64 for float64 inputs), the same on every rank. The gradient of
        ``weight_shard`` is this rank's shard of the full gradient; the gradient of ``hidden`` is the
        full one on every rank.
    """
    _check_plain_tensor("hidden", hidden)
    _check_plain_tensor("weight_shard", weight_shard)
    _check_plain_tensor("labels", labels)
    if hidden.dtype not in FLOAT_DTYPES or weight_shard.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight_shard must share one float dtype, got {hidden.dtype} and {weight_shard.dtype}")
    if labels.dtype == torch.bool or labels.is_floating_point():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if weight_shard.ndim != 2 or weight_shard.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight_shard must be (V_shard, {hidden.shape[-1]}), got {tuple(weight_shard.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    if not (0 <= vocab_start and vocab_start + weight_shard.shape[0] <= vocab_size):
        raise ValueError(
            f"shard rows [{vocab_start}, {vocab_start + weight_shard.shape[0]}) fall outside the vocabulary [0, {vocab_size})"
        )
    check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group first")
    # Widened first, as in linear_cross_entropy: comparisons wrap in narrow and unsigned dtypes.
    labels = labels.long()
    check_label_range(labels, vocab_size, ignore_index)
    flat_labels = labels.reshape(-1)
    loss = _VocabParallel.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight_shard, flat_labels, int(vocab_start), ignore_index, group
    )
    loss = reduce_loss(loss, flat_labels != ignore_index, reduction)
    return loss.reshape(labels.shape) if reduction == "none" else loss


def _check_plain_tensor(name: str, value: object) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if is_dtensor(value):
        raise TypeError(
            f"{name} is a DTensor ({value.placements}); pass a plain tensor: its local shard "
            f"(`.to_local()`) for the vocabulary-parallel op, or `.full_tensor()` for the single-device one"
        )


def shard_range(vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` rows of rank ``rank`` when ``vocab_size`` rows are split as evenly as possible."""
    base, extra = divmod(vocab_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)
