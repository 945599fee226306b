"""Linear cross-entropy forward partials with the Pallas Mosaic GPU backend (Hopper: TMA + WGMMA).

A drop-in alternative to the Triton-backend ``_forward_kernel`` of :mod:`jax_heads.pallas_lce`:
:func:`mgpu_forward_partials` returns the same per-split partials ``(m, s, t)`` that
``lce_forward`` combines (``m_max``, log-sum-exp, sum of target logits).

Design (one CTA per (token block, vocabulary split), warp specialised)::

    CTA = 3 warpgroups: 2 compute warpgroups + 1 memory warpgroup (the last).
    token block: block_n rows (default 128); compute warpgroup w owns rows
                 [w * block_n/2, (w+1) * block_n/2) (64 rows by default).
    vocabulary tile: block_v rows of the weight (default 256), shared by both compute warpgroups.
    K pipeline over D in block_k steps (default 64), max_concurrent_steps SMEM slots (default 3):
        slot = (hidden tile (block_n, block_k), weight tile (block_v, block_k)), both bf16,
        tiled (8, 64) and 128-byte swizzled; 48 KiB per slot at the defaults (144 KiB in all).

The memory warpgroup walks the flat sequence of (vocabulary tile, D step) pairs of its split and
issues two TMA loads per step into the next slot (one "loaded" barrier per slot counts both), after
waiting on the slot's "consumed" barrier (both compute warpgroups arrive on it). Because the
sequence is flat, loads of the next vocabulary tile are already in flight while the compute
warpgroups finish the current one: the pipeline never drains at a tile boundary.

Each compute warpgroup, per vocabulary tile: a float32 WGMMA accumulator of
``(block_n/2, block_v)`` (64 x 256 = 128 registers per thread), ``D / block_k`` WGMMAs of
``h[rows, k-step] @ w[tile, k-step]ᵀ`` (the weight slot is used through ``ref.transpose((1, 0))``,
so the transposed operand is fed from SMEM without a copy), then an epilogue on the accumulator in
registers (``Layout.WGMMA``): columns at or past ``vocab_size`` are masked to ``-inf``, the row
maximum and the online sum of exponentials are updated (base 2: the running max is kept in units of
``log2(e)·logit`` so that every element costs one FMA and one ``ex2``), and the target logit is
picked by comparing a column iota with the row's label. Row statistics live in the
``Layout.WGMMA.reduce(1)`` row layout across all tiles of the split and are written once at the
end (registers → SMEM → TMA store).

Shapes and dtypes: ``hidden (n_pad, d_pad)`` and ``weight (v_pad, d_pad)`` in bfloat16 or
float16, ``labels (n_pad,)`` int32; outputs ``m, s, t`` are ``(splits, n_pad)`` float32. All
arithmetic after the products (and the products' accumulation) is float32.

The Mosaic GPU import is lazy (inside functions): importing :mod:`jax_heads` never needs it.
API points used are those common to jax 0.10.2 and 0.11.2 (barriers always created with an
explicit ``num_barriers`` and indexed; the lowering semantics passed explicitly, since its
default changed from Lane to Warpgroup; SMEM row vectors read with ``layout_cast(ref[...])``
rather than ``plgpu.load``, whose index argument changed; ``ref.transpose`` rather than the
deprecated ``plgpu.transpose_ref``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

# Operand dtypes of the WGMMA products (float32 inputs take the Triton forward).
MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
# Shared memory per block on Hopper (227 KiB usable by one CTA).
_SMEM_LIMIT = 227 * 1024


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    """Tiles and pipeline of the Mosaic GPU forward.

    Attributes:
        block_n: tokens per CTA; each of the ``num_compute_wgs`` compute warpgroups owns
            ``block_n // num_compute_wgs`` rows (a multiple of 64: that many ``m64`` WGMMA row
            blocks, within the register budget checked below).
        block_v: vocabulary rows per tile (the WGMMA ``N``; a multiple of 64, at most 256).
        block_k: hidden-dimension step of the pipeline (a multiple of 64; D must be padded to it).
        max_concurrent_steps: SMEM slots of the TMA pipeline (>= 2).
        num_compute_wgs: compute warpgroups (1 or 2); one more warpgroup issues the TMA loads.
        wgmma_in_flight: 0 waits for each WGMMA before releasing its slot; 1 keeps one WGMMA in
            flight (the slot of step ``k - 1`` is released after issuing step ``k``).
        compute_registers, memory_registers: ``setmaxnreg`` targets of the two kinds of warpgroup.
        lowering: ``"warpgroup"`` or ``"lane"`` lowering semantics of Mosaic GPU.
        approx_math: fast approximate ``ex2`` / reciprocal (``CompilerParams.approx_math``).
        min_programs: :func:`choose_grid` splits the vocabulary until the grid has at least this
            many CTAs (one CTA per multiprocessor fits in shared memory).

    Defaults from the H200 tuning of 2026-11-28 (``docs/kernel-notes.md``, version 3): few long
    splits (132 → 4 splits of 250 tiles at Gemma-2) and 3 pipeline slots.
    """

    block_n: int = 128
    block_v: int = 256
    block_k: int = 64
    max_concurrent_steps: int = 3
    num_compute_wgs: int = 2
    wgmma_in_flight: int = 1
    compute_registers: int = 232
    memory_registers: int = 40
    lowering: str = "warpgroup"
    approx_math: bool = True
    min_programs: int = 132

    def __post_init__(self):
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MgpuConfig.{name} must be a positive int, got {value!r}")
            return value

        for name in ("block_n", "block_v", "block_k", "max_concurrent_steps", "num_compute_wgs",
                     "compute_registers", "memory_registers", "min_programs"):
            positive_int(name)
        if self.num_compute_wgs not in (1, 2):
            raise ValueError(f"MgpuConfig.num_compute_wgs must be 1 or 2, got {self.num_compute_wgs}")
        if self.block_n % (64 * self.num_compute_wgs):
            raise ValueError(
                f"MgpuConfig.block_n must be a multiple of 64 * num_compute_wgs = {64 * self.num_compute_wgs}, "
                f"got {self.block_n}")
        if self.block_v % 64 or self.block_v > 256:
            raise ValueError(f"MgpuConfig.block_v must be a multiple of 64 and at most 256, got {self.block_v}")
        if self.block_k % 64:
            raise ValueError(f"MgpuConfig.block_k must be a multiple of 64, got {self.block_k}")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"MgpuConfig.max_concurrent_steps must be >= 2, got {self.max_concurrent_steps}")
        if self.wgmma_in_flight not in (0, 1):
            raise ValueError(f"MgpuConfig.wgmma_in_flight must be 0 or 1, got {self.wgmma_in_flight!r}")
        if self.lowering not in ("warpgroup", "lane"):
            raise ValueError(f"MgpuConfig.lowering must be 'warpgroup' or 'lane', got {self.lowering!r}")
        if self.wg_rows * self.block_v > 128 * 128:
            raise ValueError(
                f"MgpuConfig: the float32 accumulator of a compute warpgroup, ({self.wg_rows}, {self.block_v}), "
                "exceeds 128 registers per thread (rows * block_v must be <= 16384)")
        if self.compute_registers % 8 or self.memory_registers % 8 or not (
            24 <= self.memory_registers <= 256 and 24 <= self.compute_registers <= 256
        ):
            raise ValueError("MgpuConfig.compute_registers and memory_registers must be multiples of 8 in [24, 256]")
        total = 128 * (self.num_compute_wgs * self.compute_registers + self.memory_registers)
        if total > 65536:
            raise ValueError(
                f"MgpuConfig: {self.num_compute_wgs} x {self.compute_registers} + {self.memory_registers} registers "
                f"per thread exceed the 64K register file ({total} > 65536)")
        if self.smem_bytes(jnp.bfloat16) > _SMEM_LIMIT:
            raise ValueError(
                f"MgpuConfig: {self.max_concurrent_steps} pipeline slots of ({self.block_n} + {self.block_v}) x "
                f"{self.block_k} bf16 need {self.smem_bytes(jnp.bfloat16)} bytes of shared memory "
                f"(> {_SMEM_LIMIT}); lower max_concurrent_steps or the tiles")

    @property
    def wg_rows(self) -> int:
        """Token rows per compute warpgroup."""
        return self.block_n // self.num_compute_wgs

    def smem_bytes(self, dtype) -> int:
        """Shared memory of one CTA: pipeline slots, labels and the three output row vectors."""
        item = jnp.dtype(dtype).itemsize
        slots = self.max_concurrent_steps * (self.block_n + self.block_v) * self.block_k * item
        return slots + 4 * self.block_n * 4 + 1024


DEFAULT_MGPU_CONFIG = MgpuConfig()


def choose_grid(n_pad: int, v_pad: int, config: MgpuConfig = DEFAULT_MGPU_CONFIG,
                sm_count: int = 132) -> tuple[int, int]:
    """``(splits, tiles_per_split)`` of the Mosaic forward grid (one CTA per multiprocessor at a time).

    Same policy as the Triton forward (:func:`jax_heads.pallas_lce.choose_splits`): about
    ``config.min_programs`` CTAs, then the fewest splits whose whole waves of ``sm_count`` CTAs
    are within 2 % of the best.
    """
    from jax_heads.pallas_lce import choose_splits

    if n_pad % config.block_n or v_pad % config.block_v:
        raise ValueError(
            f"n_pad={n_pad} and v_pad={v_pad} must be multiples of block_n={config.block_n} and "
            f"block_v={config.block_v}")
    if n_pad <= 0 or v_pad <= 0:
        raise ValueError(f"n_pad and v_pad must be positive, got {n_pad}, {v_pad}")
    return choose_splits(n_pad // config.block_n, v_pad // config.block_v, config.min_programs, sm_count)


def _check_inputs(hidden, weight, labels, vocab_size, splits, tiles_per_split, config):
    if not isinstance(config, MgpuConfig):
        raise ValueError(f"config must be an MgpuConfig, got {type(config).__name__}")
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


def _lowering_semantics(plgpu, name):
    return plgpu.LoweringSemantics.Warpgroup if name == "warpgroup" else plgpu.LoweringSemantics.Lane


def mgpu_forward_partials(hidden, weight, labels, *, vocab_size: int, splits: int, tiles_per_split: int,
                          config: MgpuConfig = DEFAULT_MGPU_CONFIG, interpret=None):
    """Per-split partial max, sum of exponentials and target logit (Mosaic GPU kernel).

    Args:
        hidden: ``(n_pad, d_pad)`` bfloat16/float16; ``n_pad % block_n == 0``, ``d_pad % block_k == 0``.
        weight: ``(v_pad, d_pad)`` same dtype, ``v_pad = num_tiles * block_v``; rows at or past
            ``vocab_size`` are padding (their logits count as ``-inf``).
        labels: ``(n_pad,)`` integers; a label outside ``[0, vocab_size)`` picks no target.
        vocab_size: the real vocabulary size.
        splits, tiles_per_split: split ``j`` covers vocabulary tiles
            ``[j * tiles_per_split, min((j + 1) * tiles_per_split, num_tiles))`` (see
            :func:`choose_grid`); no split may be empty.
        config: :class:`MgpuConfig`.
        interpret: passed to ``plgpu.kernel`` (e.g. Mosaic GPU ``InterpretGPUParams`` on CPU).

    Returns:
        ``(m, s, t)``, each ``(splits, n_pad)`` float32: per split, the maximum of the float32
        logits ``h · wᵀ`` over the split's real columns, ``Σ exp(logit − m)``, and the target
        logit if the label lies in the split (else 0).
    """
    _check_inputs(hidden, weight, labels, vocab_size, splits, tiles_per_split, config)
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    cfg = config
    n_pad, d_pad = hidden.shape
    v_pad = weight.shape[0]
    num_tiles = v_pad // cfg.block_v
    k_iters = d_pad // cfg.block_k
    n_blocks = n_pad // cfg.block_n
    rows = cfg.wg_rows
    bv, bk, stages, nwg = cfg.block_v, cfg.block_k, cfg.max_concurrent_steps, cfg.num_compute_wgs
    ragged = vocab_size % bv != 0
    dtype = hidden.dtype
    # Labels outside [0, vocab_size) (ignored tokens, or ids of padded rows) become -1: no column matches.
    labels = labels.astype(jnp.int32)
    labels = jnp.where((labels >= 0) & (labels < vocab_size), labels, -1)

    swizzle = plgpu.find_swizzle(bk * jnp.dtype(dtype).itemsize * 8)
    swizzle_elems = swizzle // jnp.dtype(dtype).itemsize
    transforms = (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(swizzle))
    neg_inf = float("-inf")
    if interpret is None:
        cast = plgpu.layout_cast
    else:
        # Interpret mode keeps values in their logical layout; jax 0.11's interpreter treats
        # layout_cast as a no-op, jax 0.10's has no rule for it, so it is skipped here.
        def cast(x, layout):
            del layout
            return x

    # jax 0.10's interpreter cannot read a transposed SMEM operand of wgmma; interpret mode feeds
    # it the weight as a (d_pad, v_pad) matrix (tiles (block_k, block_v), B used as is) instead.
    weight_t = interpret is not None

    def iota(shape, dim):
        return cast(lax.broadcasted_iota(jnp.int32, shape, dim), plgpu.Layout.WGMMA)

    def kernel(h_gmem, w_gmem, y_gmem, m_gmem, s_gmem, t_gmem, h_smem, w_smem, lab_smem, out_smem,
               loaded, consumed, lab_bar):
        block, split = lax.axis_index("n"), lax.axis_index("split")
        wg = lax.axis_index("wg")
        n0 = block * cfg.block_n
        first = split * tiles_per_split
        count = jnp.minimum(tiles_per_split, num_tiles - first)
        total = count * k_iters

        @pl.when(wg == nwg)
        def _memory():
            plgpu.set_max_registers(cfg.memory_registers, action="decrease")

            @pl.loop(0, total)
            def _step(step):
                slot = lax.rem(step, stages)
                tile = lax.div(step, k_iters)
                k0 = (step - tile * k_iters) * bk
                v0 = (first + tile) * bv

                @pl.when(step >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                plgpu.copy_gmem_to_smem(h_gmem.at[pl.ds(n0, cfg.block_n), pl.ds(k0, bk)], h_smem.at[slot],
                                        loaded.at[slot])
                w_src = w_gmem.at[pl.ds(k0, bk), pl.ds(v0, bv)] if weight_t else w_gmem.at[pl.ds(v0, bv), pl.ds(k0, bk)]
                plgpu.copy_gmem_to_smem(w_src, w_smem.at[slot], loaded.at[slot])

            # Observe the last releases too, so that no barrier phase is left unobserved at exit.
            @pl.loop(jnp.maximum(total - stages, 0), total)
            def _drain(step):
                plgpu.barrier_wait(consumed.at[lax.rem(step, stages)])

        @pl.when(wg < nwg)
        def _compute():
            plgpu.set_max_registers(cfg.compute_registers, action="increase")
            row0 = n0 + wg * rows
            plgpu.copy_gmem_to_smem(y_gmem.at[pl.ds(row0, rows)], lab_smem.at[wg], lab_bar.at[wg])
            plgpu.barrier_wait(lab_bar.at[wg])
            row_layout = plgpu.Layout.WGMMA.reduce(1)
            lab = cast(lab_smem.at[wg][...], row_layout)

            def tile_body(tile, carry):
                m2, s, tgt = carry
                base = tile * k_iters

                def mma(acc_ref):
                    def kstep(kk, carry):
                        step = base + kk
                        slot = lax.rem(step, stages)
                        plgpu.barrier_wait(loaded.at[slot])
                        w_op = w_smem.at[slot] if weight_t else w_smem.at[slot].transpose((1, 0))
                        plgpu.wgmma(acc_ref, h_smem.at[slot].at[pl.ds(wg * rows, rows)], w_op)
                        plgpu.wgmma_wait(cfg.wgmma_in_flight)
                        if cfg.wgmma_in_flight:
                            @pl.when(kk > 0)
                            def _():
                                plgpu.barrier_arrive(consumed.at[lax.rem(step - 1, stages)])
                        else:
                            plgpu.barrier_arrive(consumed.at[slot])

                    lax.fori_loop(0, k_iters, kstep, None)
                    logits = acc_ref[...]
                    if cfg.wgmma_in_flight:
                        plgpu.barrier_arrive(consumed.at[lax.rem(base + k_iters - 1, stages)])
                    return logits

                logits = pl.run_scoped(mma, plgpu.ACC((rows, bv), jnp.float32))
                v0 = (first + tile) * bv
                cols = iota((rows, bv), 1)
                if ragged:
                    logits = jnp.where(cols < vocab_size - v0, logits, neg_inf)
                # Running max in units of log2(e) * logit: each element costs one FMA and one ex2.
                m_new = jnp.maximum(m2, logits.max(axis=1) * _LOG2E)
                p = jnp.exp2(logits * _LOG2E - lax.broadcast_in_dim(m_new, (rows, bv), [0]))
                s = s * jnp.exp2(m2 - m_new) + p.sum(axis=1)
                hit = cols == lax.broadcast_in_dim(lab - v0, (rows, bv), [0])
                tgt = tgt + jnp.where(hit, logits, 0.0).sum(axis=1)
                return m_new, s, tgt

            init = (
                cast(jnp.full((rows,), neg_inf, jnp.float32), row_layout),
                cast(jnp.full((rows,), 0.0, jnp.float32), row_layout),
                cast(jnp.full((rows,), 0.0, jnp.float32), row_layout),
            )
            m2, s, tgt = lax.fori_loop(0, count, tile_body, init)
            out_smem.at[0, wg][...] = m2 * _LN2
            out_smem.at[1, wg][...] = s
            out_smem.at[2, wg][...] = tgt
            plgpu.commit_smem()
            for i, out in enumerate((m_gmem, s_gmem, t_gmem)):
                plgpu.copy_smem_to_gmem(out_smem.at[i, wg], out.at[split, pl.ds(row0, rows)])
            plgpu.wait_smem_to_gmem(0)

    part = jax.ShapeDtypeStruct((splits, n_pad), jnp.float32)
    scratch = (
        plgpu.SMEM((stages, cfg.block_n, bk), dtype, transforms=transforms),
        plgpu.SMEM((stages, bk, bv) if weight_t else (stages, bv, bk), dtype, transforms=transforms),
        plgpu.SMEM((nwg, rows), jnp.int32),
        plgpu.SMEM((3, nwg, rows), jnp.float32),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=nwg, num_barriers=stages),
        plgpu.Barrier(num_arrivals=1, num_barriers=nwg),
    )
    call = plgpu.kernel(
        kernel,
        out_type=(part, part, part),
        scratch_types=scratch,
        grid=(n_blocks, splits),
        grid_names=("n", "split"),
        num_threads=nwg + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            approx_math=cfg.approx_math, lowering_semantics=_lowering_semantics(plgpu, cfg.lowering)),
        **({} if interpret is None else {"interpret": interpret}),
    )
    return call(hidden, weight.T if weight_t else weight, labels)


def flops(n: int, d: int, v: int) -> int:
    """Forward matrix-product FLOPs, ``2·N·D·V``."""
    return 2 * n * d * v


__all__ = [
    "DEFAULT_MGPU_CONFIG",
    "MgpuConfig",
    "choose_grid",
    "mgpu_forward_partials",
]
