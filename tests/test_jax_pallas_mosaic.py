"""The Mosaic GPU forward partials (jax_heads/pallas/mosaic_forward.py).

On any machine: the kernel runs in Mosaic GPU interpret mode at a tiny shape (TMA pipeline, barriers,
WGMMA accumulation and the online log-sum-exp epilogue simulated on the CPU) and lowers for CUDA
through ``jax.export`` (Pallas → Mosaic GPU dialect, plus layout inference and dialect lowering for
Warpgroup semantics) at the Gemma-2 shape and a ragged one. Two differences from the GPU path in
interpret mode (jax 0.10's interpreter lacks them): layout casts are skipped (jax 0.11's interpreter
treats them as no-ops) and the weight is fed pre-transposed instead of as a transposed SMEM operand.
On a GPU: comparison with the Triton forward and the float64 truth (with bias, softcap and row sum).
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp

plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")

from ground_truth import lce_options_ground_truth

from heads_common.tolerances import assert_close
from jax_heads.pallas import BlockSizes, MosaicForwardConfig
from jax_heads.pallas.config import LogitOptions
from jax_heads.pallas.mosaic_forward import choose_grid, forward_partials, interpret_params
from jax_heads.pallas.op import combine_partials


def _inputs(n, d, v, v_pad, seed):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((n, d), np.float32)).astype(jnp.bfloat16)
    w = jnp.asarray(0.3 * rng.standard_normal((v, d), np.float32)).astype(jnp.bfloat16)
    w = jnp.pad(w, ((0, v_pad - v), (0, 0)))
    y = rng.integers(0, v, n).astype(np.int32)
    y[::7] = -1  # ignored
    y[3::11] = v + 1  # out of range: a padding row's id, picks no target
    y[5] = v - 1  # the last real column (in the ragged tile)
    return h, w, jnp.asarray(y)


def _reference(h, w, y, v):
    logits = np.asarray(h, np.float32) @ np.asarray(w[:v], np.float32).T
    mx = logits.max(1)
    lse = mx + np.log(np.exp(logits - mx[:, None]).sum(1))
    y = np.asarray(y)
    ok = (y >= 0) & (y < v)
    tgt = np.where(ok, logits[np.arange(len(y)), np.clip(y, 0, v - 1)], 0.0)
    return lse, tgt, logits


def test_interpret_matches_reference():
    """2 token blocks × 2 splits (the last split shorter), 3 D steps through 2 slots, ragged vocabulary."""
    n, d, v = 256, 192, 600
    cfg = MosaicForwardConfig(max_concurrent_steps=2)
    v_pad = 768
    h, w, y = _inputs(n, d, v, v_pad, seed=17)
    m, s, t = forward_partials(h, w, y, vocab_size=v, splits=2, tiles_per_split=2, config=cfg,
                               interpret=interpret_params())
    assert m.shape == s.shape == t.shape == (2, n)
    lse, tgt = combine_partials(m, s, t)
    ref_lse, ref_tgt, logits = _reference(h, w, y, v)
    assert_close("lse", np.asarray(lse), ref_lse, "float32")
    assert_close("target logit", np.asarray(tgt), ref_tgt, "float32")
    # The split partials themselves: split 0 covers columns [0, 512), split 1 [512, 600).
    assert_close("split 0 max", np.asarray(m[0]), logits[:, :512].max(1), "float32")
    assert_close("split 1 max", np.asarray(m[1]), logits[:, 512:].max(1), "float32")


@pytest.mark.parametrize("d, splits, tiles_per_split, softcap, row_sum", [
    (64, 1, 3, None, False), (192, 3, 1, 2.5, True),
], ids=["3_tiles_per_split", "3_k_steps-softcap-row_sum"])
def test_interpret_store_logits(d, splits, tiles_per_split, softcap, row_sum):
    """``store_logits``: the raw products z (before the softcap) in the input dtype, and the partials of them.

    2 token blocks, 64-column tiles, ragged vocabulary (150 of 192): the padded weight rows give zero
    columns. jax 0.10's interpreter deadlocks on the store for grids of several tiles per split with
    several D steps (as on the bias path, above), so one case has several tiles per split (a store
    drains while the next tile's products run) and the other several D steps; the GPU test of the
    gradient-in-forward path (tests/test_gradient_in_forward.py) covers both at once.
    """
    n, v, v_pad = 256, 150, 192
    h, w, y = _inputs(n, d, v, v_pad, seed=41)
    cfg = MosaicForwardConfig(block_n=128, block_v=64, block_k=64, max_concurrent_steps=2, min_programs=1)
    kwargs = dict(vocab_size=v, splits=splits, tiles_per_split=tiles_per_split, config=cfg,
                  interpret=interpret_params(), options=LogitOptions(softcap, row_sum))
    parts, z = forward_partials(h, w, y, store_logits=True, **kwargs)
    assert z.shape == (n, v_pad) and z.dtype == h.dtype
    xla = jnp.dot(h, w.T, preferred_element_type=jnp.float32).astype(h.dtype)
    exact = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T
    # Both round the float32 products once: equal, or one bfloat16 step apart where the sums' orders differ.
    np.testing.assert_allclose(np.asarray(z, np.float64), np.asarray(xla, np.float64), rtol=2**-7, atol=0)
    np.testing.assert_allclose(np.asarray(z, np.float64), exact, rtol=2**-8, atol=1e-6)
    assert not np.asarray(z[:, v:]).any()
    # The partials are those of the stored (rounded) products, as an XLA product in the input dtype gives.
    zs = np.asarray(z, np.float64)[:, :v]
    zc = zs if softcap is None else softcap * np.tanh(zs / softcap)
    lse, tgt, *rsum = combine_partials(*parts)
    yy = np.asarray(y)
    ok = (yy >= 0) & (yy < v)
    mx = zc.max(1)
    assert_close("lse", np.asarray(lse), mx + np.log(np.exp(zc - mx[:, None]).sum(1)), "float32")
    assert_close("target logit", np.asarray(tgt), np.where(ok, zc[np.arange(n), np.where(ok, yy, 0)], 0.0), "float32")
    if row_sum:
        assert_close("row sum", np.asarray(rsum[0]), zc.sum(1), "float32")


@pytest.mark.parametrize("bias, softcap, row_sum", [
    (False, 3.0, False), (False, None, True), (False, 2.5, True), (True, None, False), (True, 2.5, True),
], ids=["softcap", "row_sum", "softcap_row_sum", "bias", "bias_softcap_row_sum"])
def test_interpret_options_match_float64(bias, softcap, row_sum):
    """The logit options in the epilogue against the float64 truth (ragged vocabulary, 2 splits).

    With a bias the grid is 2 splits of one tile each, 3 D steps through 2 slots (the bias slice
    reloaded with a reused slot): on a grid of 2 tiles per split jax 0.10's interpreter deadlocks on
    the bias path (one simulated compute warpgroup never starts), so the op never routes a bias to
    this kernel in interpret mode; on the GPU it is compared with the Triton forward below.
    """
    n, d, v, v_pad, tiles_per_split = (256, 192, 300, 512, 1) if bias else (256, 192, 600, 768, 2)
    h, w, y = _inputs(n, d, v, v_pad, seed=29)
    b = jnp.asarray(np.random.default_rng(3).standard_normal(v, np.float32)) if bias else None
    b_pad = None if b is None else jnp.pad(b, (0, v_pad - v), constant_values=5.0)  # padding must not count
    parts = forward_partials(h, w, y, vocab_size=v, splits=2, tiles_per_split=tiles_per_split,
                             config=MosaicForwardConfig(max_concurrent_steps=2), interpret=interpret_params(),
                             bias=b_pad, options=LogitOptions(softcap, row_sum))
    assert len(parts) == 3 + row_sum
    lse, tgt, *rsum = combine_partials(*parts)
    yy = np.asarray(y)
    labels = np.where((yy >= 0) & (yy < v), yy, -100)
    _, ref_lse, *_ = lce_options_ground_truth(h, w[:v], labels, np.ones(n), bias=b, softcap=softcap)
    z = np.asarray(h, np.float64) @ np.asarray(w[:v], np.float64).T + (0.0 if b is None else np.asarray(b, np.float64))
    zc = z if softcap is None else softcap * np.tanh(z / softcap)
    ok = labels >= 0
    ref_tgt = np.where(ok, zc[np.arange(n), np.where(ok, labels, 0)], 0.0)
    assert_close("lse", np.asarray(lse), np.where(ok, ref_lse, np.log(np.exp(zc).sum(1))), "float32")
    assert_close("target logit", np.asarray(tgt), ref_tgt, "float32")
    if row_sum:
        assert_close("row sum", np.asarray(rsum[0]), zc.sum(1), "float32")


def _export(n, d, v, cfg, bias=False, options=None, store=False):
    from jax import export

    n_pad = -(-n // cfg.block_n) * cfg.block_n
    v_pad = -(-v // cfg.block_v) * cfg.block_v
    d_pad = -(-d // cfg.block_k) * cfg.block_k
    splits, tps = choose_grid(n_pad, v_pad, cfg)
    bias_arg = (jax.ShapeDtypeStruct((v_pad,), jnp.float32),) if bias else ()
    args = (jax.ShapeDtypeStruct((n_pad, d_pad), jnp.bfloat16), jax.ShapeDtypeStruct((v_pad, d_pad), jnp.bfloat16),
            jax.ShapeDtypeStruct((n_pad,), jnp.int32), *bias_arg)
    extra = ({} if options is None else {"options": options}) | ({"store_logits": True} if store else {})

    def f(h, w, y, *b):
        out = forward_partials(h, w, y, vocab_size=v, splits=splits, tiles_per_split=tps, config=cfg,
                               bias=b[0] if b else None, **extra)
        return (combine_partials(*out[0]), out[1]) if store else combine_partials(*out)

    return export.export(jax.jit(f), platforms=["cuda"])(*args).mlir_module()


@pytest.mark.parametrize("shape", [(8192, 2304, 256_000), (1000, 200, 5003)], ids=["gemma2", "ragged"])
def test_lowers_for_cuda(shape):
    """The Mosaic GPU lowering on any machine (no GPU needed); PTX/ptxas run only on the GPU."""
    module = _export(*shape, MosaicForwardConfig())
    assert "mosaic_gpu" in module


@pytest.mark.parametrize("shape, bias, options", [
    ((8192, 2304, 256_000), False, None), ((1000, 200, 5003), True, LogitOptions(softcap=30.0, row_sum=True)),
], ids=["gemma2", "ragged-all"])
def test_store_logits_lowers_for_cuda(shape, bias, options):
    """The logits store (TMA store epilogue) lowers; the plain kernel's lowering is what it was without it."""
    module = _export(*shape, MosaicForwardConfig(), bias=bias, options=options, store=True)
    assert "mosaic_gpu" in module and module != _export(*shape, MosaicForwardConfig(), bias=bias, options=options)


@pytest.mark.parametrize("bias, options", [
    (True, None), (False, LogitOptions(softcap=30.0)), (False, LogitOptions(row_sum=True)),
    (True, LogitOptions(softcap=30.0, row_sum=True)),
], ids=["bias", "softcap", "row_sum", "all"])
def test_options_lower_for_cuda(bias, options):
    module = _export(1000, 200, 5003, MosaicForwardConfig(), bias=bias, options=options)
    assert "mosaic_gpu" in module


@pytest.mark.parametrize("cfg", [
    dict(block_n=256, block_v=128),
    dict(block_k=128, max_concurrent_steps=2),
], ids=["256x128", "k128"])
def test_variants_lower_for_cuda(cfg):
    assert "mosaic_gpu" in _export(1000, 200, 5003, MosaicForwardConfig(**cfg))


@pytest.mark.parametrize("bad, field", [
    (dict(block_n=96), "block_n"), (dict(block_n=64), "block_n"), (dict(block_v=512), "block_v"),
    (dict(block_v=100), "block_v"), (dict(block_k=32), "block_k"),
    (dict(max_concurrent_steps=1), "max_concurrent_steps"), (dict(max_concurrent_steps=8), "max_concurrent_steps"),
    (dict(block_n=256, block_v=256), "block_n, block_v"), (dict(block_n=True), "block_n"),
    (dict(compute_registers=240), "compute_registers"), (dict(memory_registers=20), "memory_registers"),
    (dict(compute_registers=256, memory_registers=256), "compute_registers, memory_registers"),
])
def test_config_validation(bad, field):
    with pytest.raises(ValueError, match=rf"^MosaicForwardConfig\.{field}"):
        MosaicForwardConfig(**bad)


def test_input_validation():
    cfg = MosaicForwardConfig()
    h, w, y = jnp.zeros((128, 64), jnp.bfloat16), jnp.zeros((512, 64), jnp.bfloat16), jnp.zeros((128,), jnp.int32)
    ok = dict(vocab_size=500, splits=2, tiles_per_split=1, config=cfg)
    for kwargs in (dict(vocab_size=100), dict(splits=3), dict(splits=1), dict(tiles_per_split=0)):
        with pytest.raises(ValueError):
            forward_partials(h, w, y, **{**ok, **kwargs})
    with pytest.raises(ValueError):
        forward_partials(h.astype(jnp.float32), w.astype(jnp.float32), y, **ok)
    with pytest.raises(ValueError):
        forward_partials(h[:100], w, y[:100], **ok)


def test_choose_grid_covers_vocabulary():
    for n_pad, v_pad in ((8192, 256_000), (1024, 5120), (128, 256)):
        splits, tps = choose_grid(n_pad, v_pad)
        tiles = v_pad // 256
        assert (splits - 1) * tps < tiles <= splits * tps


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1000, 256, 5003), (300, 200, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_matches_triton_forward(shape):
    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    from jax_heads.pallas import lse_and_target

    n, d, v = shape
    h, w, y = _inputs(n, d, v, v, seed=sum(shape))
    ref_lse, ref_tgt = lse_and_target(h, w, y, config=BlockSizes(forward_kernel="triton"))
    lse, tgt = lse_and_target(h, w, y, config=BlockSizes(forward_kernel="mosaic"))
    assert_close("lse", np.asarray(lse), np.asarray(ref_lse), "float32")
    assert_close("target logit", np.asarray(tgt), np.asarray(ref_tgt), "float32")


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("softcap", [None, 30.0, 2.5], ids=lambda c: f"softcap-{c}")
def test_gpu_options_match_triton_forward(softcap, bias):
    """The bias, soft-capping and the row sum (label smoothing) in the Mosaic forward's epilogue against
    the Triton forward and the float64 truth on the GPU, at a ragged vocabulary."""
    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    from jax_heads.pallas import lse_and_target

    n, v = 1000, 5003
    h, w, y = _inputs(n, 256, v, v, seed=7)
    h = h * 8  # logits of tens, where a cap of 2.5 or 30 changes them
    b = jnp.asarray(3.0 * np.random.default_rng(5).standard_normal(v, np.float32)) if bias else None
    kwargs = dict(bias=b, softcap=softcap, row_sum=True)
    ref = lse_and_target(h, w, y, config=BlockSizes(forward_kernel="triton"), **kwargs)
    got = lse_and_target(h, w, y, config=BlockSizes(forward_kernel="mosaic"), **kwargs)
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T + (0.0 if b is None else np.asarray(b, np.float64))
    zc = z if softcap is None else softcap * np.tanh(z / softcap)
    yy = np.asarray(y)
    ok = (yy >= 0) & (yy < v)
    mx = zc.max(1)
    truth = (mx + np.log(np.exp(zc - mx[:, None]).sum(1)), np.where(ok, zc[np.arange(n), np.where(ok, yy, 0)], 0.0),
             zc.sum(1))
    for name, g, r, t in zip(("lse", "target logit", "row sum"), got, ref, truth, strict=True):
        assert_close(f"{name} vs triton", np.asarray(g), np.asarray(r), "float32")
        assert_close(f"{name} vs float64", np.asarray(g), t, "float32")
