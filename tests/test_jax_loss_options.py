"""The loss options in the JAX implementations, beyond the one-chunk grid of ``test_loss_options.py``:
several chunks with padding rows (``chunked``, ``fused``), a bias large enough that a padding row's
``exp`` would overflow, bfloat16 against the naive same-dtype baseline, soft-capping at Gemma-2
scale, and the vocabulary-parallel op with options on a one-device mesh here and on 4 fake CPU
devices in a subprocess (``tests/multidevice/jax_vocab_parallel_options.py``, which reports JSON).

Every case is judged against the float64 ground truth (``ground_truth.py``) with the tolerance table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ground_truth import shifted_options_ground_truth

from heads_common.tolerances import assert_close
from jax_heads import linear_cross_entropy
from jax_heads.chunked import chunked_loss
from jax_heads.fused import fused_loss

IGNORE = -100
OPTIONS = {"softcap": 2.5, "label_smoothing": 0.15, "lse_square_scale": 0.05}
NAMES = ("loss", "lse", "d_hidden", "d_weight", "d_bias")


def make_problem(lead, d, v, seed, dtype=jnp.float32, bias_scale=0.5, scale=1.0):
    """hidden ``(*lead, D)``, weight, bias and labels (about a fifth ignored) as JAX arrays of ``dtype``."""
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((*lead, d)) * scale, dtype)
    w = jnp.asarray(rng.standard_normal((v, d)) / np.sqrt(d), dtype)
    b = jnp.asarray(rng.standard_normal(v) * bias_scale, dtype)
    y = rng.integers(0, v, lead)
    y[rng.random(lead) < 0.2] = IGNORE
    return h, w, b, jnp.asarray(y, jnp.int32)


def f64(x):
    return None if x is None else np.asarray(x, np.float64)


def loss_and_grads(fn, h, w, b, upstream=None, upstream_lse=None):
    """``fn(h, w, b)`` (a loss, or ``(loss, lse)``) and the gradients of ``Σ upstream·loss + Σ upstream_lse·lse``
    (``loss`` itself when it is a scalar), as float64 arrays in the order of :data:`NAMES`."""

    def objective(h, w, b):
        out = fn(h, w, b)
        loss, lse = out if isinstance(out, tuple) else (out, None)
        total = loss if upstream is None else jnp.sum(loss * jnp.asarray(upstream, jnp.float32))
        if lse is not None:
            total = total + jnp.sum(lse * jnp.asarray(upstream_lse, jnp.float32))
        return total, (loss, lse)

    argnums = (0, 1) if b is None else (0, 1, 2)
    (_, (loss, lse)), grads = jax.jit(jax.value_and_grad(objective, argnums, has_aux=True))(h, w, b)
    return f64(loss), f64(lse), f64(grads[0]), f64(grads[1]), f64(grads[2]) if b is not None else None


def truth(h, w, b, y, reduction="none", upstream=None, upstream_lse=None, shift=0, **options):
    return shifted_options_ground_truth(
        f64(h), f64(w), np.asarray(y), upstream, shift=shift, reduction=reduction, upstream_lse=upstream_lse,
        bias=f64(b), ignore_index=IGNORE, **options,
    )


def check(case, got, want, dtype="float32", naive=None):
    for i, (name, g, t) in enumerate(zip(NAMES, got, want)):
        if t is None:
            assert g is None, f"{case} {name}: expected nothing"
            continue
        assert_close(f"{case} {name}", g, t, dtype, None if naive is None else naive[i])


# ------------------------------------------------------------------------------------------
# Several chunks with padding rows
# ------------------------------------------------------------------------------------------

# A bias of 100 at a few classes: without the fill of the padding rows' lse, exp(100) overflows
# float32 there and 0·inf makes every gradient NaN.
CHUNK_CASES = {
    "all": (OPTIONS, 0.5),
    "large-bias": ({}, 100.0),
    "large-bias-softcap": ({"softcap": 30.0}, 100.0),
}


def _large_bias(b, bias_scale):
    return b if bias_scale < 10 else b.at[::7].set(bias_scale).at[1::7].set(0.0)


@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_chunked_over_several_chunks_with_padding(case):
    options, bias_scale = CHUNK_CASES[case]
    n, d, v = 23, 12, 61
    h, w, b, y = make_problem((n,), d, v, seed=11)
    b = _large_bias(b, bias_scale)
    rng = np.random.default_rng(5)
    up, up_lse = rng.standard_normal(n), rng.standard_normal(n)

    def fn(h, w, b):  # 4 rows per chunk: 6 chunks, the last with one padding row
        return chunked_loss(h, w, y, IGNORE, 4 * v * 4, bias=b, return_lse=True, **options)

    got = loss_and_grads(fn, h, w, b, up, up_lse)
    check(f"chunked-{case}", got, truth(h, w, b, y, upstream=up, upstream_lse=up_lse, **options))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_fused_over_several_chunks_with_padding(case, reduction):
    options, bias_scale = CHUNK_CASES[case]
    n, d, v = 23, 12, 61
    h, w, b, y = make_problem((n,), d, v, seed=12)
    b = _large_bias(b, bias_scale)

    def fn(h, w, b):
        return fused_loss(h, w, y, IGNORE, reduction, bias=b, logits_budget_bytes=4 * v * 4, **options)

    got = loss_and_grads(fn, h, w, b)
    want = truth(h, w, b, y, reduction, **options)
    check(f"fused-{case}-{reduction}", got, (want[0], None, *want[2:]))


# ------------------------------------------------------------------------------------------
# bfloat16, softcap at Gemma-2 scale
# ------------------------------------------------------------------------------------------


def naive_bfloat16(h, w, b, y, reduction, upstream, upstream_lse, **options):
    """The materialised-logits computation in the input dtype (logits and bias add in bfloat16, the rest
    in float32, the logits' gradient rounded to bfloat16): the baseline of the half-precision bound."""
    eps, lam, cap = options.get("label_smoothing", 0.0), options.get("lse_square_scale", 0.0), options.get("softcap")

    def fn(h, w, b):
        z = (h @ w.T + b).astype(jnp.float32)
        z = cap * jnp.tanh(z / cap) if cap else z
        lse = jax.nn.logsumexp(z, axis=-1)
        valid = y != IGNORE
        target = jnp.take_along_axis(z, jnp.where(valid, y, 0)[:, None], axis=1)[:, 0]
        loss = (1 - eps) * (lse - target) + eps * (lse - z.mean(axis=-1)) + lam * lse**2
        loss = jnp.where(valid, loss, 0.0)
        if reduction != "none":
            loss = loss.sum() / (jnp.maximum(valid.sum(), 1) if reduction == "mean" else 1)
        return (loss, jnp.where(valid, lse, 0.0)) if upstream_lse is not None else loss

    return loss_and_grads(fn, h, w, b, None if reduction != "none" else upstream, upstream_lse)


@pytest.mark.parametrize("impl, reduction", [("chunked", "none"), ("chunked", "mean"), ("fused", "sum")])
def test_bfloat16_all_options_against_the_naive_baseline(impl, reduction):
    n, d, v = 37, 24, 203
    h, w, b, y = make_problem((n,), d, v, seed=21, dtype=jnp.bfloat16)
    rng = np.random.default_rng(6)
    up = rng.standard_normal(n) if reduction == "none" else None
    up_lse = rng.standard_normal(n) if impl != "fused" else None

    def fn(h, w, b):
        return linear_cross_entropy(h, w, y, bias=b, reduction=reduction, impl=impl, return_lse=impl != "fused",
                                    **OPTIONS)

    got = loss_and_grads(fn, h, w, b, up, up_lse)
    naive = naive_bfloat16(h, w, b, y, reduction, up, up_lse, **OPTIONS)
    want = truth(h, w, b, y, reduction, up, up_lse, **OPTIONS)
    if impl == "fused":
        naive, want = (naive[0], None, *naive[2:]), (want[0], None, *want[2:])
    assert got[2].dtype == np.float64 and all(g is not None for g in got[2:])
    check(f"{impl}-bfloat16-{reduction}", got, want, "bfloat16", naive)


@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_softcap_at_gemma_scale(impl):
    """Logits large enough that soft-capping at 30 moves the loss by more than 1e-3."""
    h, w, b, y = make_problem((29,), 16, 97, seed=3, scale=12.0)
    capped = truth(h, w, None, y, "mean", softcap=30.0)
    assert abs(capped[0] - truth(h, w, None, y, "mean")[0]) > 1e-3
    got = loss_and_grads(lambda h, w, b: linear_cross_entropy(h, w, y, reduction="mean", impl=impl, softcap=30.0),
                         h, w, None)
    check(f"{impl}-softcap-30", got, (capped[0], None, *capped[2:]))


# ------------------------------------------------------------------------------------------
# Vocabulary-parallel op with options
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("impl", ["chunked", "reference", "pallas"])
def test_vocab_parallel_options_on_a_one_device_mesh(impl, reduction):
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "vocab"))
    h, w, b, y = make_problem((2, 9), 24, 203, seed=31)
    rng = np.random.default_rng(8)
    up = rng.standard_normal((2, 8)) if reduction == "none" else None
    up_lse = rng.standard_normal((2, 8))

    def fn(h, w, b):
        return linear_cross_entropy(h, w, y, bias=b, reduction=reduction, impl=impl, mesh=mesh, vocab_axis="vocab",
                                    batch_axis="data", shift=1, return_lse=True, interpret=impl == "pallas", **OPTIONS)

    got = loss_and_grads(fn, h, w, b, up, up_lse)
    check(f"vocab-parallel-{impl}-{reduction}", got, truth(h, w, b, y, reduction, up, up_lse, shift=1, **OPTIONS))


def test_vocab_parallel_none_with_options_supports_them():
    """impl=None never picks an implementation that would ignore an option (on CPU: chunked shards)."""
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "vocab"))
    h, w, b, y = make_problem((5,), 8, 16, seed=1)
    loss = linear_cross_entropy(h, w, y, mesh=mesh, vocab_axis="vocab", bias=b, softcap=3.0)
    want = truth(h, w, b, y, upstream=np.ones(5), softcap=3.0)[0]
    assert_close("vocab-parallel impl=None with options", f64(loss), want, "float32")


def test_vocab_parallel_options_on_four_devices():
    """4 fake CPU devices (1 x 4 and 2 x 2 meshes), chunked and reference shards, every option at once."""
    script = os.path.join(os.path.dirname(__file__), "multidevice", "jax_vocab_parallel_options.py")
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4
    names = {case["name"] for case in report["cases"]}
    assert names == {f"{impl}-{mesh}-{opts}" for impl in ("chunked", "reference") for mesh in ("1x4", "2x2")
                     for opts in ("all-none", "all-mean", "bias-sum")} | {"pallas-2x2-all-mean"}, names
    for case in report["cases"]:
        assert all(err <= case["bound"] for err in case["errors"].values()), case
        assert case["d_bias_shard_rows"] == case["expected_shard_rows"], case
