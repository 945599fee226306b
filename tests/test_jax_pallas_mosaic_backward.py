"""The Mosaic GPU gradient-logits kernel (jax_heads/pallas/mosaic_backward.py) behind ``pallas_loss``.

On any machine: the kernel in Mosaic GPU interpret mode (the same two interpret-mode differences as
the forward's, ``tests/test_jax_pallas_mosaic.py``) at a tiny ragged shape with two overlapping
vocabulary chunks, every gradient against the float64 truth with the Triton gradient-logits kernel's
error as the baseline; its CUDA lowering with every option; the kernel choice and its refusals.
On a GPU: both kernels and the truth at a realistic shape, with and without the loss options.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ground_truth import lce_options_ground_truth
from helpers import TINY

from heads_common.tolerances import assert_close
from jax_heads import pallas
from jax_heads.pallas import BackwardConfig, BlockSizes, MosaicForwardConfig, pallas_loss
from jax_heads.pallas.mosaic_backward import backward_kernel_for
from jax_heads.pallas.plan import plan_for

IGNORE = -100
OPTIONS = {"softcap": 2.5, "label_smoothing": 0.15, "lse_square_scale": 0.05, "return_lse": True}

# Interpret mode: 100 tokens → 1 block of 128, D 50 → 64 (one K step), V 150 → 192 = 3 tiles of 64 (the
# last ragged); chunks of 128 rows (512 bytes per row), so the second chunk starts at 64 and overlaps.
TINY_MOSAIC = dataclasses.replace(
    TINY, backward_kernel="mosaic",
    backward=dataclasses.replace(TINY.backward, chunk_bytes=128 * 512),
    mosaic=MosaicForwardConfig(block_n=128, block_v=64, block_k=64, max_concurrent_steps=2, min_programs=1),
)


def _problem(n, d, v, seed, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((n, d)), dtype)
    w = jnp.asarray(rng.standard_normal((v, d)) * d**-0.5 * 2.0, dtype)
    b = jnp.asarray(rng.standard_normal(v) * 0.5, dtype)
    y = rng.integers(0, v, n)
    y[rng.random(n) < 0.2] = IGNORE
    y[3] = v - 1  # a target in the ragged last tile
    return h, w, b, jnp.asarray(y, jnp.int32), rng.standard_normal(n), rng.standard_normal(n)


def _grads(h, w, b, y, up, up_lse, config, interpret, options):
    """``(loss, d_hidden, d_weight[, d_bias])`` of ``sum(up·loss) (+ sum(up_lse·lse))`` via ``pallas_loss``."""
    args = (h, w) if b is None else (h, w, b)

    def f(*a):
        return pallas_loss(a[0], a[1], y, IGNORE, bias=a[2] if len(a) > 2 else None, config=config,
                           interpret=interpret, **options)

    out, vjp = jax.vjp(f, *args)
    if options.get("return_lse"):
        cot = (jnp.asarray(up, jnp.float32), jnp.asarray(up_lse, jnp.float32))
        loss = out[0]
    else:
        cot, loss = jnp.asarray(up, jnp.float32), out
    return (loss, *vjp(cot))


def _compare(h, w, b, y, up, up_lse, options, mosaic, triton, interpret):
    """Loss and every gradient of the Mosaic backward against the float64 truth, no worse than the
    Triton backward's error by more than the bfloat16 slack."""
    got = _grads(h, w, b, y, up, up_lse, mosaic, interpret, options)
    base = _grads(h, w, b, y, up, up_lse, triton, interpret, options)
    truth = lce_options_ground_truth(
        np.asarray(h, np.float64), np.asarray(w, np.float64), np.asarray(y), up,
        bias=None if b is None else np.asarray(b, np.float64), softcap=options.get("softcap"),
        label_smoothing=options.get("label_smoothing", 0.0), lse_square_scale=options.get("lse_square_scale", 0.0),
        upstream_lse=up_lse if options.get("return_lse") else None,
    )
    truth = (truth[0], *truth[2:]) if b is not None else (truth[0], truth[2], truth[3])
    for name, g, t, ref in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, truth, base):
        assert g.dtype == ref.dtype
        assert_close(name, np.asarray(g, np.float64), t, "bfloat16", np.asarray(ref, np.float64))


@pytest.mark.parametrize("with_options", [False, True], ids=["plain", "bias-softcap-smoothing-zloss-lse"])
def test_interpret_matches_triton_and_float64(with_options):
    h, w, b, y, up, up_lse = _problem(100, 50, 150, seed=41 + with_options)
    options = OPTIONS if with_options else {}
    triton = dataclasses.replace(TINY_MOSAIC, backward_kernel="triton")
    _compare(h, w, b if with_options else None, y, up, up_lse, options, TINY_MOSAIC, triton, interpret=True)


def _export(config, bias, options):
    from jax import export

    n, d, v = 1000, 256, 5003
    h, w, y = jnp.zeros((n, d), jnp.bfloat16), jnp.zeros((v, d), jnp.bfloat16), jnp.zeros((n,), jnp.int32)
    b = jnp.zeros((v,), jnp.bfloat16)

    def f(h, w, b):
        def loss(a, c, bb):
            out = pallas_loss(a, c, y, IGNORE, bias=bb if bias else None, config=config, **options)
            return (out[0] if options.get("return_lse") else out).sum()

        return jax.grad(loss, (0, 1, 2))(h, w, b)

    disabled = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    return export.export(jax.jit(f), platforms=["cuda"], disabled_checks=disabled)(h, w, b).mlir_module()


@pytest.mark.parametrize("bias, options", [(False, {}), (True, OPTIONS)], ids=["plain", "options"])
def test_lowers_for_cuda(bias, options):
    """The whole loss with the Mosaic backward, lowered for CUDA (no GPU needed): without options the
    forward is Mosaic too and the program holds no Triton kernel; with them the forward is Triton's."""
    config = BlockSizes(forward_kernel="triton" if bias else "mosaic", backward_kernel="mosaic")
    module = _export(config, bias, options)
    assert "lce_grad_logits_mosaic" in module
    assert ("__gpu$xla.gpu.triton" in module) == bias


def test_backward_kernel_resolution(monkeypatch):
    gemma = plan_for(8192, 256_000, 2304, BlockSizes())
    auto, named = BlockSizes(), BlockSizes(backward_kernel="mosaic")
    assert backward_kernel_for(jnp.bfloat16, gemma, auto, True) == "triton"  # interpret mode
    assert backward_kernel_for(jnp.bfloat16, gemma, named, True) == "mosaic"
    assert backward_kernel_for(jnp.bfloat16, gemma, BlockSizes(backward_kernel="triton"), False) == "triton"
    with pytest.raises(ValueError, match="backward_kernel='mosaic' cannot run on these inputs: it takes bfloat16"):
        backward_kernel_for(jnp.float32, gemma, named, False)
    with pytest.raises(ValueError, match="backward_kernel='mosaic' cannot run on these inputs: gradient filtering"):
        backward_kernel_for(jnp.bfloat16, gemma, named, False, filtered=True)
    big = BlockSizes(backward_kernel="mosaic", mosaic=MosaicForwardConfig(max_concurrent_steps=4))
    with pytest.raises(ValueError, match="bytes of shared memory"):
        backward_kernel_for(jnp.bfloat16, gemma, big, False)
    # Named, it pads D to its K step (200 → 256).
    assert plan_for(300, 1000, 200, named).d_pad == 256

    monkeypatch.setattr(pallas.plan, "gpu_capabilities", lambda: ("9.0",))
    assert backward_kernel_for(jnp.bfloat16, gemma, auto, False) == "mosaic"
    assert backward_kernel_for(jnp.bfloat16, gemma, auto, False, filtered=True) == "triton"
    assert backward_kernel_for(jnp.float16, gemma, auto, False) == "mosaic"
    assert backward_kernel_for(jnp.float32, gemma, auto, False) == "triton"
    assert backward_kernel_for(jnp.bfloat16, plan_for(300, 1000, 200, auto), auto, False) == "triton"  # D 200
    monkeypatch.setattr(pallas.plan, "gpu_capabilities", lambda: ("9.0", "8.0"))
    assert backward_kernel_for(jnp.bfloat16, gemma, auto, False) == "triton"
    with pytest.raises(ValueError, match=r"needs a Hopper GPU \(compute capability 9.x\), found 9.0, 8.0"):
        backward_kernel_for(jnp.bfloat16, gemma, named, False)


def test_named_mosaic_refuses_filtering():
    h, w, b, y, *_ = _problem(100, 50, 150, seed=3)
    with pytest.raises(ValueError, match="backward_kernel='mosaic' cannot run on these inputs: gradient filtering"):
        jax.grad(lambda a: pallas_loss(a, w, y, IGNORE, config=TINY_MOSAIC, interpret=True,
                                       filter_eps=1e-3).sum())(h)


@pytest.mark.parametrize("value", ["cuda", "Mosaic", None])
def test_backward_kernel_is_validated(value):
    with pytest.raises(ValueError, match=r"BlockSizes\.backward_kernel must be one of"):
        BlockSizes(backward_kernel=value)


@pytest.mark.gpu
@pytest.mark.parametrize("with_options", [False, True], ids=["plain", "bias-softcap-smoothing-zloss-lse"])
def test_gpu_matches_triton_and_float64(with_options):
    """Realistic size on the H200: N = 2048 + 37, D = 2304, V = 32 000 + 5 (ragged tile, several chunks)."""
    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    h, w, b, y, up, up_lse = _problem(2048 + 37, 2304, 32_000 + 5, seed=5 + with_options)
    options = dict(OPTIONS, softcap=30.0) if with_options else {}
    mosaic = BlockSizes(backward_kernel="mosaic", backward=BackwardConfig(chunk_bytes=16 * 2**20))
    triton = dataclasses.replace(mosaic, backward_kernel="triton")
    _compare(h, w, b if with_options else None, y, up, up_lse, options, mosaic, triton, interpret=False)
