"""The loss options inside our Pallas kernels (bias, softcap, smoothing row sum, z-loss, returned lse):
filtered backward against a float64 model of the filter, refusals (filtering with smoothing, a
second derivative), the lowered CUDA programs of the option kernels, and on a GPU every option in
both frameworks against the float64 ground truth.

``tests/test_loss_options.py`` runs every option through ``impl="pallas"`` (interpret mode) against
the ground truth; this file covers what is particular to the kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from ground_truth import lce_options_ground_truth
from test_jax_pallas import TINY

import jax_heads
import torch_heads
from heads_common.tolerances import assert_close
from jax_heads.pallas import BlockSizes, grads, pallas_loss

IGNORE = -100
NO_SMOOTHING = {"softcap": 2.5, "lse_square_scale": 0.05, "return_lse": True}
ALL = dict(NO_SMOOTHING, label_smoothing=0.15)


def _problem(n, d, v, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, d))
    w = rng.standard_normal((v, d)) * d**-0.5 * 2.0
    b = rng.standard_normal(v) * 0.5
    y = rng.integers(0, v, n)
    y[rng.random(n) < 0.2] = IGNORE
    return h.astype(dtype), w.astype(dtype), b.astype(dtype), y, rng.standard_normal(n), rng.standard_normal(n)


def _filtered_truth(h, w, b, y, g, g_lse, eps, softcap, lam, block_n, block_v, separate):
    """float64 model of the filtered backward with options: tiles of ``(p·A − B·onehot)·(1 − (z'/c)²)``
    kept where a counted row's ``|p − onehot|`` (``p`` alone with ``separate``) reaches ``eps``; with
    ``separate`` the targets of skipped tiles are added exactly."""
    z = h.astype(np.float64) @ w.astype(np.float64).T + b
    zc = softcap * np.tanh(z / softcap)
    lse = np.log(np.exp(zc - zc.max(1, keepdims=True)).sum(1)) + zc.max(1)
    valid = y != IGNORE
    g, g_lse = np.where(valid, g, 0.0), np.where(valid, g_lse, 0.0)
    p = np.exp(zc - lse[:, None])
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y))[valid], y[valid]] = 1.0
    value = p if separate else np.abs(p - onehot)
    counted = (g != 0) | (g_lse != 0)
    nb, nt = -(-len(y) // block_n), -(-w.shape[0] // block_v)
    maxima = np.full((nb, nt), -np.inf)
    for i in range(nb):
        for t in range(nt):
            tile = value[i * block_n:(i + 1) * block_n, t * block_v:(t + 1) * block_v]
            rows = tile[counted[i * block_n:(i + 1) * block_n]]
            maxima[i, t] = rows.max() if rows.size else -np.inf
    if eps is None:  # halfway between two tiles' maxima around the median: half the tiles kept
        m = np.sort(maxima[np.isfinite(maxima)])
        eps = float((m[len(m) // 2] + m[len(m) // 2 - 1]) / 2)
    keep = maxima >= eps
    mask = np.repeat(np.repeat(keep, block_n, 0), block_v, 1)[: len(y), : w.shape[0]]
    factor = 1.0 - (zc / softcap) ** 2
    a = g * (1 + 2 * lam * lse) + g_lse
    grad = (p * a[:, None] * mask - onehot * g[:, None] * (mask if not separate else 1.0)) * factor
    return grad @ w.astype(np.float64), grad.T @ h.astype(np.float64), grad.sum(0), keep, eps


@pytest.mark.parametrize("separate", [True, False], ids=["separate-targets", "keep-target-tiles"])
def test_interpret_filtered_options_match_the_filter_model(separate):
    """softcap, bias, z-loss and the returned lse with gradient filtering (smoothing is refused)."""
    h, w, b, y, g, g_lse = _problem(45, 24, 150, seed=11 + separate)
    y[1] = y[2] = y[0] if y[0] != IGNORE else 5  # tokens sharing a target
    bn, bv = TINY.backward.block_n, TINY.backward.block_v
    d_h, d_w, d_b, keep, eps = _filtered_truth(h, w, b, y, g, g_lse, None, 2.5, 0.05, bn, bv, separate)
    assert 0 < keep.sum() < keep.size, "the threshold must filter some tiles and keep others"

    def f(a, c, e):
        return pallas_loss(a, c, jnp.asarray(y, jnp.int32), IGNORE, bias=e, config=TINY, interpret=True,
                           filter_eps=eps, filter_separate_targets=separate, **NO_SMOOTHING)

    _, vjp = jax.vjp(f, jnp.asarray(h), jnp.asarray(w), jnp.asarray(b))
    got = vjp((jnp.asarray(g, jnp.float32), jnp.asarray(g_lse, jnp.float32)))
    for name, value, truth in zip(("d_hidden", "d_weight", "d_bias"), got, (d_h, d_w, d_b)):
        assert_close(f"filtered {name}", np.asarray(value, np.float64), truth, "float32")


def test_filtering_with_label_smoothing_is_refused_by_name():
    h, w, b, y, g, _ = _problem(8, 8, 20, seed=2)
    y = jnp.asarray(y, jnp.int32)
    with pytest.raises(ValueError, match="filter_eps=0.01 cannot be combined with label_smoothing"):
        pallas_loss(jnp.asarray(h), jnp.asarray(w), y, IGNORE, interpret=True, filter_eps=0.01, label_smoothing=0.1)
    with pytest.raises(ValueError, match="cannot be combined with label_smoothing"):
        grads(jnp.asarray(h), jnp.asarray(w), y, jnp.zeros(8), jnp.ones(8), coefficients=(jnp.ones(8), jnp.ones(8)),
              interpret=True, filter_eps=0.01)
    with pytest.raises(ValueError, match="impl='pallas' cannot run.*cannot be combined with label_smoothing"):
        jax_heads.linear_cross_entropy(jnp.asarray(h), jnp.asarray(w), y, impl="pallas", interpret=True,
                                       filter_eps=0.01, label_smoothing=0.1)


@pytest.mark.parametrize("options", [{}, ALL], ids=["plain", "all-options"])
def test_second_derivative_raises_naming_the_implementations_that_have_one(options):
    h, w, _, y, _, _ = _problem(8, 8, 20, seed=3)
    y = jnp.asarray(y, jnp.int32)

    def loss(a):
        out = jax_heads.linear_cross_entropy(a, jnp.asarray(w), y, impl="pallas", interpret=True, reduction="mean",
                                             **options)
        return out[0] if options.get("return_lse") else out

    jax.grad(loss)(jnp.asarray(h))  # once is fine
    with pytest.raises(NotImplementedError, match="impl='chunked' or impl='reference'"):
        jax.grad(lambda a: jax.grad(loss)(a).sum())(jnp.asarray(h))


@pytest.mark.parametrize("named", ["triton", "auto"])
def test_option_kernels_lower_to_triton_for_cuda(named):
    """The forward and gradient-logits kernels with every option compile to Triton calls for CUDA."""
    from jax import export

    disabled = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    h = jax.ShapeDtypeStruct((300, 200), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((1000, 200), jnp.bfloat16)
    b = jax.ShapeDtypeStruct((1000,), jnp.bfloat16)
    y = jnp.zeros((300,), jnp.int32)
    config = BlockSizes(forward_kernel=named)

    def f(a, c, e):
        loss, lse = pallas_loss(a, c, y, IGNORE, bias=e, config=config, **ALL)
        return (loss + lse).sum()

    module = export.export(jax.jit(jax.grad(f, argnums=(0, 1, 2))), platforms=["cuda"],
                           disabled_checks=disabled)(h, w, b).mlir_module()
    assert module.count("__gpu$xla.gpu.triton") == 2
    assert "lce_forward_options" in module and "lce_grad_logits" in module


# --- GPU: every option in both frameworks against the float64 ground truth ----------------------

GPU_SHAPE = (1000, 200, 5003)  # unaligned against every tile


def _gpu_truth(h, w, b, y, g, g_lse, options):
    kwargs = {k: v for k, v in options.items() if k != "return_lse"}
    return lce_options_ground_truth(h, w, y, g, bias=b, upstream_lse=g_lse, ignore_index=IGNORE, **kwargs)


def _naive_jax(h, w, b, y, g, g_lse, options):
    """The reference implementation in the inputs' dtype: the baseline for half-precision bounds."""
    def f(a, c, e):
        return jax_heads.linear_cross_entropy(a, c, y, bias=e, impl="reference", **options)

    (loss, lse), vjp = jax.vjp(f, h, w, b)
    return (loss, lse, *vjp((g, g_lse)))


@pytest.mark.gpu
@pytest.mark.parametrize("framework", ["jax", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_all_options_match_ground_truth(framework, dtype):
    if jax.default_backend() != "gpu" or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    n, d, v = GPU_SHAPE
    h, w, b, y, g, g_lse = _problem(n, d, v, seed=21)
    truth = _gpu_truth(h, w, b, y, g, g_lse, ALL)
    jdt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    jh, jw, jb = (jnp.asarray(x, jdt) for x in (h, w, b))
    jy, jg, jgl = jnp.asarray(y, jnp.int32), jnp.asarray(g, jnp.float32), jnp.asarray(g_lse, jnp.float32)
    naive = None if dtype == "float32" else _naive_jax(jh, jw, jb, jy, jg, jgl, ALL)
    if framework == "jax":
        f = lambda a, c, e: jax_heads.linear_cross_entropy(a, c, jy, bias=e, impl="pallas", **ALL)  # noqa: E731
        (loss, lse), vjp = jax.vjp(f, jh, jw, jb)
        got = (loss, lse, *vjp((jg, jgl)))
    else:
        tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        th, tw, tb = (torch.tensor(x, dtype=tdt, device="cuda", requires_grad=True) for x in (h, w, b))
        loss, lse = torch_heads.linear_cross_entropy(th, tw, torch.tensor(y, device="cuda"), bias=tb, impl="pallas",
                                                     **ALL)
        up = lambda x: torch.tensor(x, dtype=torch.float32, device="cuda")  # noqa: E731
        ((loss * up(g)).sum() + (lse * up(g_lse)).sum()).backward()
        got = (loss, lse, th.grad, tw.grad, tb.grad)
    as64 = lambda x: np.asarray(x.detach().float().cpu() if isinstance(x, torch.Tensor) else x, np.float64)  # noqa: E731
    for i, (name, value, t) in enumerate(zip(("loss", "lse", "d_hidden", "d_weight", "d_bias"), got, truth)):
        assert_close(f"{framework}-pallas-{dtype} {name}", as64(value), t, dtype,
                     None if naive is None else as64(naive[i]))


def test_mosaic_forward_takes_the_bias_on_hopper_and_refuses_it_by_name_in_interpret_mode(monkeypatch):
    """On a Hopper host "auto" resolves to Mosaic with a bias too; in interpret mode the bias stays on
    the Triton forward ("auto") and a named "mosaic" raises saying why (no silent fallback)."""
    from jax_heads import pallas
    from jax_heads.pallas.op import forward_kernel_for
    from jax_heads.pallas.plan import plan_for

    monkeypatch.setattr(pallas.plan, "gpu_capabilities", lambda: ("9.0",))
    monkeypatch.setattr(pallas.plan, "is_hopper", lambda: True)
    plan = plan_for(8192, 256_000, 2304, BlockSizes())
    assert forward_kernel_for(jnp.bfloat16, plan, BlockSizes(), False) == "mosaic"
    assert forward_kernel_for(jnp.bfloat16, plan, BlockSizes(), False, bias_given=True) == "mosaic"
    assert forward_kernel_for(jnp.bfloat16, plan, BlockSizes(), True, bias_given=True) == "triton"
    named = BlockSizes(forward_kernel="mosaic")
    assert forward_kernel_for(jnp.bfloat16, plan, named, False, bias_given=True) == "mosaic"
    with pytest.raises(ValueError, match="forward_kernel='mosaic' cannot run.*bias path runs on the GPU only"):
        forward_kernel_for(jnp.bfloat16, plan, named, True, bias_given=True)


def test_named_mosaic_forward_with_a_bias_in_interpret_mode_raises_through_the_loss():
    h, w, b, y, _, _ = _problem(8, 64, 20, seed=4, dtype=np.float32)
    h, w = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    with pytest.raises(ValueError, match="bias path runs on the GPU only"):
        pallas_loss(h, w, jnp.asarray(y, jnp.int32), IGNORE, bias=jnp.asarray(b, jnp.bfloat16), interpret=True,
                    config=BlockSizes(forward_kernel="mosaic"))
