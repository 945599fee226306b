"""The TMA → WGMMA mainloop shared by the Mosaic GPU kernels (the forward and the gradient logits).

One CTA holds ``COMPUTE_WARPGROUPS`` compute warpgroups and one memory warpgroup. The memory
warpgroup walks a flat sequence of (vocabulary tile, D step) pairs (:func:`load_steps`): per step
it waits for the slot's "consumed" barrier, then issues the TMA loads of the hidden tile
``(block_n, block_k)`` and the weight tile ``(block_v, block_k)`` into the slot, counted by the
slot's "loaded" barrier. Each compute warpgroup runs the ``D / block_k`` WGMMAs of one vocabulary
tile on its ``block_n / COMPUTE_WARPGROUPS`` rows (:func:`mma_steps`), keeping one WGMMA in flight
and releasing the slot of step ``k − 1`` after issuing step ``k``; the caller releases the tile's
last slot once it has read what it needs from it. Because the sequence is flat, the loads of the
next tile are in flight while the compute warpgroups finish the current one.

Interpret mode (jax 0.10's Mosaic GPU interpreter) differs in two ways, both chosen here: layout
casts are skipped (:func:`layout_cast`) and the weight is fed as a ``(d_pad, v_pad)`` matrix
(``weight_t``) instead of as a transposed SMEM operand. The Mosaic GPU import stays lazy: callers
pass the ``plgpu`` module in.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def slot_transforms(plgpu, dtype, block_k: int):
    """The SMEM transforms of a pipeline slot's operands: ``(8, swizzle)`` tiles, swizzled for WGMMA."""
    swizzle = plgpu.find_swizzle(block_k * jnp.dtype(dtype).itemsize * 8)
    swizzle_elems = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(swizzle)


def layout_cast(plgpu, interpret):
    """``plgpu.layout_cast`` on a GPU; in interpret mode a no-op (values keep their logical layout:
    jax 0.11's interpreter ignores layout casts, jax 0.10's has no rule for them)."""
    if interpret is None:
        return plgpu.layout_cast

    def cast(x, layout):
        del layout
        return x

    return cast


def load_steps(plgpu, cfg, *, h_gmem, w_gmem, h_smem, w_smem, loaded, consumed, n0, first, total, k_iters,
               weight_t, bias=None):
    """The memory warpgroup: its registers lowered to ``cfg.memory_registers``, ``total`` steps of TMA
    loads, then a drain of the last releases.

    Step ``s`` is D step ``s % k_iters`` of vocabulary tile ``first + s // k_iters``, whose weight
    rows start at ``(first + s // k_iters) * block_v``; the hidden rows are ``n0 : n0 + block_n``.
    ``bias``, if given, is ``(b_gmem, b_smem)``: every step also copies the tile's ``block_v`` bias
    values into ``b_smem[slot]`` (counted by the slot's "loaded" barrier too, which expects a fixed
    number of copies per step; 1 KiB).
    """
    from jax.experimental import pallas as pl

    bv, bk, stages = cfg.block_v, cfg.block_k, cfg.max_concurrent_steps
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

        plgpu.copy_gmem_to_smem(h_gmem.at[pl.ds(n0, cfg.block_n), pl.ds(k0, bk)], h_smem.at[slot], loaded.at[slot])
        w_src = w_gmem.at[pl.ds(k0, bk), pl.ds(v0, bv)] if weight_t else w_gmem.at[pl.ds(v0, bv), pl.ds(k0, bk)]
        plgpu.copy_gmem_to_smem(w_src, w_smem.at[slot], loaded.at[slot])
        if bias is not None:
            plgpu.copy_gmem_to_smem(bias[0].at[pl.ds(v0, bv)], bias[1].at[slot], loaded.at[slot])

    # Observe the last releases too, so that no barrier phase is left unobserved at exit.
    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _drain(step):
        plgpu.barrier_wait(consumed.at[lax.rem(step, stages)])


def mma_steps(plgpu, cfg, acc_ref, *, h_smem, w_smem, loaded, consumed, base, k_iters, wg, weight_t):
    """A compute warpgroup's ``k_iters`` WGMMAs of one tile (pipeline steps ``base : base + k_iters``).

    ``acc_ref += h[wg's rows, k-step] @ w[tile, k-step]ᵀ`` per step. Every step's slot is released
    except the last one's (``(base + k_iters − 1) % max_concurrent_steps``): the caller releases it
    after reading what else it needs from the slot.
    """
    from jax.experimental import pallas as pl

    rows, stages = cfg.wg_rows, cfg.max_concurrent_steps

    def kstep(kk, carry):
        step = base + kk
        slot = lax.rem(step, stages)
        plgpu.barrier_wait(loaded.at[slot])
        w_op = w_smem.at[slot] if weight_t else w_smem.at[slot].transpose((1, 0))
        plgpu.wgmma(acc_ref, h_smem.at[slot].at[pl.ds(wg * rows, rows)], w_op)
        plgpu.wgmma_wait(1)  # step k - 1's WGMMA is done: release its slot

        @pl.when(kk > 0)
        def _():
            plgpu.barrier_arrive(consumed.at[lax.rem(step - 1, stages)])

    lax.fori_loop(0, k_iters, kstep, None)


# Output columns per TMA store: 64 16-bit values, one 128-byte swizzle row.
STORE_COLS = 64


def store_scratch(plgpu, dtype, rows: int, block_v: int, warpgroups: int):
    """The SMEM of the tile stores: per compute warpgroup, ``block_v / STORE_COLS`` swizzled ``(rows, 64)`` pieces."""
    return plgpu.SMEM((warpgroups, block_v // STORE_COLS, rows, STORE_COLS), dtype,
                      transforms=slot_transforms(plgpu, dtype, STORE_COLS))


def store_tile(plgpu, value, out_smem, out_gmem, *, row0, c0):
    """Store a warpgroup's ``(rows, block_v)`` tile (in ``out_smem``'s dtype) at ``out_gmem[row0:, c0:]``.

    ``out_smem`` is the warpgroup's slice of :func:`store_scratch`. The previous tile's store is
    waited for only until it has read the SMEM (``wait_read_only``), so a store drains while the next
    tile's products run; the caller ends with ``plgpu.wait_smem_to_gmem(0)``.
    """
    from jax.experimental import pallas as pl

    rows, width = value.shape
    value = value.astype(out_smem.dtype)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read its SMEM
    for j in range(width // STORE_COLS):  # a TMA box row spans one swizzle width (128 bytes)
        out_smem.at[j][...] = value[:, j * STORE_COLS:(j + 1) * STORE_COLS]
    plgpu.commit_smem()
    for j in range(width // STORE_COLS):
        plgpu.copy_smem_to_gmem(out_smem.at[j], out_gmem.at[pl.ds(row0, rows), pl.ds(c0 + j * STORE_COLS, STORE_COLS)])
