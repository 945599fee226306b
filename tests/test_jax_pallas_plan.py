"""The kernel package's plain-Python geometry (jax_heads/pallas/plan.py and the backward's chunk size)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jax_heads.pallas import DEFAULT_BLOCK_SIZES, BackwardConfig, BlockSizes, MosaicForwardConfig, TritonForwardConfig
from jax_heads.pallas.backward import chunk_v_for
from jax_heads.pallas.plan import Plan, choose_splits, pad_inputs, pick_block_d, plan_for

SMALL = BlockSizes(
    triton=TritonForwardConfig(block_n=16, block_v=32, block_d=16), backward=BackwardConfig(block_n=32, block_v=16)
)


@pytest.mark.parametrize(
    "shape, config, expected",
    [
        # Gemma-2 head: aligned, nothing padded; D steps of 64 divide 2304.
        ((8192, 256_000, 2304), DEFAULT_BLOCK_SIZES, (8192, 256_000, 2304, 128, 256, 64, 64)),
        # Llama-3 head: V padded to the 256-row tiles.
        ((8192, 128_256, 4096), DEFAULT_BLOCK_SIZES, (8192, 128_256, 4096, 128, 256, 64, 64)),
        # Ragged everywhere: N and V to the larger tile of the two kernels, D to 16 (then D steps of 16).
        ((37, 101, 24), SMALL, (64, 128, 32, 32, 32, 16, 32)),
        ((1, 1, 1), DEFAULT_BLOCK_SIZES, (128, 256, 16, 128, 256, 16, 16)),
        ((300, 1000, 200), DEFAULT_BLOCK_SIZES, (384, 1024, 208, 128, 256, 16, 16)),
        # A named Mosaic forward pads to its tiles too: D to its K step of 64, N to a common multiple.
        ((300, 1000, 200), BlockSizes(forward_kernel="mosaic"), (384, 1024, 256, 128, 256, 64, 64)),
        ((300, 1000, 200), BlockSizes(forward_kernel="mosaic", mosaic=MosaicForwardConfig(block_n=384, block_v=64)),
         (384, 1024, 256, 384, 256, 64, 64)),
    ],
    ids=["gemma2", "llama3", "ragged-small", "1x1x1", "ragged-default", "mosaic", "mosaic-384"],
)
def test_plan_for_pads_to_every_kernels_tiles(shape, config, expected):
    n, v, d = shape
    plan = plan_for(n, v, d, config)
    assert (plan.n, plan.v, plan.d) == (n, v, d)
    got = (plan.n_pad, plan.v_pad, plan.d_pad, plan.block_n, plan.block_v, plan.block_d, plan.bwd_block_d)
    assert got == expected
    for tile in (config.triton.block_n, config.backward.block_n):
        assert plan.n_pad % tile == 0
    for tile in (config.triton.block_v, config.backward.block_v):
        assert plan.v_pad % tile == 0
    assert plan.d_pad % plan.block_d == 0 and plan.d_pad % plan.bwd_block_d == 0


def test_pick_block_d():
    assert pick_block_d(2304, 64) == 64
    assert pick_block_d(208, 64) == 16  # 208 = 13 * 16
    assert pick_block_d(96, 64) == 32
    assert pick_block_d(16, 128) == 16


def test_pad_inputs():
    plan = plan_for(5, 7, 3, SMALL)
    h = jnp.arange(15, dtype=jnp.float32).reshape(5, 3) + 1
    w = jnp.arange(21, dtype=jnp.float32).reshape(7, 3) + 1
    y = jnp.asarray([0, 6, -100, 3, 2], jnp.int32)
    hp, wp, yp = pad_inputs(h, w, y, plan)
    assert hp.shape == (plan.n_pad, plan.d_pad) and wp.shape == (plan.v_pad, plan.d_pad) and yp.shape == (plan.n_pad,)
    np.testing.assert_array_equal(np.asarray(hp[:5, :3]), np.asarray(h))
    np.testing.assert_array_equal(np.asarray(wp[:7, :3]), np.asarray(w))
    assert not np.any(hp[5:]) and not np.any(hp[:, 3:]) and not np.any(wp[7:]) and not np.any(wp[:, 3:])
    np.testing.assert_array_equal(np.asarray(yp), [0, 6, -100, 3, 2] + [-1] * (plan.n_pad - 5))
    # Aligned inputs are not copied.
    aligned = Plan(n=64, v=128, d=32, n_pad=64, v_pad=128, d_pad=32, block_n=32, block_v=32, block_d=16, bwd_block_d=32)
    h, w, y = jnp.zeros((64, 32)), jnp.zeros((128, 32)), jnp.zeros((64,), jnp.int32)
    assert all(a is b for a, b in zip(pad_inputs(h, w, y, aligned), (h, w, y), strict=True))


def test_choose_splits_by_whole_waves():
    assert choose_splits(64, 1000, 528, 132) == (33, 31)  # Gemma-2: 16 waves of 132 instead of 5 ragged ones
    assert choose_splits(64, 501, 528, 132) == (39, 13)  # Llama-3
    assert choose_splits(1, 4, 8, 132) == (4, 1)
    assert choose_splits(3, 7, 1, 1) == (1, 7)  # one slot: splitting gains nothing
    for nb, t in ((5, 17), (64, 1000), (2, 3), (1, 1)):
        splits, tiles = choose_splits(nb, t, 8, 4)
        assert (splits - 1) * tiles < t <= splits * tiles  # every split has work, all tiles covered


def test_backward_chunk_fits_its_memory_budget():
    """The default backward chunk: gradient logits plus one (chunk_v, D) buffer within chunk_bytes."""
    for (n, d, v), rows in (((8192, 2304, 256_000), 2048), ((8192, 4096, 128_256), 2048)):
        plan = plan_for(n, v, d, DEFAULT_BLOCK_SIZES)
        chunk = chunk_v_for(plan, DEFAULT_BLOCK_SIZES.backward, 2)
        assert chunk == rows
        assert chunk * (n + d) * 2 <= DEFAULT_BLOCK_SIZES.backward.chunk_bytes
    # At least one tile, at most the whole padded vocabulary.
    plan = plan_for(37, 101, 24, SMALL)
    assert chunk_v_for(plan, BackwardConfig(block_n=32, block_v=16, chunk_bytes=1), 4) == plan.block_v
    assert chunk_v_for(plan, SMALL.backward, 4) == plan.v_pad
    # A multiple of chunk_multiple where the budget holds one, else whole tiles.
    plan = plan_for(8192, 256_000, 2304, DEFAULT_BLOCK_SIZES)
    for multiple, rows in ((1024, 2048), (768, 2304), (4096, 2560), (1000, 2560)):
        assert chunk_v_for(plan, BackwardConfig(chunk_multiple=multiple), 2) == rows
