"""Run ``linear_cross_entropy`` of either framework on NumPy inputs; read back loss and gradients.

Shared by ``test_robustness.py`` and ``test_properties.py``. A case names ``(framework, impl)``;
inputs are NumPy arrays that the framework rounds to ``dtype``; results come back as float64
NumPy arrays, so one ground truth (``ground_truth.py``) and one tolerance table judge all of them.

JAX runs are compiled with ``jax.jit`` with the labels closed over: they stay concrete, so the
eager label checks still apply (and one compiled call is far faster than op-by-op dispatch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax_heads
import torch_heads
from jax_heads.reduction import reduce_loss as jax_reduce_loss
from torch_heads.functional import reduce_loss as torch_reduce_loss

IGNORE = -100
# Every implementation that runs on a CPU; "pallas" runs in Pallas interpret mode (slow: ~1 s a call).
IMPLS = [("torch", "chunked"), ("torch", "reference"), ("jax", "chunked"), ("jax", "reference"), ("jax", "pallas")]
IMPL_PARAMS = [pytest.param(fw, impl, id=f"{fw}-{impl}") for fw, impl in IMPLS]


def to_framework(framework: str, x, dtype: str):
    """``x`` (NumPy) as a torch tensor or JAX array of ``dtype`` (a NumPy/torch dtype name)."""
    if framework == "torch":
        return torch.from_numpy(np.asarray(x)).to(getattr(torch, dtype))
    return jnp.asarray(x, dtype)


def as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x).astype(np.float64)


def rounded(framework: str, x, dtype: str) -> np.ndarray:
    """The float64 values ``x`` takes once the framework rounds it to ``dtype``."""
    return as_float64(to_framework(framework, x, dtype))


def _torch_naive(h, w, y, ignore_index, reduction):
    """Materialised logits and per-token loss in the input dtype (the half-precision baseline)."""
    logits = h.reshape(-1, h.shape[-1]) @ w.T
    loss = F.cross_entropy(logits, y.reshape(-1).long(), ignore_index=ignore_index, reduction="none").float()
    loss = torch_reduce_loss(loss, y.reshape(-1) != ignore_index, reduction)
    return loss.reshape(y.shape) if reduction == "none" else loss


def _jax_naive(h, w, y, ignore_index, reduction):
    logits = h @ w.T
    valid = y != ignore_index
    target = jnp.take_along_axis(logits, jnp.where(valid, y, 0)[..., None], axis=-1)[..., 0]
    loss = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - target, 0).astype(jnp.float32)
    return jax_reduce_loss(loss, valid, reduction)


def run(
    framework: str,
    impl: str,
    hidden,
    weight,
    labels,
    upstream=None,
    *,
    reduction: str = "none",
    dtype: str = "float32",
    ignore_index: int = IGNORE,
    label_dtype: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(loss, d_hidden, d_weight)`` of one implementation, as float64 NumPy arrays.

    Args:
        framework, impl: e.g. ``("jax", "pallas")``; ``impl="naive"`` is the materialised-logits
            computation in ``dtype`` (the baseline of the half-precision bounds).
        hidden ``(..., D)``, weight ``(V, D)``: NumPy, rounded to ``dtype`` by the framework.
        labels ``(...)``: NumPy integers (cast to ``label_dtype`` if given), or a framework array.
        upstream: the gradient of the loss: an array of the loss's shape for ``"none"``; None for
            a reduced loss (``backward()`` of the scalar) or ones.
    """
    upstream = np.ones(np.shape(labels)) if upstream is None else np.asarray(upstream)
    if framework == "torch":
        return _run_torch(impl, hidden, weight, labels, upstream, reduction, dtype, ignore_index, label_dtype)
    return _run_jax(impl, hidden, weight, labels, upstream, reduction, dtype, ignore_index, label_dtype)


def _run_torch(impl, hidden, weight, labels, upstream, reduction, dtype, ignore_index, label_dtype):
    h = to_framework("torch", hidden, dtype).requires_grad_(True)
    w = to_framework("torch", weight, dtype).requires_grad_(True)
    y = labels if isinstance(labels, torch.Tensor) else torch.from_numpy(np.asarray(labels, label_dtype or np.int64))
    if impl == "naive":
        loss = _torch_naive(h, w, y, ignore_index, reduction)
    else:
        loss = torch_heads.linear_cross_entropy(h, w, y, ignore_index=ignore_index, reduction=reduction, impl=impl)
    if reduction == "none":
        loss.backward(torch.from_numpy(upstream).to(loss.dtype).reshape(loss.shape))
    else:
        loss.backward()
    assert h.grad.dtype == h.dtype and w.grad.dtype == w.dtype
    return as_float64(loss), as_float64(h.grad), as_float64(w.grad)


def _run_jax(impl, hidden, weight, labels, upstream, reduction, dtype, ignore_index, label_dtype):
    h = to_framework("jax", hidden, dtype)
    w = to_framework("jax", weight, dtype)
    y = labels if isinstance(labels, jax.Array) else jnp.asarray(np.asarray(labels), label_dtype or jnp.int32)
    g = jnp.asarray(upstream, jnp.float32)

    def objective(h, w):
        if impl == "naive":
            loss = _jax_naive(h, w, y, ignore_index, reduction)
        else:
            kwargs = {"impl": impl, "interpret": impl == "pallas"}
            loss = jax_heads.linear_cross_entropy(h, w, y, ignore_index=ignore_index, reduction=reduction, **kwargs)
        return (jnp.sum(loss * g.reshape(loss.shape)) if reduction == "none" else loss), loss

    (_, loss), (d_hidden, d_weight) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(h, w)
    assert d_hidden.dtype == h.dtype and d_weight.dtype == w.dtype
    return as_float64(loss), as_float64(d_hidden), as_float64(d_weight)
