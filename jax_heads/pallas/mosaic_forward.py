"""The Mosaic GPU forward kernel (Hopper: TMA + WGMMA): the same per-split partials as the Triton one.

Design (one CTA per (token block, vocabulary split), warp specialised)::

    CTA = 3 warpgroups: 2 compute warpgroups + 1 memory warpgroup (the last).
    token block: block_n rows (default 128); compute warpgroup w owns rows
                 [w * block_n/2, (w+1) * block_n/2) (64 rows by default).
    vocabulary tile: block_v rows of the weight (default 256), shared by both compute warpgroups.
    K pipeline over D in block_k steps (default 64), max_concurrent_steps SMEM slots (default 3):
        slot = (hidden tile (block_n, block_k), weight tile (block_v, block_k)), both 16-bit,
        tiled (8, 64) and 128-byte swizzled; 48 KiB per slot at the defaults (144 KiB in all).

The memory warpgroup walks the flat sequence of (vocabulary tile, D step) pairs of its split and
issues two TMA loads per step into the next slot (one "loaded" barrier per slot counts both), after
waiting on the slot's "consumed" barrier (both compute warpgroups arrive on it). Because the
sequence is flat, loads of the next vocabulary tile are already in flight while the compute
warpgroups finish the current one: the pipeline never drains at a tile boundary.

Each compute warpgroup, per vocabulary tile: a float32 WGMMA accumulator of
``(block_n/2, block_v)`` (64 x 256 = 128 registers per thread), ``D / block_k`` WGMMAs of
``h[rows, k-step] @ w[tile, k-step]ᵀ`` (the weight slot is used through ``ref.transpose((1, 0))``,
so the transposed operand is fed from SMEM without a copy), one WGMMA kept in flight (the slot of
step ``k - 1`` is released after issuing step ``k``), then an epilogue on the accumulator in
registers (``Layout.WGMMA``): columns at or past ``vocab_size`` are masked to ``-inf``, the row
maximum and the online sum of exponentials are updated (base 2: the running max is kept in units of
``log2(e)·logit`` so that every element costs one FMA and one ``ex2``), and the target logit is
picked by comparing a column iota with the row's label. Row statistics live in the
``Layout.WGMMA.reduce(1)`` row layout across all tiles of the split and are written once at the
end (registers → SMEM → TMA store). All arithmetic after the products (and the products'
accumulation) is float32.

The Mosaic GPU import is lazy (inside functions): importing :mod:`jax_heads` never needs it.
API points used are those common to jax 0.10 and 0.11 (barriers always created with an explicit
``num_barriers`` and indexed; the Warpgroup lowering semantics passed explicitly, since the default
changed from Lane to Warpgroup; SMEM row vectors read with ``layout_cast(ref[...])`` rather than
``plgpu.load``, whose index argument changed; ``ref.transpose`` rather than the deprecated
``plgpu.transpose_ref``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jax_heads.pallas.config import COMPUTE_WARPGROUPS, PLAIN_LOGITS, LogitOptions, MosaicForwardConfig
from jax_heads.pallas.epilogue import LN2, LOG2E, softcapped
from jax_heads.pallas.mosaic_pipeline import (
    layout_cast,
    load_steps,
    mma_steps,
    slot_transforms,
    store_scratch,
    store_tile,
)
from jax_heads.pallas.plan import choose_splits

# Operand dtypes of the WGMMA products (float32 inputs take the Triton forward).
MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def dtype_reason(dtype) -> str | None:
    """Why the Mosaic GPU kernels cannot take inputs of ``dtype`` (WGMMA takes 16-bit floats), or None."""
    if jnp.dtype(dtype) not in MOSAIC_DTYPES:
        return f"it takes bfloat16 or float16 (WGMMA), got {jnp.dtype(dtype).name}"
    return None
_DEFAULT_CONFIG = MosaicForwardConfig()


def _kernel_body(*, plgpu, cfg, k_iters, num_tiles, tiles_per_split, vocab_size, weight_t, cast, has_bias=False,
                 softcap=None, row_sum=False, store=False):
    """The kernel of :func:`forward_partials` for one static configuration (options as there)."""
    from jax.experimental import pallas as pl

    rows, bv, stages, nwg = cfg.wg_rows, cfg.block_v, cfg.max_concurrent_steps, COMPUTE_WARPGROUPS
    ragged = vocab_size % bv != 0
    neg_inf = float("-inf")

    def iota(shape, dim):
        return cast(lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA)

    def lce_forward_mosaic(*refs):
        b_gmem = refs[3] if has_bias else None
        h_gmem, w_gmem, y_gmem, *refs = refs[:3] + refs[3 + has_bias:]
        outs, refs = refs[:3 + row_sum], refs[3 + row_sum:]
        z_gmem, refs = (refs[0], refs[1:]) if store else (None, refs)
        h_smem, w_smem, lab_smem, out_smem, loaded, consumed, lab_bar, *extra = refs
        bias_scratch, z_smem = extra[:has_bias], (extra[has_bias] if store else None)
        block, split = lax.axis_index("n"), lax.axis_index("split")
        wg = lax.axis_index("wg")
        n0 = block * cfg.block_n
        first = split * tiles_per_split
        count = jnp.minimum(tiles_per_split, num_tiles - first)
        total = count * k_iters

        @pl.when(wg == nwg)
        def _memory():
            load_steps(plgpu, cfg, h_gmem=h_gmem, w_gmem=w_gmem, h_smem=h_smem, w_smem=w_smem, loaded=loaded,
                       consumed=consumed, n0=n0, first=first, total=total, k_iters=k_iters, weight_t=weight_t,
                       bias=(b_gmem, bias_scratch[0]) if has_bias else None)

        @pl.when(wg < nwg)
        def _compute():
            plgpu.set_max_registers(cfg.compute_registers, action="increase")
            row0 = n0 + wg * rows
            plgpu.copy_gmem_to_smem(y_gmem.at[pl.ds(row0, rows)], lab_smem.at[wg], lab_bar.at[wg])
            plgpu.barrier_wait(lab_bar.at[wg])
            row_layout = plgpu.Layout.WGMMA.reduce(1)
            lab = cast(lab_smem.at[wg][...], row_layout)

            def tile_body(tile, carry):
                m2, s, tgt, *rsum = carry
                base = tile * k_iters
                v0 = (first + tile) * bv

                def mma(acc_ref):
                    mma_steps(plgpu, cfg, acc_ref, h_smem=h_smem, w_smem=w_smem, loaded=loaded, consumed=consumed,
                              base=base, k_iters=k_iters, wg=wg, weight_t=weight_t)
                    logits = acc_ref[...]
                    last = lax.rem(base + k_iters - 1, stages)
                    b = None
                    if has_bias:  # the tile's bias slice, read from the last step's slot before releasing it
                        b = cast(bias_scratch[0].at[last][...], plgpu.Layout.WGMMA.reduce(0))
                        if not store:
                            logits = logits + lax.broadcast_in_dim(b, (rows, bv), [1])
                    plgpu.barrier_arrive(consumed.at[last])
                    return (logits, b) if store else logits

                logits = pl.run_scoped(mma, plgpu.ACC((rows, bv), jnp.float32))
                if store:  # the raw products z (before bias and softcap) in the input dtype, then the bias
                    logits, b = logits  # (the bias is added after the store: one (rows, block_v) array live)
                    rounded = logits.astype(z_smem.dtype)
                    store_tile(plgpu, rounded, z_smem.at[wg], z_gmem, row0=row0, c0=v0)
                    # The statistics of the stored (rounded) values: consistent with what is read back.
                    logits = rounded.astype(jnp.float32)
                    if b is not None:
                        logits = logits + lax.broadcast_in_dim(b, (rows, bv), [1])
                cols = iota((rows, bv), 1)
                if softcap is not None:
                    logits = softcapped(logits, softcap)  # one ex2 (epilogue.py)
                if row_sum:  # over the real columns (the padded ones hold the transformed bias padding)
                    real = jnp.where(cols < vocab_size - v0, logits, 0.0) if ragged else logits
                    rsum = (rsum[0] + real.sum(axis=1),)
                if ragged:
                    logits = jnp.where(cols < vocab_size - v0, logits, neg_inf)
                # Running max in units of log2(e) * logit: each element costs one FMA and one ex2.
                m_new = jnp.maximum(m2, logits.max(axis=1) * LOG2E)
                p = jnp.exp2(logits * LOG2E - lax.broadcast_in_dim(m_new, (rows, bv), [0]))
                s = s * jnp.exp2(m2 - m_new) + p.sum(axis=1)
                hit = cols == lax.broadcast_in_dim(lab - v0, (rows, bv), [0])
                tgt = tgt + jnp.where(hit, logits, 0.0).sum(axis=1)
                return m_new, s, tgt, *rsum

            init = (
                cast(jnp.full((rows,), neg_inf, jnp.float32), row_layout),
                *(cast(jnp.full((rows,), 0.0, jnp.float32), row_layout) for _ in range(2 + row_sum)),
            )
            m2, *stats = lax.fori_loop(0, count, tile_body, init)
            for i, value in enumerate((m2 * LN2, *stats)):
                out_smem.at[i, wg][...] = value
            plgpu.commit_smem()
            for i, out in enumerate(outs):
                plgpu.copy_smem_to_gmem(out_smem.at[i, wg], out.at[split, pl.ds(row0, rows)])
            plgpu.wait_smem_to_gmem(0)

    return lce_forward_mosaic


def choose_grid(n_pad: int, v_pad: int, config: MosaicForwardConfig = _DEFAULT_CONFIG,
                sm_count: int = 132) -> tuple[int, int]:
    """``(splits, tiles_per_split)`` of the Mosaic forward grid (one CTA per multiprocessor at a time).

    Same policy as the Triton forward (:func:`jax_heads.pallas.plan.choose_splits`): about
    ``config.min_programs`` CTAs, then the fewest splits whose whole waves of ``sm_count`` CTAs
    are within 2 % of the best.
    """
    if n_pad % config.block_n or v_pad % config.block_v:
        raise ValueError(
            f"n_pad={n_pad} and v_pad={v_pad} must be multiples of block_n={config.block_n} and "
            f"block_v={config.block_v}")
    if n_pad <= 0 or v_pad <= 0:
        raise ValueError(f"n_pad and v_pad must be positive, got {n_pad}, {v_pad}")
    return choose_splits(n_pad // config.block_n, v_pad // config.block_v, config.min_programs, sm_count)


def interpret_params():
    """Mosaic GPU's interpret-mode parameters (public in jax 0.11, private in 0.10)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def _check_inputs(hidden, weight, labels, vocab_size, splits, tiles_per_split, config):
    if not isinstance(config, MosaicForwardConfig):
        raise ValueError(f"config must be a MosaicForwardConfig, got {type(config).__name__}")
    if hidden.ndim != 2 or weight.ndim != 2 or labels.ndim != 1:
        raise ValueError(
            f"expected hidden (n, d), weight (v, d), labels (n,); got {hidden.shape}, {weight.shape}, {labels.shape}")
    n_pad, d_pad = hidden.shape
    v_pad = weight.shape[0]
    if weight.shape[1] != d_pad:
        raise ValueError(f"hidden and weight disagree on D: {hidden.shape} vs {weight.shape}")
    if labels.shape[0] != n_pad:
        raise ValueError(f"labels has {labels.shape[0]} entries for {n_pad} hidden rows")
    if jnp.dtype(hidden.dtype) not in MOSAIC_DTYPES:
        raise ValueError(f"hidden must be bfloat16 or float16 for WGMMA, got {hidden.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if n_pad % config.block_n:
        raise ValueError(f"n_pad={n_pad} must be a multiple of block_n={config.block_n}")
    if d_pad % config.block_k or d_pad == 0:
        raise ValueError(f"d_pad={d_pad} must be a positive multiple of block_k={config.block_k}")
    if v_pad % config.block_v or v_pad == 0:
        raise ValueError(f"v_pad={v_pad} must be a positive multiple of block_v={config.block_v}")
    num_tiles = v_pad // config.block_v
    if not isinstance(vocab_size, int) or not (v_pad - config.block_v < vocab_size <= v_pad):
        raise ValueError(
            f"vocab_size={vocab_size!r} must be an int in ({v_pad - config.block_v}, {v_pad}] "
            "(the weight is padded by less than one tile)")
    for name, value in (("splits", splits), ("tiles_per_split", tiles_per_split)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if (splits - 1) * tiles_per_split >= num_tiles or splits * tiles_per_split < num_tiles:
        raise ValueError(
            f"splits={splits} x tiles_per_split={tiles_per_split} must cover the {num_tiles} vocabulary "
            "tiles with no empty split")


def forward_partials(hidden: jax.Array, weight: jax.Array, labels: jax.Array, *, vocab_size: int, splits: int,
                     tiles_per_split: int, config: MosaicForwardConfig = _DEFAULT_CONFIG, interpret=None,
                     bias: jax.Array | None = None, options: LogitOptions = PLAIN_LOGITS, store_logits: bool = False):
    """Per-split partial max, sum of exponentials and target logit (Mosaic GPU kernel).

    Args:
        hidden: ``(n_pad, d_pad)`` bfloat16/float16; ``n_pad % block_n == 0``, ``d_pad % block_k == 0``.
        weight: ``(v_pad, d_pad)`` same dtype, ``v_pad = num_tiles * block_v``; rows at or past
            ``vocab_size`` are padding (their logits count as ``-inf``).
        labels: ``(n_pad,)`` integers; a label outside ``[0, vocab_size)`` picks no target.
        vocab_size: the real vocabulary size (the weight is padded by less than one tile).
        splits, tiles_per_split: split ``j`` covers vocabulary tiles
            ``[j * tiles_per_split, min((j + 1) * tiles_per_split, num_tiles))`` (see
            :func:`choose_grid`); no split may be empty.
        config: :class:`MosaicForwardConfig`.
        interpret: None on a GPU; Mosaic GPU interpret parameters (:func:`interpret_params`) to run
            on the CPU.
        bias: None or ``(v_pad,)`` float32, added to the float32 logits (each tile's slice is
            loaded with the pipeline slots and read in the accumulator's column layout). jax 0.10's
            interpreter can deadlock on this path for grids of several tiles per split, so
            :mod:`jax_heads.pallas.op` routes a bias here on the GPU only.
        options: static softcap and row sum (:class:`~jax_heads.pallas.config.LogitOptions`); the
            softcap ``c·tanh(z / c)`` is computed as ``c − 2c/(1 + exp(2z/c))``
            (:func:`jax_heads.pallas.epilogue.softcapped`).
            With neither a bias nor an option the kernel is the plain one.
        store_logits: also store every tile's raw products ``z = hidden · weightᵀ`` (before the
            bias and the softcap), rounded to the input dtype, with TMA stores that drain while the
            next tile's products run (:func:`jax_heads.pallas.mosaic_pipeline.store_tile`); the
            partials are then those of the rounded ``z`` (as an XLA product in the input dtype gives:
            consistent with the stored values that a gradient kernel reads back); needs
            :func:`jax_heads.pallas.mosaic_backward.smem_bytes` of shared memory. False leaves the
            kernel as it is without the option.

    Returns:
        ``(m, s, t)``, each ``(splits, n_pad)`` float32: per split, the maximum of the float32
        (transformed) logits over the split's real columns, ``Σ exp(logit − m)``, and the target
        logit if the label lies in the split (else 0); with ``options.row_sum`` a 4th, the sum of
        the transformed logits over the split's real columns. With ``store_logits``, the pair
        ``(partials, z)``: those partials and ``z`` ``(n_pad, v_pad)`` in the input dtype (padded
        weight rows give the products with zero rows: zeros).

    Raises:
        ValueError: shapes, dtypes or the grid do not fit ``config``, or a bad ``bias``/``options``
            (the message says which).
    """
    _check_inputs(hidden, weight, labels, vocab_size, splits, tiles_per_split, config)
    if not isinstance(options, LogitOptions):
        raise ValueError(f"options must be a LogitOptions, got {type(options).__name__}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != jnp.float32):
        raise ValueError(f"bias must be ({weight.shape[0]},) float32, got {bias.shape} {bias.dtype}")
    from jax.experimental.pallas import mosaic_gpu as plgpu

    cfg = config
    n_pad, d_pad = hidden.shape
    v_pad = weight.shape[0]
    rows, bv, bk, stages, nwg = cfg.wg_rows, cfg.block_v, cfg.block_k, cfg.max_concurrent_steps, COMPUTE_WARPGROUPS
    dtype = hidden.dtype
    # Labels outside [0, vocab_size) (ignored tokens, or ids of padded rows) become -1: no column matches.
    labels = labels.astype(jnp.int32)
    labels = jnp.where((labels >= 0) & (labels < vocab_size), labels, -1)

    transforms = slot_transforms(plgpu, dtype, bk)
    cast = layout_cast(plgpu, interpret)

    # jax 0.10's interpreter cannot read a transposed SMEM operand of wgmma; interpret mode feeds
    # it the weight as a (d_pad, v_pad) matrix (tiles (block_k, block_v), B used as is) instead.
    weight_t = interpret is not None
    kernel = _kernel_body(plgpu=plgpu, cfg=cfg, k_iters=d_pad // bk, num_tiles=v_pad // bv,
                          tiles_per_split=tiles_per_split, vocab_size=vocab_size, weight_t=weight_t, cast=cast,
                          has_bias=bias is not None, softcap=options.softcap, row_sum=options.row_sum,
                          store=store_logits)
    part = jax.ShapeDtypeStruct((splits, n_pad), jnp.float32)
    num_out = 4 if options.row_sum else 3
    scratch = (
        plgpu.SMEM((stages, cfg.block_n, bk), dtype, transforms=transforms),
        plgpu.SMEM((stages, bk, bv) if weight_t else (stages, bv, bk), dtype, transforms=transforms),
        plgpu.SMEM((nwg, rows), jnp.int32),
        plgpu.SMEM((num_out, nwg, rows), jnp.float32),
        plgpu.Barrier(num_arrivals=2 + (bias is not None), num_barriers=stages),
        plgpu.Barrier(num_arrivals=nwg, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=nwg),
        # The bias: a (block_v,) slice per pipeline slot, loaded with the slot's operands.
        *(() if bias is None else (plgpu.SMEM((stages, bv), jnp.float32),)),
        *((store_scratch(plgpu, dtype, rows, bv, nwg),) if store_logits else ()),  # the logits tiles
    )
    call = plgpu.kernel(
        kernel,
        out_type=(part,) * num_out + ((jax.ShapeDtypeStruct((n_pad, v_pad), dtype),) if store_logits else ()),
        scratch_types=scratch,
        grid=(n_pad // cfg.block_n, splits),
        grid_names=("n", "split"),
        num_threads=nwg + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            approx_math=cfg.approx_math, lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({} if interpret is None else {"interpret": interpret}),
    )
    outs = call(hidden, weight.T if weight_t else weight, labels, *(() if bias is None else (bias,)))
    return (outs[:num_out], outs[num_out]) if store_logits else outs
