"""The kernels' narrow entry, ``lse_and_target`` and ``grads``, against float64 (interpret mode, tiny tiles).

Every caller of the kernels (the JAX loss, the JAX vocabulary-parallel op, torch's ``impl="pallas"``
and its shards) goes through these two functions: any ``N``, ``V``, ``D``, a label outside
``[0, V)`` meaning "no target here", and gradients against a log-sum-exp that may be global over
several vocabulary shards.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from heads_common.tolerances import assert_close
from jax_heads.pallas import BackwardConfig, BlockSizes, FilterConfig, TritonForwardConfig, grads, lse_and_target

# Tiles of 16 so that tiny shapes have several token blocks, vocabulary splits, backward chunks
# (a shorter, overlapping last one) and ragged edges in N, V and D.
SMALL = BlockSizes(
    triton=TritonForwardConfig(block_n=16, block_v=16, block_d=16, min_programs=8),
    backward=BackwardConfig(block_n=16, block_v=16, block_d=16, chunk_bytes=48 * (48 + 32) * 4),
    filtered=FilterConfig(block_d=16, block_rows=16),
    sm_count=2,
)


def _inputs(n, d, v, seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, d))
    w = rng.standard_normal((v, d)) * d**-0.5 * 2.0
    return jnp.asarray(h, dtype), jnp.asarray(w, dtype), rng


def _logits64(h, w):
    return np.asarray(h, np.float64) @ np.asarray(w, np.float64).T


def _lse64(logits):
    m = logits.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]


def _labels(rng, n, v):
    """Targets in [0, V) and, on about a third of the tokens, values outside it (no target)."""
    y = rng.integers(0, v, n)
    outside = np.array([-100, -1, v, v + 3, 2**31 - 1])
    pick = rng.random(n) < 0.35
    y[pick] = outside[rng.integers(0, len(outside), n)][pick]
    return y


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(37, 24, 101), (5, 3, 7), (16, 16, 16)], ids=lambda s: "x".join(map(str, s)))
def test_lse_and_target_matches_float64(shape, dtype):
    n, d, v = shape
    h, w, rng = _inputs(n, d, v, seed=sum(shape), dtype=jnp.dtype(dtype))
    y = _labels(rng, n, v)
    lse, target = lse_and_target(h, w, jnp.asarray(y, jnp.int32), config=SMALL, interpret=True)
    assert lse.shape == target.shape == (n,) and lse.dtype == target.dtype == jnp.float32
    logits = _logits64(h, w)
    has_target = (y >= 0) & (y < v)
    want_target = np.where(has_target, logits[np.arange(n), np.clip(y, 0, v - 1)], 0.0)
    # 16-bit products are exact in float32 and accumulate in float32: float32's bound holds for both dtypes.
    assert_close("lse", np.asarray(lse), _lse64(logits), "float32")
    assert_close("target", np.asarray(target), want_target, "float32")
    assert np.all(np.asarray(target)[~has_target] == 0)


@pytest.mark.parametrize("shape", [(37, 24, 101), (50, 40, 257)], ids=lambda s: "x".join(map(str, s)))
def test_grads_of_a_vocabulary_shard_match_float64(shape):
    """The second of three vocabulary shards, against the global log-sum-exp: ``d_hidden`` is this
    shard's share of the full gradient and ``d_weight`` the shard's rows of it."""
    n, d, v = shape
    h, w, rng = _inputs(n, d, v, seed=sum(shape) + 1)
    y = _labels(rng, n, v)
    g = rng.standard_normal(n)
    g[(y < 0) | (y >= v)] = 0.0  # ignored tokens: upstream 0
    lo, hi = v // 3, 2 * v // 3
    local = np.where((y >= lo) & (y < hi), y - lo, -1)
    logits = _logits64(h, w)
    lse = _lse64(logits)

    d_hidden, d_weight = grads(h, w[lo:hi], jnp.asarray(local, jnp.int32), jnp.asarray(lse, jnp.float32),
                               jnp.asarray(g, jnp.float32), config=SMALL, interpret=True)
    assert d_hidden.shape == (n, d) and d_weight.shape == (hi - lo, d)
    assert d_hidden.dtype == d_weight.dtype == jnp.float32
    shard = logits[:, lo:hi]
    onehot = (local[:, None] == np.arange(hi - lo)[None, :]).astype(np.float64)
    grad_logits = g[:, None] * (np.exp(shard - lse[:, None]) - onehot)
    assert_close("d_hidden", np.asarray(d_hidden), grad_logits @ np.asarray(w[lo:hi], np.float64), "float32")
    assert_close("d_weight", np.asarray(d_weight), grad_logits.T @ np.asarray(h, np.float64), "float32")


def test_lse_and_target_and_grads_of_the_whole_vocabulary_give_the_loss_gradients():
    """``grads`` against ``lse_and_target``'s own log-sum-exp: the gradients of ``sum(g * (lse - target))``."""
    n, d, v = 21, 19, 45
    h, w, rng = _inputs(n, d, v, seed=7)
    y = _labels(rng, n, v)
    g = np.where((y >= 0) & (y < v), rng.standard_normal(n), 0.0)
    lse, _ = lse_and_target(h, w, jnp.asarray(y, jnp.int32), config=SMALL, interpret=True)
    d_hidden, d_weight = grads(h, w, jnp.asarray(y, jnp.int32), lse, jnp.asarray(g, jnp.float32), config=SMALL,
                               interpret=True)
    logits = _logits64(h, w)
    onehot = (y[:, None] == np.arange(v)[None, :]).astype(np.float64)
    grad_logits = g[:, None] * (np.exp(logits - _lse64(logits)[:, None]) - onehot)
    assert_close("d_hidden", np.asarray(d_hidden), grad_logits @ np.asarray(w, np.float64), "float32")
    assert_close("d_weight", np.asarray(d_weight), grad_logits.T @ np.asarray(h, np.float64), "float32")


def test_empty_tokens_and_empty_vocabulary():
    h, w, _ = _inputs(0, 8, 30, seed=3)
    lse, target = lse_and_target(h, w, jnp.zeros((0,), jnp.int32), config=SMALL, interpret=True)
    assert lse.shape == target.shape == (0,) and lse.dtype == target.dtype == jnp.float32
    d_hidden, d_weight = grads(h, w, jnp.zeros((0,), jnp.int32), lse, target, config=SMALL, interpret=True)
    assert d_hidden.shape == (0, 8) and d_weight.shape == (30, 8) and not np.any(d_weight)

    h, w, _ = _inputs(6, 8, 0, seed=4)
    lse, target = lse_and_target(h, w, jnp.full((6,), -1, jnp.int32), config=SMALL, interpret=True)
    assert np.all(np.asarray(lse) == -np.inf) and not np.any(target)
    d_hidden, d_weight = grads(h, w, jnp.full((6,), -1, jnp.int32), jnp.zeros((6,)), jnp.ones((6,)), config=SMALL,
                               interpret=True)
    assert d_hidden.shape == (6, 8) and d_weight.shape == (0, 8) and not np.any(d_hidden)
