"""The gradient-in-forward path of the reductions ``"sum"``/``"mean"`` (``jax_heads/pallas/gradient_in_forward.py``).

On CPU the kernels run in Pallas interpret mode with 16-wide tiles and a logits budget of a few rows,
so that the tiny ragged shapes have several token chunks (the last one ragged), vocabulary splits and
a ragged last vocabulary tile. Checked against the float64 truth with every loss option: loss,
``d_hidden``, ``d_weight``, ``d_bias``; the routing of ``impl="pallas"`` in both frameworks; the
forward without differentiation; the upstream scalar. The ``gpu`` tests run the realistic shapes:
``python -m pytest -m gpu tests/test_gradient_in_forward.py``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from ground_truth import lce_options_ground_truth

import jax_heads
import torch_heads
from heads_common.tolerances import assert_close
from jax_heads.pallas import (
    BlockSizes,
    GradientInForwardConfig,
    MosaicForwardConfig,
    gradient_in_forward_grads,
    gradient_in_forward_loss,
)
from jax_heads.pallas.gradient_in_forward import chunk_rows_for
from jax_heads.reference import loss_terms, transform_logits
from torch_heads import _pallas

IGNORE = -100
N, D, V = 37, 24, 101  # ragged everywhere against the 16-wide tiles


def tiny(rows: int = 16, itemsize: int = 4) -> BlockSizes:
    """16-wide tiles, a logits budget of ``rows`` rows of V, two vocabulary splits or more."""
    gif = GradientInForwardConfig(logits_budget_bytes=rows * V * itemsize, block_n=16, block_v=16, min_programs=8)
    return BlockSizes(gradient_in_forward=gif, sm_count=2)


OPTIONS = {
    "plain": {},
    "bias": {"bias": True},
    "softcap": {"softcap": 2.5},
    "smoothing": {"label_smoothing": 0.15},
    "zloss": {"lse_square_scale": 0.05},
    "all": {"bias": True, "softcap": 2.5, "label_smoothing": 0.15, "lse_square_scale": 0.05},
}


def problem(seed: int, n: int = N, ignored: float = 0.2):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((n, D)) * 1.5
    weight = rng.standard_normal((V, D)) / np.sqrt(D) * 2.0
    bias = rng.standard_normal(V) * 0.5
    labels = rng.integers(0, V, n)
    labels[rng.random(n) < ignored] = IGNORE
    return hidden, weight, bias, labels


def truth(hidden, weight, bias, labels, options, reduction, upstream_scalar):
    count = max(int((labels != IGNORE).sum()), 1)
    per_token = np.full(len(labels), upstream_scalar / (count if reduction == "mean" else 1))
    loss, _, d_hidden, d_weight, d_bias = lce_options_ground_truth(
        hidden, weight, labels, per_token, bias=bias if options.get("bias") else None, softcap=options.get("softcap"),
        label_smoothing=options.get("label_smoothing", 0.0), lse_square_scale=options.get("lse_square_scale", 0.0),
    )
    return np.sum(loss * per_token), d_hidden, d_weight, (d_bias if options.get("bias") else None)


def naive(h, w, b, y, options, reduction, upstream_scalar):
    """Materialised logits in the input dtype (the half-precision baseline), the rest in float32."""
    kwargs = {k: v for k, v in options.items() if k != "bias"}

    def loss_fn(h, w, b):
        logits = transform_logits((h @ w.T).astype(jnp.float32), b, kwargs.get("softcap"))
        valid = y != IGNORE
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, jnp.where(valid, y, 0)[:, None], axis=1)[:, 0]
        eps = kwargs.get("label_smoothing", 0.0)
        loss = loss_terms(lse, target, jnp.sum(logits, -1), w.shape[0], eps, kwargs.get("lse_square_scale", 0.0))
        total = jnp.sum(jnp.where(valid, loss, 0.0))
        scale = 1.0 if reduction == "sum" else jnp.maximum(jnp.sum(valid), 1)
        return total / scale * upstream_scalar

    return jax.value_and_grad(loss_fn, (0, 1, 2))(h, w, b)


def run_jax(h, w, b, y, options, reduction, upstream_scalar, config):
    kwargs = {k: v for k, v in options.items() if k != "bias"}

    def f(h, w, b):
        return gradient_in_forward_loss(h, w, y, IGNORE, reduction, bias=b, interpret=True, config=config,
                                        **kwargs) * upstream_scalar

    value, grads = jax.jit(jax.value_and_grad(f, (0, 1, 2) if b is not None else (0, 1)))(h, w, b)
    return value, grads[0], grads[1], (grads[2] if b is not None else None)


def check(got, want, base, dtype, name):
    for what, g, t, n in zip(("loss", "d_hidden", "d_weight", "d_bias"), got, want, base):
        if t is None:
            assert g is None
            continue
        naive_value = None if n is None else np.asarray(n, np.float64)
        assert_close(f"{name} {what}", np.asarray(g, np.float64), t, dtype, naive=naive_value)


CASES = [
    pytest.param(dtype, option, reduction, id=f"{N}x{D}x{V}-{dtype}-{option}-{reduction}")
    for dtype in ("float32", "bfloat16")
    for option in OPTIONS
    for reduction in ("sum", "mean")
    if dtype == "float32" or option in ("plain", "all")
]


@pytest.mark.parametrize("dtype, option, reduction", CASES)
def test_matches_float64_truth(dtype, option, reduction):
    options = OPTIONS[option]
    hidden, weight, bias, labels = problem(seed=len(option) + 3 * len(reduction))
    jdt = jnp.dtype(dtype)
    h, w = jnp.asarray(hidden, jdt), jnp.asarray(weight, jdt)
    b = jnp.asarray(bias, jdt) if options.get("bias") else None
    y = jnp.asarray(labels, jnp.int32)
    config = tiny(itemsize=jdt.itemsize)
    assert chunk_rows_for(N, V, jdt, config.gradient_in_forward) == 16  # 3 chunks of 16 rows, the last ragged
    got = run_jax(h, w, b, y, options, reduction, -2.5, config)
    assert got[1].dtype == jdt and got[2].dtype == jdt
    f64 = lambda x: None if x is None else np.asarray(x, np.float64)  # noqa: E731
    want = truth(f64(h), f64(w), f64(b), labels, options, reduction, -2.5)
    base = [None] * 4
    if dtype != "float32":
        value, grads = naive(h, w, b, y, options, reduction, -2.5)
        base = [value, *grads] if b is not None else [value, grads[0], grads[1], None]
    check(got, want, base, dtype, f"{dtype}-{option}-{reduction}")


def test_all_ignored_and_empty_give_zeros():
    hidden, weight, bias, labels = problem(seed=1, ignored=1.0)
    h, w, b, y = (jnp.asarray(x, jnp.float32) for x in (hidden, weight, bias, labels))
    y = y.astype(jnp.int32)
    for hh, yy in ((h, y), (h[:0], y[:0])):
        value, grads = jax.value_and_grad(
            lambda p, q, r, yy=yy: gradient_in_forward_loss(p, q, yy, IGNORE, "mean", bias=r, interpret=True,
                                                            config=tiny()), (0, 1, 2))(hh, w, b)
        assert float(value) == 0.0 and not any(np.any(np.asarray(g)) for g in grads)


def test_only_counted_rows_are_multiplied_in_every_partial_chunk_size():
    """One compiled program, the count of counted tokens varied (it is dynamic): none, fewer than one
    step, each partial size, whole chunks only, whole chunks and a partial one, all. 48-row chunks and
    partial sizes 16, 32 and 48; the ignored rows are spread (the stable partition puts the counted ones
    first, in order) and their ``d_hidden`` rows stay 0."""
    n = 150
    hidden, weight, bias, _ = problem(seed=21, n=n)
    config = BlockSizes(gradient_in_forward=dataclasses.replace(tiny(48).gradient_in_forward, tail_steps=3),
                        sm_count=2)
    h, w, b = (jnp.asarray(x, jnp.float32) for x in (hidden, weight, bias))
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    grad = jax.jit(jax.value_and_grad(lambda p, q, r, y: gradient_in_forward_loss(
        p, q, y, IGNORE, "sum", bias=r, softcap=2.5, interpret=True, config=config), (0, 1, 2)))
    rng = np.random.default_rng(5)
    for counted in (0, 7, 16, 33, 48, 96, 101, 144, 150):
        labels = np.full(n, IGNORE)
        labels[np.sort(rng.choice(n, counted, replace=False))] = rng.integers(0, V, counted)
        value, (dh, dw, db) = grad(h, w, b, jnp.asarray(labels, jnp.int32))
        want = truth(f64(h), f64(w), f64(b), labels, {"bias": True, "softcap": 2.5}, "sum", 1.0)
        check((value, dh, dw, db), want, [None] * 4, "float32", f"{counted} counted")
        assert not np.any(np.asarray(dh)[labels == IGNORE])


def test_non_finite_hidden_at_an_ignored_token_keeps_its_row_zero():
    """As on the exact path: loss 0 and a zero d_hidden row there, the other rows finite (d_weight is
    NaN: 0·NaN in Gᵀ·H, docs/robustness.md)."""
    hidden, weight, _, labels = problem(seed=2)
    labels[3] = IGNORE
    hidden[3, 0] = np.nan
    h, w, y = jnp.asarray(hidden, jnp.float32), jnp.asarray(weight, jnp.float32), jnp.asarray(labels, jnp.int32)
    value, (dh, _) = jax.value_and_grad(
        lambda p, q: gradient_in_forward_loss(p, q, y, IGNORE, "sum", interpret=True, config=tiny()), (0, 1))(h, w)
    assert np.isfinite(float(value))
    assert not np.any(np.asarray(dh[3])) and np.isfinite(np.asarray(dh)).all()


def lowered(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_impl_pallas_routes_sum_and_mean_here():
    hidden, weight, _, labels = problem(seed=4)
    h, w, y = jnp.asarray(hidden, jnp.float32), jnp.asarray(weight, jnp.float32), jnp.asarray(labels, jnp.int32)

    def grad_text(**kwargs):
        def f(a, b):
            out = jax_heads.linear_cross_entropy(a, b, y, impl="pallas", interpret=True, **kwargs)
            return jnp.sum(out[0] if isinstance(out, tuple) else out)

        return str(jax.make_jaxpr(jax.grad(f, (0, 1)))(h, w))

    for reduction in ("sum", "mean"):
        assert "lce_gif_grads" in grad_text(reduction=reduction)
    assert "lce_gif" not in grad_text(reduction="none")
    assert "lce_gif" not in grad_text(reduction="mean", return_lse=True)
    assert "lce_gif" not in grad_text(reduction="mean", filter_eps=0.01)
    # the public entry gives the direct call's value
    direct = gradient_in_forward_loss(h, w, y, IGNORE, "mean", interpret=True)
    public = jax_heads.linear_cross_entropy(h, w, y, impl="pallas", interpret=True, reduction="mean")
    np.testing.assert_allclose(float(public), float(direct), rtol=1e-6)


def test_forward_without_differentiation_does_no_gradient_work():
    hidden, weight, _, labels = problem(seed=5)
    h, w, y = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(weight, jnp.bfloat16), jnp.asarray(labels, jnp.int32)
    text = str(jax.make_jaxpr(lambda a, b: gradient_in_forward_loss(a, b, y, IGNORE, "sum", interpret=True))(h, w))
    assert "lce_gif" not in text and "lce_forward" in text


def test_one_dot_and_add_per_chunk_and_no_float32_weight_buffer():
    """Each chunk step holds the three products (logits, d_hidden, d_weight) — one step per size of the
    partial chunk, one in the loop over whole chunks —, the weight gradient is accumulated in bfloat16
    (no float32 (V, D) array in the forward that forms the gradients; the backward's scaling by an
    upstream other than 1 is one elementwise float32 multiply)."""
    hidden, weight, _, labels = problem(seed=6, n=150)  # chunks of 16, or 48 rows with a budget of 48
    h, w, y = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(weight, jnp.bfloat16), jnp.asarray(labels, jnp.int32)
    for rows, steps, sizes in ((16, 8, 1), (48, 3, 3), (48, 2, 2)):
        config = BlockSizes(gradient_in_forward=dataclasses.replace(
            tiny(rows, itemsize=2).gradient_in_forward, tail_steps=steps), sm_count=2)
        text = lowered(lambda a, b, c=config: gradient_in_forward_grads(a, b, y, IGNORE, "mean", interpret=True,
                                                                        config=c), h, w)
        assert text.count("stablehlo.dot_general") == 3 * (sizes + 1), (rows, steps)
    assert f"tensor<{V}x{D}xf32>" not in text and f"tensor<{V}x{D}xbf16>" in text


@pytest.mark.parametrize("options", [{}, {"bias": True, "softcap": 30.0, "label_smoothing": 0.1,
                                      "lse_square_scale": 1e-4}], ids=["plain", "all"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kernels_lower_for_cuda(dtype, options):
    """Both kernels lower to Triton (``jax.export`` for CUDA, no GPU needed) with a ragged last vocabulary
    tile (masked loads and stores) and every option; differentiation runs them and not the exact forward."""
    from jax import export

    disabled = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    h, w, y = jnp.zeros((300, 200), dtype), jnp.zeros((1000, 200), dtype), jnp.zeros((300,), jnp.int32)
    b = jnp.zeros((1000,), dtype) if options.get("bias") else None
    kwargs = {k: v for k, v in options.items() if k != "bias"}

    def f(h, w, b):
        return jax.value_and_grad(lambda p, q, r: gradient_in_forward_loss(p, q, y, IGNORE, "mean", bias=r, **kwargs),
                                  (0, 1, 2) if b is not None else (0, 1))(h, w, b)

    module = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=disabled)(h, w, b).mlir_module()
    # 80-row chunks, partial ones of 16 … 80 rows: 6 chunk steps of two kernels
    assert module.count("__gpu$xla.gpu.triton") == 2 * 6


@pytest.mark.parametrize("option", ["plain", "all"])
def test_mosaic_logits_lower_for_cuda(option):
    """``logits_kernel="mosaic"``: the Mosaic forward with its logits store replaces the XLA product and the
    statistics kernel (one Triton kernel left, the gradient logits); ragged N, D and V against its tiles."""
    from jax import export

    disabled = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
                export.DisabledSafetyCheck.custom_call("mosaic_gpu")]
    options = OPTIONS[option]
    h, w, y = jnp.zeros((300, 200), jnp.bfloat16), jnp.zeros((1000, 200), jnp.bfloat16), jnp.zeros((300,), jnp.int32)
    b = jnp.zeros((1000,), jnp.bfloat16) if options.get("bias") else None
    kwargs = {k: v for k, v in options.items() if k != "bias"}
    config = BlockSizes(gradient_in_forward=GradientInForwardConfig(logits_kernel="mosaic"))

    def f(h, w, b):
        return gradient_in_forward_grads(h, w, y, IGNORE, "mean", bias=b, config=config, **kwargs)

    module = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=disabled)(h, w, b).mlir_module()
    # chunks of one 128-row Mosaic block: the partial-chunk step and the loop's, one Triton kernel each
    assert module.count("__gpu$xla.gpu.triton") == 2 and "mosaic_gpu" in module
    assert module.count("stablehlo.dot_general") == 4  # d_hidden and d_weight only


@pytest.mark.parametrize("option", ["plain", "softcap-smoothing-zloss"])
def test_interpret_mosaic_logits_match_float64_truth(option):
    """``logits_kernel="mosaic"`` in interpret mode (no bias there): N 37 → one chunk of 128 rows, D 24 → 64,
    V 101 → 128 (2 tiles of 64 in one split, one D step: the interpreter's limits): G is 0 in the padding
    and the gradients come back unpadded."""
    options = {} if option == "plain" else {"softcap": 2.5, "label_smoothing": 0.15, "lse_square_scale": 0.05}
    hidden, weight, _, labels = problem(seed=13)
    h, w, y = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(weight, jnp.bfloat16), jnp.asarray(labels, jnp.int32)
    mosaic = MosaicForwardConfig(block_n=128, block_v=64, block_k=64, max_concurrent_steps=2, min_programs=1)
    config = BlockSizes(gradient_in_forward=GradientInForwardConfig(logits_kernel="mosaic"), mosaic=mosaic)
    for reduction in ("sum", "mean"):
        got = run_jax(h, w, None, y, options, reduction, -2.5, config)
        assert got[1].shape == (N, D) and got[2].shape == (V, D)
        f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
        want = truth(f64(h), f64(w), None, labels, options, reduction, -2.5)
        value, grads = naive(h, w, None, y, options, reduction, -2.5)
        check(got, want, [value, grads[0], grads[1], None], "bfloat16", f"mosaic-{option}-{reduction}")


def test_logits_kernel_choice():
    from jax_heads.pallas.gif_mosaic import logits_kernel_for

    with pytest.raises(ValueError, match="GradientInForwardConfig.logits_kernel must be one of"):
        GradientInForwardConfig(logits_kernel="cublas")
    mosaic = BlockSizes(gradient_in_forward=GradientInForwardConfig(logits_kernel="mosaic"))
    assert logits_kernel_for(jnp.bfloat16, mosaic, interpret=False, has_bias=True) == "mosaic"
    assert logits_kernel_for(jnp.bfloat16, BlockSizes(), interpret=True, has_bias=False) == "xla"
    with pytest.raises(ValueError, match="logits_kernel='mosaic' cannot run on these inputs: it takes bfloat16"):
        logits_kernel_for(jnp.float32, mosaic, interpret=False, has_bias=False)
    with pytest.raises(ValueError, match="logits_kernel='mosaic' cannot run on these inputs: the bias path"):
        logits_kernel_for(jnp.bfloat16, mosaic, interpret=True, has_bias=True)


def test_second_derivative_is_refused():
    hidden, weight, _, labels = problem(seed=7, n=8)
    h, w, y = jnp.asarray(hidden, jnp.float32), jnp.asarray(weight, jnp.float32), jnp.asarray(labels, jnp.int32)
    first = jax.grad(lambda a: gradient_in_forward_loss(a, w, y, IGNORE, "sum", interpret=True))
    with pytest.raises(NotImplementedError, match="differentiated once only"):
        jax.grad(lambda a: jnp.sum(first(a) ** 2))(h)


def test_chunk_rows_and_config_validation():
    default = GradientInForwardConfig()
    for v, rows in ((256000, 1648), (128256, 2048)):  # Gemma-2 (5 chunks) and Llama-3 (min_chunks: 4) heads, bf16
        assert chunk_rows_for(8192, v, jnp.bfloat16, default) == rows
        assert rows * v * 2 <= default.logits_budget_bytes
    assert chunk_rows_for(5, 101, jnp.float32, default) == 16
    assert chunk_rows_for(8192, 101, jnp.bfloat16, default) == 2048  # the budget takes all: min_chunks splits in 4
    assert chunk_rows_for(8192, 101, jnp.bfloat16, GradientInForwardConfig(min_chunks=1)) == 8192
    assert chunk_rows_for(37, 101, jnp.bfloat16, default) == 16  # 3 chunks: as many as 16-row blocks allow
    assert chunk_rows_for(10**6, 2**30, jnp.float32, default) == 16  # at least one block of rows
    with pytest.raises(ValueError, match="GradientInForwardConfig.logits_budget_bytes must be a positive int"):
        GradientInForwardConfig(logits_budget_bytes=0)
    with pytest.raises(ValueError, match="GradientInForwardConfig.min_chunks must be a positive int"):
        GradientInForwardConfig(min_chunks=0)
    with pytest.raises(ValueError, match="GradientInForwardConfig.block_v must be a power of two"):
        GradientInForwardConfig(block_v=100)
    with pytest.raises(ValueError, match="BlockSizes.gradient_in_forward must be a GradientInForwardConfig"):
        BlockSizes(gradient_in_forward=None)


# ------------------------------------------------------------------------------------------
# torch impl="pallas"
# ------------------------------------------------------------------------------------------


def torch_run(hidden, weight, bias, labels, options, reduction, dtype, upstream_scalar=1.0):
    kwargs = {k: v for k, v in options.items() if k != "bias"}
    h = torch.tensor(hidden, dtype=dtype, requires_grad=True)
    w = torch.tensor(weight, dtype=dtype, requires_grad=True)
    b = torch.tensor(bias, dtype=dtype, requires_grad=True) if options.get("bias") else None
    loss = _pallas.pallas_reduced_loss(h, w, torch.tensor(labels), IGNORE, reduction, bias=b, interpret=True,
                                       config=tiny(), **kwargs)
    (loss * upstream_scalar).backward()
    f64 = lambda x: None if x is None else x.detach().double().numpy()  # noqa: E731
    return f64(loss) * upstream_scalar, f64(h.grad), f64(w.grad), f64(None if b is None else b.grad)


@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_torch_matches_float64_truth(option, reduction):
    options = OPTIONS[option]
    hidden, weight, bias, labels = problem(seed=8)
    f32 = lambda x: np.asarray(x, np.float32).astype(np.float64)  # noqa: E731
    got = torch_run(hidden, weight, bias, labels, options, reduction, torch.float32, upstream_scalar=3.0)
    want = truth(f32(hidden), f32(weight), f32(bias), labels, options, reduction, 3.0)
    check(got, want, [None] * 4, "float32", f"torch-{option}-{reduction}")


def test_torch_without_grad_runs_the_forward_only(monkeypatch):
    hidden, weight, _, labels = problem(seed=9)
    calls = []
    monkeypatch.setattr(_pallas, "_gradient_in_forward_program", lambda *a: calls.append(a))
    h, w = torch.tensor(hidden, dtype=torch.float32), torch.tensor(weight, dtype=torch.float32)
    with torch.no_grad():
        loss = _pallas.pallas_reduced_loss(h, w, torch.tensor(labels), IGNORE, "mean", interpret=True)
    want = truth(hidden, weight, None, labels, {}, "mean", 1.0)[0]
    assert not calls and abs(float(loss) - want) <= 1e-5 * abs(want)


def test_torch_second_backward_through_the_graph_is_refused():
    hidden, weight, _, labels = problem(seed=10)
    h = torch.tensor(hidden, dtype=torch.float32, requires_grad=True)
    loss = _pallas.pallas_reduced_loss(h, torch.tensor(weight, dtype=torch.float32), torch.tensor(labels), IGNORE,
                                       "sum", interpret=True, config=tiny())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("reduction, extra, routed", [
    ("sum", {}, True), ("mean", {}, True), ("none", {}, False), ("mean", {"return_lse": True}, False),
    ("mean", {"filter_eps": 0.01}, False),
])
def test_torch_pallas_routes_sum_and_mean_here(monkeypatch, reduction, extra, routed):
    """The torch registry's Pallas record calls the gradient-in-forward entry for sum/mean only (the
    public ``impl="pallas"`` refuses CPU tensors, so the record is called directly)."""
    calls = []
    monkeypatch.setattr(_pallas, "pallas_reduced_loss", lambda *a, **k: calls.append("gif") or torch.zeros(()))
    monkeypatch.setattr(_pallas, "pallas_loss", lambda *a, **k: calls.append("exact") or (
        (torch.zeros(4), torch.zeros(4)) if k.get("return_lse") else torch.zeros(4)))
    options = torch_heads.functional.loss_options("pallas", reduction=reduction, **extra)
    torch_heads.functional.REGISTRY["pallas"].loss(torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4, dtype=int),
                                                   options)
    assert calls == (["gif"] if routed else ["exact"])


# ------------------------------------------------------------------------------------------
# GPU: realistic shapes
# ------------------------------------------------------------------------------------------

HEADS = {"gemma2": (8192, 2304, 256000), "llama3": (8192, 4096, 128256)}


@pytest.mark.gpu
@pytest.mark.parametrize("head", list(HEADS))
def test_gpu_temporary_memory_within_one_gib(head):
    """The compiled forward+backward's temporary buffers (beyond inputs and gradients) at the benchmark heads."""
    n, d, v = HEADS[head]
    h = jax.ShapeDtypeStruct((n, d), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((v, d), jnp.bfloat16)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)
    program = jax.jit(jax.value_and_grad(
        lambda a, b, c: jax_heads.linear_cross_entropy(a, b, c, reduction="mean"), (0, 1)))
    temp = program.lower(h, w, y).compile().memory_analysis().temp_size_in_bytes
    assert "lce_gif_grads" in program.lower(h, w, y).as_text()
    assert temp <= 2**30, f"{temp / 2**20:.0f} MiB of temporaries"


@pytest.mark.gpu
@pytest.mark.parametrize("head", list(HEADS))
def test_gpu_matches_float32_truth_at_the_benchmark_heads(head):
    """bfloat16 at the full heads (N·V > 2³¹ at Gemma-2): against the float32 chunked implementation on
    the upcast inputs, within the bfloat16 bound over the naive materialised bfloat16 computation."""
    n, d, v = HEADS[head]
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((n, d), np.float32), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((v, d), np.float32) / np.sqrt(d) * 2.0, jnp.bfloat16)
    labels = rng.integers(0, v, n)
    labels[rng.random(n) < 0.1] = IGNORE
    y = jnp.asarray(labels, jnp.int32)

    def run(impl, a, b):
        return jax.jit(jax.value_and_grad(
            lambda p, q: jax_heads.linear_cross_entropy(p, q, y, reduction="mean", impl=impl), (0, 1)))(a, b)

    value, (dh, dw) = run("pallas", h, w)
    want_value, (want_dh, want_dw) = run("chunked", h.astype(jnp.float32), w.astype(jnp.float32))
    base_value, (base_dh, base_dw, _) = naive(h, w, None, y, {}, "mean", 1.0)
    for name, g, t, b in (("loss", value, want_value, base_value), ("d_hidden", dh, want_dh, base_dh),
                          ("d_weight", dw, want_dw, base_dw)):
        assert_close(f"{head} {name}", np.asarray(g, np.float64), np.asarray(t, np.float64), "bfloat16",
                     naive=np.asarray(b, np.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gpu_mosaic_logits_match_xla_and_float64(option, reduction):
    """``logits_kernel="mosaic"`` against ``"xla"`` and the float64 truth, ragged N, V (and chunks) against the
    Mosaic tiles: 5 chunks of 512 rows, the last mostly padding."""
    n, d, v = 2085, 2304, 32005
    options = OPTIONS[option]
    rng = np.random.default_rng(11)
    hidden = rng.standard_normal((n, d))
    weight = rng.standard_normal((v, d)) / np.sqrt(d) * 2.0
    bias = rng.standard_normal(v) * 0.5 if options.get("bias") else None
    labels = rng.integers(0, v, n)
    labels[rng.random(n) < 0.2] = IGNORE
    labels[5] = v - 1  # the last real column
    h, w, y = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(weight, jnp.bfloat16), jnp.asarray(labels, jnp.int32)
    b = None if bias is None else jnp.asarray(bias, jnp.bfloat16)
    kwargs = {k: x for k, x in options.items() if k != "bias"}

    def run(kernel):
        gif = GradientInForwardConfig(logits_kernel=kernel, logits_budget_bytes=512 * v * 2)
        config = BlockSizes(gradient_in_forward=gif)
        f = jax.jit(lambda p, q, r: gradient_in_forward_grads(p, q, y, IGNORE, reduction, bias=r, config=config,
                                                               **kwargs))
        text = f.lower(h, w, b).as_text()
        assert ("lce_gif_stats" in text) == (kernel == "xla")
        return f(h, w, b)

    got, xla = run("mosaic"), run("xla")
    f64 = lambda x: None if x is None else np.asarray(x, np.float64)  # noqa: E731
    want = truth(f64(h), f64(w), f64(b), labels, options, reduction, 1.0)
    value, grads = naive(h, w, b, y, options, reduction, 1.0)
    base = [value, *grads] if b is not None else [value, grads[0], grads[1], None]
    check(got, want, base, "bfloat16", f"mosaic-{option}-{reduction}")
    check(xla, want, base, "bfloat16", f"xla-{option}-{reduction}")
