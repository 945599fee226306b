"""The Mosaic GPU gradient-logits kernel (Hopper: TMA + WGMMA, warp specialised) and its choice.

It writes what the Triton kernel ``lce_grad_logits`` of :mod:`jax_heads.pallas.backward` writes for
one vocabulary chunk: ``G = dL/dz`` as an ``(n_pad, chunk_v)`` array in the input dtype, the chunk's
columns below ``lo`` and at or past the real vocabulary size as zeros.

Design: the forward's mainloop (:mod:`jax_heads.pallas.mosaic_pipeline`) with another epilogue.
One CTA per (token block, vocabulary split of the chunk's tiles) (:func:`mosaic_forward.choose_grid`
on the chunk), two compute warpgroups of ``block_n / 2`` rows each and one memory warpgroup walking
the flat (tile, D step) sequence of its split. Per tile, in registers, on the float32 accumulator::

    z  = acc (+ bias)                      z' = c·tanh(z / c) with a softcap, else z
    p  = exp2(z'·log2 e − lse·log2 e)      (one FMA and one ex2 per element)
    G  = (p − [v == y])·g                  or p·A − B·[v == y] − C with the loss options
    G *= 1 − tanh²(z / c) = 4q(1 − q)      with a softcap (q = 1/(1 + exp(2z/c)), as in the cap itself)

then ``G`` is cast to the input dtype, stored to a 128-byte-swizzled SMEM tile (one per compute
warpgroup) and written with a TMA store; the store of tile ``t`` drains while tile ``t + 1``'s
products run (its SMEM is reused only after ``wait_smem_to_gmem(wait_read_only)``). Tiles are
independent: no reduction across CTAs. The chunk's bounds (``lo``, ``start``) are scalars read from
global memory, so one compiled kernel serves every chunk of the backward's loop; its weight rows
(and bias) come as a slice of the chunk (see :func:`grad_logits_call`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jax_heads.pallas import mosaic_forward
from jax_heads.pallas import plan as geometry  # GPU queries through the module: tests replace them
from jax_heads.pallas.config import COMPUTE_WARPGROUPS, SMEM_LIMIT, BlockSizes, MosaicForwardConfig
from jax_heads.pallas.epilogue import LOG2E, softcap_and_derivative
from jax_heads.pallas.mosaic_pipeline import (
    layout_cast,
    load_steps,
    mma_steps,
    slot_transforms,
    store_scratch,
    store_tile,
)
from jax_heads.pallas.plan import Plan


def smem_bytes(config: MosaicForwardConfig, dtype) -> int:
    """Shared memory of one CTA: the pipeline slots and row vectors (as the forward's) and the output tiles."""
    return config.smem_bytes(dtype) + config.block_n * config.block_v * jnp.dtype(dtype).itemsize


def _mosaic_reason(dtype, plan: Plan, config: BlockSizes, filtered: bool) -> str | None:
    """Why the Mosaic gradient-logits kernel cannot take these padded inputs, or None."""
    m = config.mosaic
    if filtered:
        return "gradient filtering (filter_eps) flags tiles in the Triton kernel only"
    if (why := mosaic_forward.dtype_reason(dtype)) is not None:
        return why
    if plan.n_pad % m.block_n or plan.block_v % m.block_v or plan.d_pad % m.block_k:
        return (f"the padded shape (N {plan.n_pad}, chunks of {plan.block_v}-row tiles, D {plan.d_pad}) is not a "
                f"whole number of its tiles ({m.block_n}, {m.block_v}, {m.block_k})")
    if smem_bytes(m, dtype) > SMEM_LIMIT:
        return (f"its pipeline slots and output tiles need {smem_bytes(m, dtype)} bytes of shared memory "
                f"(> {SMEM_LIMIT}); lower BlockSizes.mosaic.max_concurrent_steps")
    return geometry.hopper_reason()


def backward_kernel_for(dtype, plan: Plan, config: BlockSizes, interpret: bool, filtered: bool = False) -> str:
    """The gradient-logits kernel that ``config.backward_kernel`` resolves to for these inputs.

    Args:
        dtype: the inputs' dtype.
        plan: the call's padded geometry (:func:`jax_heads.pallas.plan.plan_for`).
        config: the block sizes; ``config.backward_kernel`` is ``"auto"``, ``"mosaic"`` or ``"triton"``.
        interpret: Pallas interpret mode.
        filtered: gradient filtering is on (the Triton kernel only).

    Returns:
        ``"mosaic"`` or ``"triton"``. ``"auto"`` gives ``"mosaic"`` for exact gradients of 16-bit
        inputs whose padded shapes fit ``config.mosaic``'s tiles, on a host whose GPUs are all
        Hopper parts, outside interpret mode; every loss option (bias, softcap, smoothing, z-loss,
        returned lse) is supported.

    Raises:
        ValueError: ``"mosaic"`` named for inputs it cannot take, with filtering, or on a GPU that
            is not a Hopper part. Without any GPU (``jax.export``, interpret mode) a named
            ``"mosaic"`` is kept.
    """
    return geometry.resolve_kernel("backward_kernel", config.backward_kernel,
                                   lambda: _mosaic_reason(dtype, plan, config, filtered), interpret, "triton")


def _kernel_body(*, plgpu, cfg, k_iters, tiles, tiles_per_split, vocab_size, weight_t, cast, coefficients,
                 has_bias, softcap):
    """The kernel of :func:`grad_logits_call` for one static configuration."""
    from jax.experimental import pallas as pl

    rows, bv, stages, nwg = cfg.wg_rows, cfg.block_v, cfg.max_concurrent_steps, COMPUTE_WARPGROUPS
    num_vec = 4 if coefficients else 2  # lse, A (= g), then B, C

    def lce_grad_logits_mosaic(bounds_gmem, h_gmem, w_gmem, y_gmem, *refs):
        vec_gmem, refs = refs[:num_vec], refs[num_vec:]
        b_gmem, refs = (refs[0], refs[1:]) if has_bias else (None, refs)
        out_gmem, h_smem, w_smem, lab_smem, vec_smem, out_smem, loaded, consumed, row_bar, *bias_scratch = refs
        block, split = lax.axis_index("n"), lax.axis_index("split")
        wg = lax.axis_index("wg")
        n0 = block * cfg.block_n
        first = split * tiles_per_split
        count = jnp.minimum(tiles_per_split, tiles - first)

        @pl.when(wg == nwg)
        def _memory():
            load_steps(plgpu, cfg, h_gmem=h_gmem, w_gmem=w_gmem, h_smem=h_smem, w_smem=w_smem, loaded=loaded,
                       consumed=consumed, n0=n0, first=first, total=count * k_iters, k_iters=k_iters,
                       weight_t=weight_t, bias=(b_gmem, bias_scratch[0]) if has_bias else None)

        @pl.when(wg < nwg)
        def _compute():
            plgpu.set_max_registers(cfg.compute_registers, action="increase")
            lo = bounds_gmem[0]  # columns below lo were done by the previous chunk
            start = bounds_gmem[1]  # the chunk's first vocabulary row
            row0 = n0 + wg * rows
            plgpu.copy_gmem_to_smem(y_gmem.at[pl.ds(row0, rows)], lab_smem.at[wg], row_bar.at[wg])
            for i, vec in enumerate(vec_gmem):
                plgpu.copy_gmem_to_smem(vec.at[pl.ds(row0, rows)], vec_smem.at[wg, i], row_bar.at[wg])
            plgpu.barrier_wait(row_bar.at[wg])
            row_layout = plgpu.Layout.WGMMA.reduce(1)
            lab = cast(lab_smem.at[wg][...], row_layout)
            lse2, *coef = (cast(vec_smem.at[wg, i][...], row_layout) for i in range(num_vec))
            lse2 = lse2 * LOG2E

            def rowwise(x):
                return lax.broadcast_in_dim(x, (rows, bv), [0])

            @pl.loop(0, count)
            def _tile(tile):
                base = tile * k_iters
                c0 = (first + tile) * bv  # the tile's first column in the chunk
                v0 = start + c0

                def mma(acc_ref):
                    mma_steps(plgpu, cfg, acc_ref, h_smem=h_smem, w_smem=w_smem, loaded=loaded, consumed=consumed,
                              base=base, k_iters=k_iters, wg=wg, weight_t=weight_t)
                    logits = acc_ref[...]
                    last = lax.rem(base + k_iters - 1, stages)
                    if has_bias:  # the tile's bias slice, read from the last step's slot before releasing it
                        b = cast(bias_scratch[0].at[last][...], plgpu.Layout.WGMMA.reduce(0))
                        logits = logits + lax.broadcast_in_dim(b, (rows, bv), [1])
                    plgpu.barrier_arrive(consumed.at[last])
                    return logits

                logits = pl.run_scoped(mma, plgpu.ACC((rows, bv), jnp.float32))
                if softcap is not None:
                    logits, slope = softcap_and_derivative(logits, softcap)
                cols = cast(lax.broadcasted_iota(jnp.int32, (rows, bv), 1), plgpu.Layout.WGMMA)
                probs = jnp.exp2(logits * LOG2E - rowwise(lse2))
                hit = cols == rowwise(lab - v0)
                if coefficients:  # dL/dz' = p·A − B·[v == y] − C
                    a, b, c = coef
                    value = probs * rowwise(a) - jnp.where(hit, rowwise(b), 0.0) - rowwise(c)
                else:
                    value = jnp.where(hit, probs - 1.0, probs) * rowwise(coef[0])
                if softcap is not None:
                    value = value * slope
                keep = (cols >= lo - v0) & (cols < vocab_size - v0)
                store_tile(plgpu, jnp.where(keep, value, 0.0), out_smem.at[wg], out_gmem, row0=row0, c0=c0)

            plgpu.wait_smem_to_gmem(0)

    return lce_grad_logits_mosaic


def grad_logits_call(plan: Plan, config: MosaicForwardConfig, *, chunk_v: int, dtype, sm_count: int,
                     interpret: bool, coefficients: bool = False, has_bias: bool = False,
                     softcap: float | None = None):
    """The Mosaic GPU gradient-logits kernel of one chunk shape, as a function.

    Args:
        plan: the padded geometry; ``plan.n_pad``, ``chunk_v`` and ``plan.d_pad`` must be multiples
            of ``config``'s ``block_n``, ``block_v`` and ``block_k`` (:func:`backward_kernel_for`).
        config: the tiles and pipeline (the forward's :class:`MosaicForwardConfig`).
        chunk_v: vocabulary rows per chunk.
        dtype: the inputs' dtype (bfloat16 or float16), also the output's.
        sm_count: multiprocessors the grid is sized for.
        interpret: run in Mosaic GPU interpret mode (CPU tests).
        coefficients, has_bias, softcap: the static options, as for the Triton kernel.

    Returns:
        ``f(bounds, hidden, weight, labels, lse, g, *extra) -> (G,)`` with the Triton kernel's
        arguments: ``bounds`` ``(3,)`` int32 ``(lo, start, _)``; ``hidden`` ``(n_pad, d_pad)``,
        ``weight`` ``(v_pad, d_pad)`` (the kernel reads the chunk's rows
        ``start : start + chunk_v``); ``labels`` ``(n_pad,)`` int32 (-1: no target); ``lse``,
        ``g`` ``(n_pad,)`` float32; ``extra`` = ``B, C`` with ``coefficients``, then the
        ``(v_pad,)`` float32 bias with ``has_bias``. ``G`` is ``(n_pad, chunk_v)`` in ``dtype``.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    cfg = config
    rows, bv, bk, stages, nwg = cfg.wg_rows, cfg.block_v, cfg.block_k, cfg.max_concurrent_steps, COMPUTE_WARPGROUPS
    splits, tiles_per_split = mosaic_forward.choose_grid(plan.n_pad, chunk_v, cfg, sm_count)
    params = mosaic_forward.interpret_params() if interpret else None
    # jax 0.10's interpreter cannot read a transposed SMEM operand of wgmma: interpret mode feeds
    # the weight as (d_pad, v_pad) (see mosaic_pipeline).
    weight_t = interpret
    kernel = _kernel_body(plgpu=plgpu, cfg=cfg, k_iters=plan.d_pad // bk, tiles=chunk_v // bv,
                          tiles_per_split=tiles_per_split, vocab_size=plan.v, weight_t=weight_t,
                          cast=layout_cast(plgpu, params), coefficients=coefficients, has_bias=has_bias,
                          softcap=softcap)
    transforms = slot_transforms(plgpu, dtype, bk)
    num_vec = 4 if coefficients else 2
    scratch = (
        plgpu.SMEM((stages, cfg.block_n, bk), dtype, transforms=transforms),
        plgpu.SMEM((stages, bk, bv) if weight_t else (stages, bv, bk), dtype, transforms=transforms),
        plgpu.SMEM((nwg, rows), jnp.int32),
        plgpu.SMEM((nwg, num_vec, rows), jnp.float32),
        store_scratch(plgpu, dtype, rows, bv, nwg),  # the output tiles
        plgpu.Barrier(num_arrivals=2 + has_bias, num_barriers=stages),
        plgpu.Barrier(num_arrivals=nwg, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1 + num_vec, num_barriers=nwg),
        *((plgpu.SMEM((stages, bv), jnp.float32),) if has_bias else ()),
    )
    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((plan.n_pad, chunk_v), dtype),
        scratch_types=scratch,
        grid=(plan.n_pad // cfg.block_n, splits),
        grid_names=("n", "split"),
        num_threads=nwg + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            approx_math=cfg.approx_math, lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({} if params is None else {"interpret": params}),
    )

    def grad_logits(bounds, hidden, weight, labels, lse, g, *extra):
        # The kernel reads the chunk's weight rows (and bias) from a slice: a loaded scalar as a TMA
        # offset fails Mosaic GPU's layout inference (jax 0.10). The d_hidden product slices the
        # same rows, so XLA forms the slice once.
        w_chunk = lax.dynamic_slice_in_dim(weight, bounds[1], chunk_v, axis=0)
        if has_bias:
            extra = (*extra[:-1], lax.dynamic_slice_in_dim(extra[-1], bounds[1], chunk_v))
        return (call(bounds, hidden, w_chunk.T if weight_t else w_chunk, labels, lse, g, *extra),)

    return grad_logits
