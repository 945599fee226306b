"""The gradients-in-the-forward path (``jax_heads/fused.py``) against the float64 ground truth."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ground_truth import lce_ground_truth
from helpers import JAX_DTYPES, jax_naive, pallas_inputs

from heads_common.tolerances import assert_close
from jax_heads.fused import fused_loss


def _check(shape, dtype, reduction, upstream_scalar, budget_rows=7):
    h, w, y, _ = pallas_inputs(*shape, JAX_DTYPES[dtype], seed=sum(shape) + 7)
    n, v = shape[0], shape[2]
    count = max(int((np.asarray(y) != -100).sum()), 1)
    per_token = np.full(n, upstream_scalar if reduction == "sum" else upstream_scalar / count)

    def f(a, b):
        return fused_loss(a, b, y, -100, reduction, logits_budget_bytes=budget_rows * v * 4) * upstream_scalar

    value, (dh, dw) = jax.jit(jax.value_and_grad(f, (0, 1)))(h, w)
    assert dh.dtype == h.dtype and dw.dtype == w.dtype
    loss, gdh, gdw = lce_ground_truth(np.asarray(h, np.float64), np.asarray(w, np.float64), np.asarray(y), per_token)
    naive = [None] * 3
    if dtype != "float32":
        nl, ndh, ndw = jax_naive(h, w, y, per_token)
        naive = [
            np.sum(np.asarray(nl, np.float64) * per_token), np.asarray(ndh, np.float64), np.asarray(ndw, np.float64)
        ]
    truths = (np.sum(loss * per_token), gdh, gdw)
    for name, got, truth, base in zip(("loss", "d_hidden", "d_weight"), (value, dh, dw), truths, naive):
        assert_close(name, np.asarray(got, np.float64), truth, dtype, base)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(37, 24, 101), (5, 3, 7), (1, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_matches_ground_truth(shape, dtype, reduction):
    _check(shape, dtype, reduction, upstream_scalar=1.0)


def test_upstream_scalar_scales_both_gradients():
    _check((50, 40, 257), "float32", "mean", upstream_scalar=-2.5)


def test_all_ignored_and_empty():
    h, w, y, _ = pallas_inputs(20, 8, 30, jnp.float32, seed=1, ignore_frac=1.0)
    for a, b, labels in ((h, w, y), (h[:0], w, y[:0])):
        loss_fn = lambda p, q, labels=labels: fused_loss(p, q, labels, -100, "mean")
        value, (dh, dw) = jax.value_and_grad(loss_fn, (0, 1))(a, b)
        assert float(value) == 0.0 and not np.any(dh) and not np.any(dw)


def test_evaluation_runs_the_forward_only():
    h, w, y, _ = pallas_inputs(37, 24, 101, jnp.float32, seed=2)
    text = jax.jit(lambda a, b: fused_loss(a, b, y, -100, "sum")).lower(h, w).as_text()
    assert text.count("dot_general") == 1  # the logits product; no gradient products


def test_needs_a_uniform_upstream():
    h, w, y, _ = pallas_inputs(5, 3, 7, jnp.float32, seed=3)
    with pytest.raises(ValueError, match="uniform upstream gradient"):
        fused_loss(h, w, y, -100, "none")


def test_through_linear_cross_entropy():
    """``impl="fused"`` in the public function: same value and gradients as the direct call, checks."""
    import jax_heads

    h, w, y, _ = pallas_inputs(37, 24, 101, jnp.float32, seed=4)
    h3, y3 = h.reshape(1, 37, 24), y.reshape(1, 37)
    for reduction in ("sum", "mean"):
        got = jax.value_and_grad(
            lambda a, b, reduction=reduction: jax_heads.linear_cross_entropy(
                a, b, y3, reduction=reduction, impl="fused"
            ),
            (0, 1),
        )(h3, w)
        want = jax.value_and_grad(lambda a, b, reduction=reduction: fused_loss(a, b, y, -100, reduction), (0, 1))(h, w)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1][0]).reshape(37, 24), np.asarray(want[1][0]))
        np.testing.assert_array_equal(np.asarray(got[1][1]), np.asarray(want[1][1]))
    with pytest.raises(ValueError, match="uniform upstream gradient"):
        jax_heads.linear_cross_entropy(h, w, y, impl="fused")
    with pytest.raises(ValueError, match="labels must be in"):
        jax_heads.linear_cross_entropy(h, w, y.at[0].set(101), impl="fused", reduction="sum")
    # Under jit an out-of-range label makes the (scalar) loss NaN, and that token's gradient row only.
    y_bad = y.at[0].set(101)
    valid = np.asarray(y) != -100
    for reduction in ("sum", "mean"):
        value, (dh, dw) = jax.jit(jax.value_and_grad(
            lambda a, b, yy, reduction=reduction: jax_heads.linear_cross_entropy(
                a, b, yy, impl="fused", reduction=reduction
            ),
            (0, 1),
        ))(h, w, y_bad)
        assert np.isnan(float(value)) and np.all(np.isnan(np.asarray(dh[0])))
        rows = np.flatnonzero(valid)[1:]
        assert np.isfinite(np.asarray(dh)[rows]).all() and np.any(np.asarray(dh)[rows])
