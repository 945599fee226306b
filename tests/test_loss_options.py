"""Every implementation of both frameworks that runs on a CPU, with no option (``plain``) and with the
loss options (bias, softcap, label smoothing, z-loss, shift, returned log-sum-exp), against the float64
ground truth written out by hand
(``ground_truth.lce_options_ground_truth``): loss, ``lse``, ``d_hidden``, ``d_weight`` and ``d_bias``,
on a ragged shape with ignored labels, for each option alone and all together, in all three reductions.

An implementation that does not support an option must refuse it by name (never a silent wrong
number); the registry records which do (``REGISTRY[impl].options``), and this file checks both.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from ground_truth import lce_options_ground_truth, upstream_for
from helpers import CPU_IMPLS
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_heads
import torch_heads
from heads_common.registry import LOSS_OPTIONS
from heads_common.tolerances import assert_close

IGNORE = -100
OPTION_SETS = {
    "plain": {},
    "bias": {"bias": True},
    "softcap": {"softcap": 2.5},
    "smoothing": {"label_smoothing": 0.15},
    "zloss": {"lse_square_scale": 0.05},
    "lse": {"return_lse": True},
    "shift": {"shift": 1},
    "shift2": {"shift": 2},
    "all": {"bias": True, "softcap": 2.5, "label_smoothing": 0.15, "lse_square_scale": 0.05, "return_lse": True,
            "shift": 1},
}
REDUCTIONS = ("none", "sum", "mean")
B, S, D, V = 2, 9, 24, 203  # ragged: no dimension a multiple of a tile


def registry(framework: str):
    return (torch_heads if framework == "torch" else jax_heads).functional.REGISTRY


def supported(framework: str, impl: str, options: dict, reduction: str) -> bool:
    if impl == "fused" and reduction == "none":
        return False
    names = {name for name in LOSS_OPTIONS if options.get(name) not in (None, False, 0, 0.0)}
    return names <= registry(framework)[impl].options


def make_problem(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((B, S, D)) * scale
    weight = rng.standard_normal((V, D)) / np.sqrt(D)
    bias = rng.standard_normal(V) * 0.5
    labels = rng.integers(0, V, (B, S))
    labels[0, 2] = labels[1, 5] = labels[1, 6] = IGNORE
    return hidden, weight, bias, labels


def truth(hidden, weight, bias, labels, options, reduction, rng):
    """Ground-truth loss, lse and gradients with the shift applied to the labels (hidden uncopied)."""
    k = int(options.get("shift", 0))
    shifted = np.concatenate([labels[:, k:], np.full((B, k), IGNORE)], axis=1) if k else labels
    kept = S - k
    upstream = upstream_for((B, kept), reduction, shifted[:, :kept], rng, IGNORE).reshape(B, kept)
    upstream_lse = rng.standard_normal((B, kept)) if options.get("return_lse") else None
    pad = lambda x: np.concatenate([x, np.zeros((B, k))], axis=1).reshape(-1)  # noqa: E731
    loss, lse, d_hidden, d_weight, d_bias = lce_options_ground_truth(
        hidden.reshape(-1, D), weight, shifted.reshape(-1), pad(upstream), bias=bias if options.get("bias") else None,
        softcap=options.get("softcap"), label_smoothing=options.get("label_smoothing", 0.0),
        lse_square_scale=options.get("lse_square_scale", 0.0),
        upstream_lse=None if upstream_lse is None else pad(upstream_lse), ignore_index=IGNORE,
    )
    loss = loss.reshape(B, S)[:, :kept]
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / max(int((shifted[:, :kept] != IGNORE).sum()), 1)
    return upstream, upstream_lse, loss, lse.reshape(B, S)[:, :kept], d_hidden.reshape(B, S, D), d_weight, d_bias


def call(framework, impl, extra, hidden, weight, bias, labels, options, reduction, upstream, upstream_lse):
    """(loss, lse or None, d_hidden, d_weight, d_bias or None) as float64 NumPy arrays."""
    kwargs = {k: v for k, v in options.items() if k != "bias"}
    if framework == "torch":
        h = torch.tensor(hidden, dtype=torch.float32, requires_grad=True)
        w = torch.tensor(weight, dtype=torch.float32, requires_grad=True)
        b = torch.tensor(bias, dtype=torch.float32, requires_grad=True) if options.get("bias") else None
        out = torch_heads.linear_cross_entropy(
            h, w, torch.tensor(labels), bias=b, reduction=reduction, impl=impl, **kwargs, **extra
        )
        loss, lse = out if options.get("return_lse") else (out, None)
        total = (loss * torch.tensor(upstream, dtype=torch.float32)).sum() if reduction == "none" else loss
        if lse is not None:
            total = total + (lse * torch.tensor(upstream_lse, dtype=torch.float32)).sum()
        total.backward()
        f64 = lambda x: None if x is None else x.detach().double().numpy()  # noqa: E731
        return f64(loss), f64(lse), f64(h.grad), f64(w.grad), None if b is None else f64(b.grad)

    y = jnp.asarray(labels, jnp.int32)

    def objective(h, w, b):
        out = jax_heads.linear_cross_entropy(
            h, w, y, bias=b, reduction=reduction, impl=impl, **kwargs, **extra
        )
        loss, lse = out if options.get("return_lse") else (out, None)
        total = jnp.sum(loss * jnp.asarray(upstream, jnp.float32)) if reduction == "none" else loss
        if lse is not None:
            total = total + jnp.sum(lse * jnp.asarray(upstream_lse, jnp.float32))
        return total, (loss, lse)

    b = jnp.asarray(bias, jnp.float32) if options.get("bias") else None
    argnums = (0, 1, 2) if b is not None else (0, 1)
    (_, (loss, lse)), grads = jax.jit(jax.value_and_grad(objective, argnums=argnums, has_aux=True))(
        jnp.asarray(hidden, jnp.float32), jnp.asarray(weight, jnp.float32), b
    )
    f64 = lambda x: None if x is None else np.asarray(x, np.float64)  # noqa: E731
    return f64(loss), f64(lse), f64(grads[0]), f64(grads[1]), f64(grads[2]) if b is not None else None


CASES = [
    pytest.param(fw, impl, extra, name, reduction, id=f"{fw}-{impl}-{name}-{reduction}")
    for fw, impl, extra in CPU_IMPLS
    for name in OPTION_SETS
    for reduction in REDUCTIONS
]


@pytest.mark.parametrize("framework, impl, extra, name, reduction", CASES)
def test_option_against_float64_truth(framework, impl, extra, name, reduction):
    options = OPTION_SETS[name]
    hidden, weight, bias, labels = make_problem(seed=zlib.crc32(f"{name}-{reduction}".encode()) % 1000)
    if not supported(framework, impl, options, reduction):
        with pytest.raises(ValueError, match="does not support|cannot run"):
            call(framework, impl, extra, hidden, weight, bias, labels, options, reduction,
                 np.ones((B, S)), np.ones((B, S)))
        return
    rng = np.random.default_rng(7)
    upstream, upstream_lse, *want = truth(hidden, weight, bias, labels, options, reduction, rng)
    got = call(framework, impl, extra, hidden, weight, bias, labels, options, reduction, upstream, upstream_lse)
    for what, g, t in zip(("loss", "lse", "d_hidden", "d_weight", "d_bias"), got, want):
        if what == "lse" and not options.get("return_lse"):
            assert g is None
            continue
        if what == "d_bias" and not options.get("bias"):
            assert g is None
            continue
        assert_close(f"{framework}-{impl}-{name}-{reduction} {what}", g, t, "float32")


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_softcap_changes_a_gemma_like_loss(framework):
    """Logits large enough that soft-capping at 30 changes the loss by more than 1e-3: an
    implementation that ignored the option would fail the comparison above; here the reference of
    each framework is checked against the ground truth at that scale, capped and uncapped."""
    hidden, weight, bias, labels = make_problem(seed=3, scale=12.0)
    rng = np.random.default_rng(0)
    capped = truth(hidden, weight, bias, labels, {"softcap": 30.0}, "mean", rng)[2]
    plain = truth(hidden, weight, bias, labels, {}, "mean", rng)[2]
    assert abs(capped - plain) > 1e-3
    for options, want in (({"softcap": 30.0}, capped), ({}, plain)):
        got = call(framework, "reference", {}, hidden, weight, bias, labels, options, "mean", None, None)[0]
        assert_close(f"{framework} softcap={options}", got, want, "float32")


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"softcap": 0.0}, ValueError, "softcap must be > 0"),
        ({"softcap": float("inf")}, ValueError, "softcap must be finite"),
        ({"softcap": True}, TypeError, "softcap must be a float"),
        ({"label_smoothing": 1.0}, ValueError, r"label_smoothing must be in \[0, 1\)"),
        ({"lse_square_scale": -1e-3}, ValueError, "lse_square_scale must be >= 0"),
        ({"shift": -1}, ValueError, "shift must be >= 0"),
        ({"shift": 1.0}, TypeError, "shift must be a bool or an int"),
        ({"shift": S}, ValueError, "must be smaller than the labels' last dimension"),
        ({"return_lse": 1}, TypeError, "return_lse must be a bool"),
        ({"bias": "wrong-shape"}, ValueError, r"bias must have shape \(V,\)"),
        ({"bias": "wrong-dtype"}, TypeError, "bias dtype"),
    ],
)
def test_bad_options_raise_the_same_error_in_both_frameworks(framework, kwargs, error, match):
    hidden, weight, bias, labels = make_problem(seed=1)
    lib = torch_heads if framework == "torch" else jax_heads
    convert = (lambda x, dt=torch.float32: torch.tensor(x, dtype=dt)) if framework == "torch" else (
        lambda x, dt=jnp.float32: jnp.asarray(x, dt))
    if kwargs.get("bias") == "wrong-shape":
        kwargs = {"bias": convert(bias[:-1])}
    elif kwargs.get("bias") == "wrong-dtype":
        kwargs = {"bias": convert(bias, torch.float64 if framework == "torch" else jnp.int32)}
    with pytest.raises(error, match=match):
        lib.linear_cross_entropy(
            convert(hidden), convert(weight), convert(labels, torch.int64 if framework == "torch" else jnp.int32),
            impl="reference", **kwargs
        )


def test_cce_refuses_what_it_lacks_by_name():
    """On CPU ``cce`` cannot run at all; the option check comes first and names the implementations
    that support the option (so ``impl=None`` never picks an implementation that would ignore it)."""
    reason = torch_heads.functional.REGISTRY.reason
    options = torch_heads.functional.loss_options("cce", label_smoothing=0.1)
    assert "does not support label_smoothing" in reason("cce", torch.zeros(1, 1), options)


@st.composite
def option_values(draw) -> dict:
    """Random option values, each present or not: bias, a cap from tight to loose, smoothing, z-loss, shift, lse."""
    options = {}
    if draw(st.booleans()):
        options["bias"] = True
    if draw(st.booleans()):
        options["softcap"] = draw(st.floats(0.5, 50.0))
    if draw(st.booleans()):
        options["label_smoothing"] = draw(st.floats(0.0, 0.9))
    if draw(st.booleans()):
        options["lse_square_scale"] = draw(st.floats(0.0, 0.1))
    if draw(st.booleans()):
        options["return_lse"] = True
    options["shift"] = draw(st.integers(0, 2))
    return options


@pytest.mark.parametrize("framework, impl, extra", [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in CPU_IMPLS])
@settings(max_examples=max(3, settings.default.max_examples // 2))
@given(options=option_values(), reduction=st.sampled_from(REDUCTIONS), seed=st.integers(0, 2**16))
def test_random_option_values_against_float64_truth(framework, impl, extra, options, reduction, seed):
    """Property: any combination of option values, each implementation that supports it, against the truth."""
    if not supported(framework, impl, options, reduction):
        return
    hidden, weight, bias, labels = make_problem(seed)
    upstream, upstream_lse, *want = truth(hidden, weight, bias, labels, options, reduction, np.random.default_rng(seed))
    got = call(framework, impl, extra, hidden, weight, bias, labels, options, reduction, upstream, upstream_lse)
    for what, g, t in zip(("loss", "lse", "d_hidden", "d_weight", "d_bias"), got, want):
        if g is not None:
            assert_close(f"{framework}-{impl} {options} {reduction} {what}", g, t, "float32")
