"""Helpers the test modules share (no test module imports another).

torch: deterministic inputs, the float64 truth in the inputs' shapes, the naive same-dtype baseline and
one check against the tolerance table. JAX Pallas: the small tiles that give tiny CPU shapes several
blocks, splits and chunks, inputs, and the naive baseline.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from ground_truth import lce_ground_truth, upstream_for

from heads_common.tolerances import assert_close
from jax_heads.pallas import BackwardConfig, BlockSizes, FilterConfig, TritonForwardConfig

IGNORE = -100
REDUCTIONS = ("none", "sum", "mean")
# (framework, impl, extra keyword arguments): every implementation of both frameworks that runs on a CPU.
CPU_IMPLS = [
    ("torch", "reference", {}),
    ("torch", "chunked", {}),
    ("jax", "reference", {}),
    ("jax", "chunked", {}),
    ("jax", "pallas", {"interpret": True}),
    ("jax", "fused", {}),
]


def rng_for(case_id: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(case_id.encode()))


def to_np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().double().numpy()


def make_inputs(rng, lead, d, v, dtype, ignored_fraction=None, device="cpu"):
    """Hidden ``(*lead, D)`` and weight ``(V, D)`` in ``dtype`` (logits of order 1..3) and int64 labels.

    ``ignored_fraction``: None for a random 10-30%, else exactly that fraction of labels set to -100.
    """
    n = int(np.prod(lead))
    hidden = torch.from_numpy(rng.standard_normal((*lead, d)) * 1.5).to(device, dtype)
    weight = torch.from_numpy(rng.standard_normal((v, d)) / np.sqrt(d)).to(device, dtype)
    labels = rng.integers(0, v, size=n)
    fraction = rng.uniform(0.1, 0.3) if ignored_fraction is None else ignored_fraction
    labels[rng.permutation(n)[: int(round(fraction * n))]] = IGNORE
    return hidden, weight, torch.from_numpy(labels.reshape(lead)).to(device)


def reduce(per_token: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total if reduction == "sum" else total / max(int((labels != IGNORE).sum()), 1)


def truth_for(hidden, weight, labels, upstream, reduction):
    """Float64 ground truth of the loss (reduced like ``reduction``) and both gradients, in the inputs' shapes."""
    labels = labels.cpu()
    loss, d_hidden, d_weight = lce_ground_truth(
        to_np(hidden).reshape(-1, hidden.shape[-1]), to_np(weight), labels.reshape(-1).numpy(), upstream
    )
    if reduction == "none":
        loss = loss.reshape(labels.shape)
    else:
        loss = np.asarray(reduce(torch.from_numpy(loss), labels, reduction).item())
    return loss, d_hidden.reshape(hidden.shape), d_weight


def loss_and_grads(fn, hidden, weight, labels, upstream, reduction):
    """``fn(h, w, y)``'s loss and the gradients of ``sum(upstream * loss)`` (``loss.backward()`` if reduced)."""
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = fn(h, w, labels)
    if reduction == "none":
        loss.backward(torch.from_numpy(upstream).to(loss.device, loss.dtype).reshape(loss.shape))
    else:
        loss.backward()
    return loss.detach(), h.grad, w.grad


def naive(h, w, y, reduction):
    """Materialised logits and per-token loss in the input dtype; the reduction on the float32 upcast."""
    logits = h.reshape(-1, h.shape[-1]) @ w.T
    per_token = F.cross_entropy(logits, y.reshape(-1), ignore_index=IGNORE, reduction="none")
    return reduce(per_token.float().reshape(y.shape), y, reduction)


def check_against_truth(fn, hidden, weight, labels, reduction, dtype_name, rng):
    """Run ``fn`` and assert loss, d hidden and d weight are within ``dtype_name``'s tolerance of the truth."""
    upstream = upstream_for(labels.shape, reduction, labels.cpu().numpy(), rng)
    if reduction == "none":  # the truth sees the upstream gradient as the loss dtype rounds it
        upstream = upstream.astype(np.float64 if hidden.dtype == torch.float64 else np.float32).astype(np.float64)
    truths = truth_for(hidden, weight, labels, upstream, reduction)
    results = loss_and_grads(fn, hidden, weight, labels, upstream, reduction)
    baseline = (None, None, None)
    if hidden.dtype in (torch.float16, torch.bfloat16):
        baseline = loss_and_grads(
            lambda h, w, y: naive(h, w, y, reduction), hidden, weight, labels, upstream, reduction
        )
    for name, value, truth, base in zip(("loss", "d_hidden", "d_weight"), results, truths, baseline, strict=True):
        assert_close(name, to_np(value), truth, dtype_name, naive=to_np(base))
    return results


# Small tiles so that tiny CPU shapes still have several token blocks, vocabulary splits,
# backward chunks (a shorter last one) and ragged edges everywhere.
TINY = BlockSizes(
    triton=TritonForwardConfig(block_n=16, block_v=16, block_d=16, min_programs=8),
    backward=BackwardConfig(block_n=16, block_v=16, block_d=16, chunk_bytes=32 * (48 + 32) * 4),
    filtered=FilterConfig(block_d=16, block_rows=16),
    sm_count=2,
)


JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def pallas_inputs(n, d, v, dtype, seed, ignore_frac=0.2):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((n, d)), dtype)
    w = jnp.asarray(rng.standard_normal((v, d)) * d**-0.5 * 2.0, dtype)
    y = rng.integers(0, v, n)
    y[rng.random(n) < ignore_frac] = -100
    return h, w, jnp.asarray(y, jnp.int32), rng.standard_normal(n)


def jax_naive(h, w, y, upstream):
    """Materialised logits in the input dtype: the baseline for half-precision bounds."""

    def loss_fn(h, w):
        logits = (h @ w.T).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, jnp.maximum(y, 0)[:, None], axis=1)[:, 0]
        return jnp.where(y != -100, lse - tgt, 0.0)

    loss, vjp = jax.vjp(loss_fn, h, w)
    return (loss, *vjp(jnp.asarray(upstream, jnp.float32)))
