"""The Mosaic GPU logits of the gradient-in-forward chunks (:mod:`jax_heads.pallas.gradient_in_forward`).

With ``GradientInForwardConfig.logits_kernel`` resolving to ``"mosaic"`` (:func:`logits_kernel_for`), a
chunk's logits and their statistics come from one kernel: the Mosaic forward
(:func:`jax_heads.pallas.mosaic_forward.forward_partials` with ``store_logits``) stores every tile's raw
products while it forms the per-split partials, which are then combined in a fixed order
(:func:`jax_heads.pallas.op.combine_partials`).
"""

from __future__ import annotations

from jax_heads.pallas import mosaic_backward, mosaic_forward
from jax_heads.pallas import plan as geometry  # GPU queries through the module: tests replace them
from jax_heads.pallas.config import SMEM_LIMIT, BlockSizes, LogitOptions
from jax_heads.pallas.op import MOSAIC_BIAS_INTERPRET_REASON, combine_partials


def chunk_logits_and_stats(h, labels, weight, bias, *, vocab: int, config: BlockSizes, interpret: bool,
                           softcap: float | None, row_sum: bool):
    """One chunk's raw logits and statistics from the Mosaic forward with its logits store.

    Args:
        h: ``(rows, d_pad)`` bfloat16/float16, ``rows % config.mosaic.block_n == 0``.
        labels: ``(rows,)`` int32 (-1 or any id outside ``[0, vocab)``: no target).
        weight: ``(v_pad, d_pad)``, the vocabulary padded with zero rows to whole ``block_v`` tiles
            (less than one tile), ``d_pad`` a multiple of ``block_k``.
        bias: None or ``(v_pad,)`` float32.
        vocab: the real vocabulary size.
        config, interpret: the call's block sizes and interpret mode.
        softcap, row_sum: the logit options of the statistics.

    Returns:
        ``(z, (lse, target, row sum or None))``: ``z`` ``(rows, v_pad)`` in ``h``'s dtype, the raw
        products (no bias or softcap; zero in the padding columns), then ``(rows,)`` float32 each.
    """
    cfg = config.mosaic
    splits, tiles_per_split = mosaic_forward.choose_grid(
        h.shape[0], weight.shape[0], cfg, config.sm_count or geometry.sm_count())
    partials, logits = mosaic_forward.forward_partials(
        h, weight, labels, vocab_size=vocab, splits=splits, tiles_per_split=tiles_per_split, config=cfg,
        interpret=mosaic_forward.interpret_params() if interpret else None, bias=bias,
        options=LogitOptions(softcap, row_sum), store_logits=True)
    lse, target, *sums = combine_partials(*partials)
    return logits, (lse, target, (sums[0] if sums else None))


def _mosaic_reason(dtype, config: BlockSizes, interpret: bool, has_bias: bool) -> str | None:
    """Why the Mosaic forward with its logits store cannot form the chunks' logits, or None."""
    if (why := mosaic_forward.dtype_reason(dtype)) is not None:
        return why
    if mosaic_backward.smem_bytes(config.mosaic, dtype) > SMEM_LIMIT:
        return (f"its pipeline slots and logits tiles need {mosaic_backward.smem_bytes(config.mosaic, dtype)} bytes "
                f"of shared memory (> {SMEM_LIMIT}); lower BlockSizes.mosaic.max_concurrent_steps")
    if has_bias and interpret:
        return MOSAIC_BIAS_INTERPRET_REASON
    return geometry.hopper_reason()


def logits_kernel_for(dtype, config: BlockSizes, interpret: bool, has_bias: bool) -> str:
    """``"mosaic"`` or ``"xla"``: what ``config.gradient_in_forward.logits_kernel`` resolves to.

    ``"auto"`` gives ``"mosaic"`` for 16-bit inputs on a host whose GPUs are all Hopper parts,
    outside interpret mode (the rule of :func:`jax_heads.pallas.op.forward_kernel_for`; the shapes
    are padded to its tiles here).

    Raises:
        ValueError: ``"mosaic"`` named where it cannot run (the message says why). Without any GPU
            (``jax.export``, interpret mode) a named ``"mosaic"`` is kept.
    """
    return geometry.resolve_kernel("logits_kernel", config.gradient_in_forward.logits_kernel,
                                   lambda: _mosaic_reason(dtype, config, interpret, has_bias), interpret, "xla")
