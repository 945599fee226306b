"""Our Pallas kernel against the float64 ground truth: interpret mode on CPU, compiled on a GPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ground_truth import filtered_tile_maxima, lce_filtered_ground_truth, lce_ground_truth, threshold_between_tiles
from helpers import JAX_DTYPES, TINY, jax_naive, pallas_inputs

from heads_common.tolerances import assert_close
from jax_heads import pallas
from jax_heads.pallas import (
    DEFAULT_BLOCK_SIZES,
    BackwardConfig,
    BlockSizes,
    FilterConfig,
    MosaicForwardConfig,
    TritonForwardConfig,
    pallas_loss,
    unsupported_reason,
)
from jax_heads.pallas.op import forward_kernel_for
from jax_heads.pallas.plan import plan_for


def _tiny(*, backward=None, filtered=None, **changes) -> BlockSizes:
    """TINY with some fields of its backward and filter configurations changed."""
    return dataclasses.replace(
        TINY, backward=dataclasses.replace(TINY.backward, **(backward or {})),
        filtered=dataclasses.replace(TINY.filtered, **(filtered or {})), **changes,
    )
def _check(h, w, y, upstream, dtype_name, **kw):
    loss, vjp = jax.vjp(lambda a, b: pallas_loss(a, b, y, -100, **kw), h, w)
    dh, dw = vjp(jnp.asarray(upstream, jnp.float32))
    assert loss.dtype == jnp.float32 and dh.dtype == h.dtype and dw.dtype == w.dtype
    truth = lce_ground_truth(np.asarray(h, np.float64), np.asarray(w, np.float64), np.asarray(y), upstream)
    naive = jax_naive(h, w, y, upstream) if dtype_name != "float32" else (None, None, None)
    for name, value, t, nv in zip(("loss", "d_hidden", "d_weight"), (loss, dh, dw), truth, naive):
        base = None if nv is None else np.asarray(nv, np.float64)
        assert_close(name, np.asarray(value, np.float64), t, dtype_name, base)


CPU_CASES = [(37, 24, 101), (16, 16, 16), (5, 3, 7), (1, 1, 1), (50, 40, 257)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", CPU_CASES, ids=lambda s: "x".join(map(str, s)))
def test_interpret_matches_ground_truth(shape, dtype):
    h, w, y, up = pallas_inputs(*shape, JAX_DTYPES[dtype], seed=sum(shape))
    _check(h, w, y, up, dtype, interpret=True, config=TINY)


@pytest.mark.parametrize("shape", [(37, 24, 101), (50, 40, 257), (1, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_interpret_one_split_walks_every_tile(shape):
    h, w, y, up = pallas_inputs(*shape, jnp.float32, seed=sum(shape) + 3)
    # One split per token block (one slot, one program minimum): every program walks all the tiles.
    one_split = dataclasses.replace(TINY, triton=dataclasses.replace(TINY.triton, min_programs=1), sm_count=1)
    _check(h, w, y, up, "float32", interpret=True, config=one_split)


def test_interpret_all_ignored_gives_zeros():
    h, w, y, up = pallas_inputs(20, 8, 30, jnp.float32, seed=1, ignore_frac=1.0)
    loss, vjp = jax.vjp(lambda a, b: pallas_loss(a, b, y, -100, interpret=True, config=TINY), h, w)
    dh, dw = vjp(jnp.full((20,), jnp.nan, jnp.float32))  # ignored rows drop even a NaN upstream
    assert not np.any(loss) and not np.any(dh) and not np.any(dw)


def test_interpret_default_blocks_under_jit():
    h, w, y, up = pallas_inputs(130, 70, 300, jnp.float32, seed=3)
    f = jax.jit(lambda a, b: jnp.sum(pallas_loss(a, b, y, -100, interpret=True) * up.astype(np.float32)))
    value, (dh, dw) = jax.value_and_grad(f, (0, 1))(h, w)
    loss, gdh, gdw = lce_ground_truth(np.asarray(h), np.asarray(w), np.asarray(y), up)
    assert_close("loss", value, np.sum(loss * up), "float32")
    assert_close("d_hidden", dh, gdh, "float32")
    assert_close("d_weight", dw, gdw, "float32")


def test_unsupported_reason():
    x = jnp.zeros((2, 3), jnp.float32)
    if jax.default_backend() != "gpu":
        assert "GPU" in unsupported_reason(x)
    assert unsupported_reason(x, interpret=True) is None
    assert "float" in unsupported_reason(jnp.zeros((2, 3), jnp.int32), interpret=True)


GPU_CASES = [(1, 1, 1), (300, 200, 1000), (257, 3, 50_258), (1000, 256, 32_007), (8, 4096, 128_256)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", GPU_CASES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_matches_ground_truth(shape, dtype):
    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    h, w, y, up = pallas_inputs(*shape, JAX_DTYPES[dtype], seed=sum(shape))
    _check(h, w, y, up, dtype)


def _naive_filtered(h, w, y, upstream, keep, bs: BlockSizes):
    """The naive input-dtype computation with the same tiles filtered out: the half-precision baseline."""
    logits = (h @ w.T).astype(jnp.float32)
    valid = y != -100
    p = jax.nn.softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(jnp.where(valid, y, 0), w.shape[0], dtype=jnp.float32)
    tiles = bs.backward
    mask = np.repeat(np.repeat(keep, tiles.block_n, axis=0), tiles.block_v, axis=1)[: h.shape[0], : w.shape[0]]
    g = jnp.where(valid, jnp.asarray(upstream, jnp.float32), 0.0)[:, None]
    grad_logits = ((p - onehot) * g * mask).astype(h.dtype)
    loss = jax_naive(h, w, y, upstream)[0]
    return loss, grad_logits @ w, grad_logits.T @ h


def _check_filtered(h, w, y, upstream, dtype_name, bs: BlockSizes, quantile: float, separate=False, **kw):
    """Filtered gradients against the float64 model of the same tile filter (``ground_truth.py``)."""
    maxima = filtered_tile_maxima(np.asarray(h, np.float64), np.asarray(w, np.float64), np.asarray(y),
                                  upstream, bs.backward.block_n, bs.backward.block_v, separate_targets=separate)
    eps = threshold_between_tiles(maxima, quantile)
    loss, vjp = jax.vjp(
        lambda a, b: pallas_loss(a, b, y, -100, config=bs, filter_eps=eps, filter_separate_targets=separate, **kw),
        h, w,
    )
    dh, dw = vjp(jnp.asarray(upstream, jnp.float32))
    *truth, keep = lce_filtered_ground_truth(
        np.asarray(h, np.float64), np.asarray(w, np.float64), np.asarray(y), upstream, eps, bs.backward.block_n,
        bs.backward.block_v, separate_targets=separate,
    )
    assert 0 < keep.sum() < keep.size, "the threshold must filter some tiles and keep others"
    full = lce_ground_truth(np.asarray(h, np.float64), np.asarray(w, np.float64), np.asarray(y), upstream)
    # The filter changes the gradients by more than the tolerance: comparing with it can fail.
    assert not np.allclose(full[1], truth[1], rtol=1e-3, atol=0)
    naive = [None] * 3 if dtype_name == "float32" else _naive_filtered(h, w, y, upstream, keep, bs)
    for name, value, t, nv in zip(("loss", "d_hidden", "d_weight"), (loss, dh, dw), truth, naive):
        base = None if nv is None else np.asarray(nv, np.float64)
        assert_close(name, np.asarray(value, np.float64), t, dtype_name, base)


@pytest.mark.parametrize("quantile", [0.3, 0.8])
@pytest.mark.parametrize("shape", [(37, 24, 101), (50, 40, 257)], ids=lambda s: "x".join(map(str, s)))
def test_interpret_filtered_matches_filtered_truth(shape, quantile):
    h, w, y, up = pallas_inputs(*shape, jnp.float32, seed=sum(shape) + 1)
    _check_filtered(h, w, y, up, "float32", TINY, quantile, interpret=True)


@pytest.mark.parametrize("quantile", [0.3, 0.8])
@pytest.mark.parametrize("shape", [(37, 24, 101), (50, 40, 257)], ids=lambda s: "x".join(map(str, s)))
def test_interpret_filtered_separate_targets_matches_its_truth(shape, quantile):
    """Tiles judged by probabilities alone; the skipped targets' entries added exactly afterwards."""
    h, w, y, up = pallas_inputs(*shape, jnp.float32, seed=sum(shape) + 5)
    y = y.at[1].set(y[0]).at[2].set(y[0])  # tokens sharing a target (summed before the row is touched)
    if quantile > 0.5:  # this case must exercise the exact addition of skipped targets
        maxima = filtered_tile_maxima(np.asarray(h, np.float64), np.asarray(w, np.float64), np.asarray(y), up,
                                      TINY.backward.block_n, TINY.backward.block_v, separate_targets=True)
        keep = maxima >= threshold_between_tiles(maxima, quantile)
        yy = np.asarray(y)
        tiles = TINY.backward
        assert sum(1 for n, t in enumerate(yy) if t >= 0 and not keep[n // tiles.block_n, t // tiles.block_v]) > 0
    _check_filtered(h, w, y, up, "float32", TINY, quantile, separate=True, interpret=True)


def test_interpret_filtered_steps_through_tiles():
    """Backward tiles of 32 walked 16 rows/columns at a time by the two block-sparse products."""
    h, w, y, up = pallas_inputs(70, 40, 300, jnp.float32, seed=9)
    bs = _tiny(backward=dict(block_n=32, block_v=32, chunk_bytes=96 * 64 * 4), filtered=dict(block_k=16))
    _check_filtered(h, w, y, up, "float32", bs, 0.5, interpret=True)


def test_interpret_filter_below_every_value_keeps_every_tile():
    h, w, y, up = pallas_inputs(37, 24, 101, jnp.float32, seed=5)
    _check(h, w, y, up, "float32", interpret=True, config=TINY, filter_eps=1e-30)


@pytest.mark.parametrize("filter_eps", [None, 2.0**-12, "separate"])
def test_kernels_lower_to_triton_for_cuda(filter_eps):
    """The Pallas → Triton lowering of every kernel, checked on any machine (no GPU needed to lower)."""
    from jax import export

    disabled = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for dtype in (jnp.bfloat16, jnp.float32):
        h, w, y = jnp.zeros((300, 200), dtype), jnp.zeros((1000, 200), dtype), jnp.zeros((300,), jnp.int32)

        def f(h, w, y=y):
            eps, separate = (2.0**-12, True) if filter_eps == "separate" else (filter_eps, False)
            return jax.value_and_grad(
                lambda a, b: pallas_loss(a, b, y, -100, filter_eps=eps, filter_separate_targets=separate).sum(), (0, 1)
            )(h, w)

        module = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=disabled)(h, w).mlir_module()
        assert module.count("__gpu$xla.gpu.triton") == (2 if filter_eps is None else 4)


@pytest.mark.gpu
@pytest.mark.parametrize("separate", [False, True], ids=["in-tiles", "separate-targets"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(1000, 256, 32_007), (300, 200, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_filtered_matches_filtered_truth(shape, dtype, separate):
    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    if separate and dtype != "float32":
        pytest.skip("the bf16 baseline models the in-tile filter only")
    h, w, y, up = pallas_inputs(*shape, JAX_DTYPES[dtype], seed=sum(shape) + 2)
    _check_filtered(h, w, y, up, dtype, DEFAULT_BLOCK_SIZES, 0.5, separate=separate)


@pytest.mark.parametrize("separate", [False, True])
def test_interpret_filter_keeps_tiles_with_nan(separate):
    """A NaN hidden state (or upstream gradient) is never filtered away: its tiles are kept, so it
    shows in the gradients as on the exact path, and the other rows of its token block keep theirs."""
    h, w, y, up = pallas_inputs(16, 16, 64, jnp.float32, seed=12, ignore_frac=0.0)
    eps = 0.5  # far above every probability: without NaN every tile but the targets' would be skipped
    for hidden, upstream in ((h.at[3].set(jnp.nan), up), (h, np.where(np.arange(16) == 5, np.nan, up))):
        _, vjp = jax.vjp(lambda a, b: pallas_loss(a, b, y, -100, interpret=True, config=TINY, filter_eps=eps,
                                                  filter_separate_targets=separate), hidden, w)
        dh, dw = vjp(jnp.asarray(upstream, jnp.float32))
        bad = 3 if hidden is not h else 5
        assert np.isnan(np.asarray(dh[bad])).all() and np.isnan(np.asarray(dw)).any()
        _, exact_vjp = jax.vjp(lambda a, b: pallas_loss(a, b, y, -100, interpret=True, config=TINY), hidden, w)
        exact_dh = exact_vjp(jnp.asarray(upstream, jnp.float32))[0]
        # One token block holds all 16 rows: every tile of it is kept, so the other rows are exact.
        assert_close("d_hidden, other rows", np.delete(np.asarray(dh), bad, 0), np.delete(np.asarray(exact_dh), bad, 0),
                     "float32")


@pytest.mark.parametrize("separate", [False, True], ids=["in-tiles", "separate-targets"])
@pytest.mark.parametrize("dense_above", [0.0, 0.25, None])
def test_interpret_filtered_dense_chunks_with_overlapping_last_chunk(dense_above, separate):
    """Chunks of two tiles (32 rows) over a vocabulary padded to 272: the last chunk overlaps the one
    before, in dense and in block-sparse mode alike (its columns already done must add nothing)."""
    h, w, y, up = pallas_inputs(50, 40, 257, jnp.float32, seed=33)
    bs = _tiny(filtered=dict(dense_above=dense_above), backward=dict(chunk_bytes=640 * 32))
    _check_filtered(h, w, y, up, "float32", bs, 0.5, separate=separate, interpret=True)


@pytest.mark.parametrize("filtered", [False, True], ids=["exact", "filtered"])
def test_interpret_every_weight_gradient_row_is_written(monkeypatch, filtered):
    """``d_weight`` starts unfilled (garbage on the GPU, zeros on the CPU): filled with NaN here, every
    row must still come out right — the chunks that tile the vocabulary and the overlapping last one
    (chunks of 32 rows over a vocabulary padded to 272), dense and block-sparse products alike."""
    from jax_heads.pallas import backward

    monkeypatch.setattr(backward, "_unfilled", lambda shape, dtype: jnp.full(shape, jnp.nan, dtype))
    h, w, y, up = pallas_inputs(50, 40, 257, jnp.float32, seed=34)
    bs = _tiny(filtered=dict(dense_above=0.25), backward=dict(chunk_bytes=640 * 32))
    assert backward.chunk_v_for(plan_for(50, 257, 40, bs), bs.backward, 4) == 32
    if filtered:
        _check_filtered(h, w, y, up, "float32", bs, 0.5, interpret=True)
    else:
        _check(h, w, y, up, "float32", interpret=True, config=bs)


@pytest.mark.parametrize("separate", [False, True], ids=["in-tiles", "separate-targets"])
@pytest.mark.parametrize("dense_above", [0.0, 0.25])
def test_interpret_filtered_dense_chunks_match_filtered_truth(dense_above, separate):
    """Chunks whose products run dense (unflagged tiles written as zeros; interpret mode leaves an
    unwritten tile NaN, so a missing zero shows) give the filtered values. At 0.25 the first chunk is
    block-sparse and later ones switch by their predecessor's share of flagged tiles."""
    h, w, y, up = pallas_inputs(50, 40, 257, jnp.float32, seed=31)
    bs = _tiny(filtered=dict(dense_above=dense_above))
    maxima = filtered_tile_maxima(np.asarray(h, np.float64), np.asarray(w, np.float64), np.asarray(y), up,
                                  bs.backward.block_n, bs.backward.block_v, separate_targets=separate)
    share = (maxima >= threshold_between_tiles(maxima, 0.5)).mean(axis=0)  # one 16-row tile per chunk here
    assert (share[:-1] > dense_above).any() and (share <= 0.25).any(), "both kinds of chunk must occur"
    _check_filtered(h, w, y, up, "float32", bs, 0.5, separate=separate, interpret=True)


@pytest.mark.parametrize(
    "cls, field, value",
    [(TritonForwardConfig, "block_n", 48), (TritonForwardConfig, "block_v", 8), (TritonForwardConfig, "num_warps", 0),
     (TritonForwardConfig, "programs_per_sm", 1.0), (BackwardConfig, "block_d", 256 + 16),
     (BackwardConfig, "chunk_bytes", True), (FilterConfig, "block_k", 0), (FilterConfig, "dense_above", 1.5),
     (FilterConfig, "dense_above", -0.1), (FilterConfig, "dense_above", "0.5"), (BlockSizes, "sm_count", 0),
     (BlockSizes, "forward_kernel", "cuda"), (BlockSizes, "forward_kernel", "Mosaic"),
     (BlockSizes, "triton", BackwardConfig()), (BlockSizes, "mosaic", {"block_n": 128})],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_configs_are_validated(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field} must be"):
        cls(**{field: value})


# The Mosaic GPU forward (jax_heads/pallas/mosaic_forward.py) behind pallas_loss: smallest tiles it takes.
MOSAIC_TINY = dataclasses.replace(
    TINY, forward_kernel="mosaic",
    mosaic=MosaicForwardConfig(block_n=128, block_v=64, block_k=64, max_concurrent_steps=2, min_programs=4),
)


def test_interpret_mosaic_forward_matches_ground_truth():
    """Loss and gradients with the Mosaic forward (interpret mode) at a ragged shape: N, V and D are
    padded to its tiles (130 → 256 tokens, 300 → 320 rows, 70 → 128 columns), 2 token blocks, ignored
    labels; the backward is the Triton one on the Mosaic forward's log-sum-exp."""
    h, w, y, up = pallas_inputs(130, 70, 300, jnp.bfloat16, seed=35)
    _check(h, w, y, up, "bfloat16", interpret=True, config=MOSAIC_TINY)


def test_forward_kernel_resolution():
    plan = plan_for(8192, 256_000, 2304, DEFAULT_BLOCK_SIZES)
    if jax.default_backend() != "gpu":  # "auto" takes Mosaic only on a Hopper GPU
        assert forward_kernel_for(jnp.bfloat16, plan, DEFAULT_BLOCK_SIZES, False) == "triton"
    assert forward_kernel_for(jnp.bfloat16, plan, DEFAULT_BLOCK_SIZES, True) == "triton"  # interpret
    assert forward_kernel_for(jnp.float32, plan, DEFAULT_BLOCK_SIZES, False) == "triton"
    mosaic = BlockSizes(forward_kernel="mosaic")
    assert forward_kernel_for(jnp.bfloat16, plan_for(8192, 256_000, 2304, mosaic), mosaic, False) == "mosaic"
    with pytest.raises(ValueError, match="forward_kernel='mosaic' cannot run on these inputs: it takes bfloat16"):
        forward_kernel_for(jnp.float32, plan, mosaic, False)
    # Named, it pads D to its K step (200 → 256) and N, V to its tiles.
    plan = plan_for(300, 1000, 200, mosaic)
    assert (plan.n_pad, plan.v_pad, plan.d_pad) == (384, 1024, 256)
    # Tiles that are multiples of 64 but not powers of two: padded to a common multiple, so the
    # backward's grid still covers every row (a max would leave rows 256-383 unwritten here).
    odd = BlockSizes(forward_kernel="mosaic", backward=BackwardConfig(block_n=256),
                     mosaic=MosaicForwardConfig(block_n=384, block_v=64, max_concurrent_steps=2))
    plan = plan_for(300, 1000, 200, odd)
    assert plan.n_pad % 256 == 0 and plan.n_pad % 384 == 0 and plan.v_pad % 256 == 0


def test_auto_on_hopper_takes_mosaic_where_it_fits(monkeypatch):
    """The "auto" branch as on an H200 (the GPU query patched): Mosaic where it fits, Triton where
    the padding would leave it a tile of padding only or a GPU is not a Hopper part; a named
    "mosaic" on such a GPU raises. End to end: the lowered program holds the Mosaic kernel."""
    from jax import export

    monkeypatch.setattr(pallas.plan, "gpu_capabilities", lambda: ("9.0",))
    gemma = plan_for(8192, 256_000, 2304, DEFAULT_BLOCK_SIZES)
    assert forward_kernel_for(jnp.bfloat16, gemma, DEFAULT_BLOCK_SIZES, False) == "mosaic"
    assert forward_kernel_for(jnp.bfloat16, plan_for(300, 1000, 200, DEFAULT_BLOCK_SIZES), DEFAULT_BLOCK_SIZES,
                              False) == "triton"  # D = 200: no weight copy to pad it to 64
    wide = BlockSizes(backward=BackwardConfig(block_v=512))  # V 32 000 padded to 32 256: a 256-row tile of padding
    assert forward_kernel_for(jnp.bfloat16, plan_for(8192, 32_000, 2304, wide), wide, False) == "triton"
    named = BlockSizes(forward_kernel="mosaic", backward=BackwardConfig(block_v=512))
    with pytest.raises(ValueError, match="padded by 256 rows"):
        forward_kernel_for(jnp.bfloat16, plan_for(8192, 32_000, 2304, named), named, False)

    disabled = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    h, w, y = jnp.zeros((256, 128), jnp.bfloat16), jnp.zeros((1000, 128), jnp.bfloat16), jnp.zeros((256,), jnp.int32)
    module = export.export(jax.jit(lambda a, b: pallas_loss(a, b, y, -100)), platforms=["cuda"],
                           disabled_checks=disabled)(h, w).mlir_module()
    assert "mosaic_gpu" in module and "__gpu$xla.gpu.triton" not in module

    monkeypatch.setattr(pallas.plan, "gpu_capabilities", lambda: ("9.0", "8.0"))
    assert forward_kernel_for(jnp.bfloat16, gemma, DEFAULT_BLOCK_SIZES, False) == "triton"
    mosaic = BlockSizes(forward_kernel="mosaic")
    with pytest.raises(ValueError, match=r"needs a Hopper GPU \(compute capability 9.x\), found 9.0, 8.0"):
        forward_kernel_for(jnp.bfloat16, plan_for(8192, 256_000, 2304, mosaic), mosaic, False)


def test_mosaic_forward_lowers_for_cuda():
    """pallas_loss with the Mosaic forward and the Triton backward, lowered for CUDA (no GPU needed)."""
    from jax import export

    disabled = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    h, w, y = jnp.zeros((300, 200), jnp.bfloat16), jnp.zeros((1000, 200), jnp.bfloat16), jnp.zeros((300,), jnp.int32)
    bs = BlockSizes(forward_kernel="mosaic")

    def f(h, w):
        return jax.value_and_grad(lambda a, b: pallas_loss(a, b, y, -100, config=bs).sum(), (0, 1))(h, w)

    module = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=disabled)(h, w).mlir_module()
    assert "mosaic_gpu" in module and module.count("__gpu$xla.gpu.triton") == 1  # the backward's kernel


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", GPU_CASES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_triton_forward_matches_ground_truth(shape, dtype):
    """The Triton forward, which "auto" no longer picks for 16-bit inputs on a Hopper GPU."""
    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    h, w, y, up = pallas_inputs(*shape, JAX_DTYPES[dtype], seed=sum(shape) + 21)
    _check(h, w, y, up, dtype, config=BlockSizes(forward_kernel="triton"))


@pytest.mark.gpu
def test_gpu_auto_picks_mosaic_on_hopper():
    if jax.default_backend() != "gpu" or not pallas.plan.is_hopper():
        pytest.skip("needs a Hopper GPU")
    plan = plan_for(8192, 256_000, 2304, DEFAULT_BLOCK_SIZES)
    assert forward_kernel_for(jnp.bfloat16, plan, DEFAULT_BLOCK_SIZES, False) == "mosaic"


@pytest.mark.gpu
@pytest.mark.parametrize("forward_kernel", ["mosaic", "triton"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_gpu_non_finite_hidden_row(value, forward_kernel):
    """On the GPU (whose max instruction drops a NaN operand, unlike the interpreter's): one token's
    NaN/inf makes its loss and d_hidden row NaN, an ignored row holding NaN stays 0, and the other
    rows are as without them."""
    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    h, w, y, up = pallas_inputs(300, 256, 1000, jnp.bfloat16, seed=41)
    y = y.at[2].set(7).at[4].set(-100)
    bad = h.at[2, 1].set(value).at[4].set(jnp.nan)
    bs = BlockSizes(forward_kernel=forward_kernel)

    def run(hidden):
        loss, vjp = jax.vjp(lambda a, b: pallas_loss(a, b, y, -100, config=bs), hidden, w)
        return (np.asarray(x, np.float64) for x in (loss, *vjp(jnp.asarray(up, jnp.float32))))

    loss, dh, dw = run(bad)
    clean_loss, clean_dh, _ = run(h)
    assert np.isnan(loss[2]) and loss[4] == 0 and np.all(np.isnan(dh[2]))
    assert not np.all(np.isfinite(dw))
    keep = np.setdiff1d(np.arange(300), [2, 4])
    assert_close("loss", loss[keep], clean_loss[keep], "float32")
    assert_close("d_hidden", dh[keep], clean_dh[keep], "float32")
