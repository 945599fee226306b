"""``torch.autocast`` and the torch ops: one rule, every implementation, forward and backward inside and outside.

The rule (``docs/robustness.md``): when autocast is enabled for the inputs' device type, float16,
bfloat16 and float32 ``hidden``/``weight`` are cast to the autocast dtype at the entry, as
``F.linear`` under autocast casts them, and the op then computes with autocast off, in its forward
and its backward. So:

* a result is judged as for inputs of the autocast dtype: against the float64 truth of the values
  the op computes with (the inputs rounded to the autocast dtype), relative to the naive same-dtype
  baseline, ``F.cross_entropy(F.linear(h, w), y)`` under the same autocast (``heads_common/tolerances.py``);
* a backward called inside the autocast block gives exactly what one called outside gives, and a
  forward run outside autocast is not changed by a backward run inside it.

CPU cases run here (bfloat16, and float16 where this torch's CPU autocast supports it); the CUDA
cases (``cce``, ``chunked``, ``pallas``) are marked ``gpu``.
"""

from __future__ import annotations

import contextlib
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ground_truth import lce_ground_truth, upstream_for

import torch_heads
from heads_common.tolerances import assert_close
from torch_heads.parallel import vocab_parallel_linear_cross_entropy

IGNORE = -100
REDUCTIONS = ("none", "sum", "mean")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# (device, impl, extra options): cce with the default filter has approximate gradients by design,
# so its gradients are judged only for agreement inside and outside the autocast block.
CPU_IMPLS = [("cpu", "chunked", {}), ("cpu", "reference", {})]
CUDA_IMPLS = [
    ("cuda", "cce", {"filter_eps": None}),
    ("cuda", "cce", {}),
    ("cuda", "chunked", {}),
    ("cuda", "pallas", {}),
]


def _autocast_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.autocast(device_type, dtype)`` really enables autocast here (torch disables it with a
    warning for a dtype it does not support on that device)."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return True  # the case is skipped as a gpu case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device_type, dtype):
            return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == dtype


def _cases():
    cases = []
    for device, impl, options in CPU_IMPLS + CUDA_IMPLS:
        for dtype in AUTOCAST_DTYPES:
            for reduction in REDUCTIONS:
                name = impl + ("-filtered" if impl == "cce" and "filter_eps" not in options else "")
                marks = [pytest.mark.gpu] if device == "cuda" else []
                cases.append(pytest.param(device, impl, options, dtype, reduction, marks=marks,
                                          id=f"{device}-{name}-{dtype}-{reduction}"))
    return cases


def _inputs(seed, device, lead=(3, 37), d=48, v=301, scale=1.5):
    """float32 hidden ``(*lead, d)`` (logits of order ``scale``), weight ``(v, d)``, int64 labels (20% ignored)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(lead))
    hidden = torch.from_numpy(rng.standard_normal((*lead, d)) * scale).float().to(device)
    weight = torch.from_numpy(rng.standard_normal((v, d)) / np.sqrt(d)).float().to(device)
    labels = rng.integers(0, v, n)
    labels[rng.permutation(n)[: n // 5]] = IGNORE
    return hidden, weight, torch.from_numpy(labels.reshape(lead)).to(device), rng


def _naive(h, w, y, reduction):
    """The baseline: materialised logits through ``F.linear`` (the autocast dtype under autocast)."""
    per_token = F.cross_entropy(F.linear(h, w).flatten(0, -2), y.flatten(), ignore_index=IGNORE, reduction="none")
    per_token = per_token.float().reshape(y.shape)
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total if reduction == "sum" else total / (y != IGNORE).sum().clamp_min(1)


def _backward(loss, upstream):
    if loss.ndim == 0:
        loss.backward()
    else:
        loss.backward(torch.from_numpy(upstream).to(loss.device, loss.dtype).reshape(loss.shape))


def _run(fn, hidden, weight, labels, upstream, dtype, *, forward_in: bool, backward_in: bool):
    """``fn``'s loss and gradients with its forward and its backward each inside or outside ``autocast(dtype)``."""
    device_type = hidden.device.type
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast(device_type, dtype) if forward_in else contextlib.nullcontext():
        loss = fn(h, w, labels)
    with torch.autocast(device_type, dtype) if backward_in else contextlib.nullcontext():
        _backward(loss, upstream)
    return loss.detach(), h.grad, w.grad


def _to_np(t):
    return t.detach().cpu().double().numpy()


def _truth(hidden, weight, labels, upstream, reduction, dtype=None):
    """The float64 truth on ``hidden`` and ``weight`` rounded to ``dtype`` (None: as given)."""
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    y = labels.cpu().reshape(-1).numpy()
    loss, d_hidden, d_weight = lce_ground_truth(
        _to_np(hidden).reshape(-1, hidden.shape[-1]), _to_np(weight), y, upstream
    )
    if reduction != "none":
        loss = loss.sum() / (max(int((y != IGNORE).sum()), 1) if reduction == "mean" else 1)
    return loss.reshape(labels.shape) if reduction == "none" else loss, d_hidden.reshape(hidden.shape), d_weight


def _check_bound(results, baseline, truths, tolerance, gradients=True):
    names = ("loss", "d_hidden", "d_weight")[: 3 if gradients else 1]
    for name, value, base, truth in zip(names, results, baseline, truths):
        assert_close(name, _to_np(value), truth, tolerance, naive=_to_np(base))


@pytest.mark.parametrize("device, impl, options, dtype, reduction", _cases())
def test_autocast_matches_truth_inside_and_outside(request, device, impl, options, dtype, reduction):
    """Under autocast(dtype): within the baseline-relative bound of the truth, with the backward inside or
    outside the block; a backward inside autocast after a forward outside changes nothing."""
    autocast_dtype = AUTOCAST_DTYPES[dtype]
    if not _autocast_supported(device, autocast_dtype):
        pytest.skip(f"this torch's {device} autocast does not support {dtype}")
    hidden, weight, labels, rng = _inputs(zlib.crc32(request.node.callspec.id.encode()), device)
    upstream = upstream_for(labels.shape, reduction, labels.cpu().numpy(), rng).astype(np.float32).astype(np.float64)

    def fn(h, w, y):
        return torch_heads.linear_cross_entropy(h, w, y, reduction=reduction, impl=impl, **options)

    inside = _run(fn, hidden, weight, labels, upstream, autocast_dtype, forward_in=True, backward_in=True)
    outside = _run(fn, hidden, weight, labels, upstream, autocast_dtype, forward_in=True, backward_in=False)
    baseline = _run(lambda h, w, y: _naive(h, w, y, reduction), hidden, weight, labels, upstream, autocast_dtype,
                    forward_in=True, backward_in=False)
    truths = _truth(hidden, weight, labels, upstream, reduction, autocast_dtype)
    exact = not (impl == "cce" and "filter_eps" not in options)
    for results in (inside, outside):
        assert results[0].dtype == torch.float32 and results[1].dtype == results[2].dtype == torch.float32
        _check_bound(results, baseline, truths, dtype, gradients=exact)
    if device == "cpu":
        for a, b in zip(inside, outside):
            assert torch.equal(a, b), "a backward inside autocast differs from one outside"
    # A forward outside autocast is float32 throughout, whatever surrounds its backward.
    plain = _run(fn, hidden, weight, labels, upstream, autocast_dtype, forward_in=False, backward_in=False)
    late = _run(fn, hidden, weight, labels, upstream, autocast_dtype, forward_in=False, backward_in=True)
    if device == "cpu":
        for a, b in zip(plain, late):
            assert torch.equal(a, b), "a backward inside autocast changed a float32 forward's gradients"
    elif exact:
        plain_truths = _truth(hidden, weight, labels, upstream, reduction)
        float32 = "float32-tf32" if impl == "cce" else "float32"
        for results in (plain, late):
            for name, value, truth in zip(("loss", "d_hidden", "d_weight"), results, plain_truths):
                assert_close(name, _to_np(value), truth, float32)


@pytest.mark.parametrize("scale", ["x3", "logits-260"])
@pytest.mark.parametrize("backward_in", [False, True], ids=["backward-outside", "backward-inside"])
@pytest.mark.parametrize("impl", [None, "chunked", "reference"], ids=["default", "chunked", "reference"])
def test_issue_reproduction_cpu_bfloat16_sum(impl, backward_in, scale):
    """The reported case: float32 ``h`` (8x64, times 3) and ``w`` (50x64), ``reduction="sum"`` under
    ``autocast("cpu", bfloat16)``: ``d_hidden`` was 7.6% off (33% with logits near 260) against 0.6%
    for ``F.cross_entropy(F.linear(h, w), y)`` (errors against the float32 values), and a backward
    inside the block raised a dtype error."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(8, 64, generator=g) * 3
    w = torch.randn(50, 64, generator=g)
    y = torch.randint(0, 50, (8,), generator=g)
    if scale == "logits-260":
        h = h * (260 / (h @ w.T).abs().max())
    ones = np.ones(8)

    def fn(hh, ww, yy):
        return torch_heads.linear_cross_entropy(hh, ww, yy, reduction="sum", impl=impl)

    results = _run(fn, h, w, y, ones, torch.bfloat16, forward_in=True, backward_in=backward_in)
    baseline = _run(lambda hh, ww, yy: _naive(hh, ww, yy, "sum"), h, w, y, ones, torch.bfloat16,
                    forward_in=True, backward_in=backward_in)
    _check_bound(results, baseline, _truth(h, w, y, ones, "sum", torch.bfloat16), "bfloat16")


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_mixed_and_float64_inputs_follow_f_linear(impl):
    """Under autocast, inputs are cast as ``F.linear`` casts them: a bfloat16 ``hidden`` with a float32
    ``weight`` runs (each gradient in its input's dtype); a float16 one under bfloat16 autocast becomes
    bfloat16; float64 stays float64. Outside autocast a dtype mismatch is still a TypeError."""
    hidden, weight, labels, _ = _inputs(3, "cpu", lead=(13,), d=24, v=37)
    h16, hb = hidden.half(), hidden.bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        assert F.linear(h16, weight).dtype == torch.bfloat16  # what our entry mirrors

    def run(h, w, autocast):
        h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext():
            loss = torch_heads.linear_cross_entropy(h, w, labels, reduction="sum", impl=impl)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    for h in (hb, h16, hidden):
        both_bf16 = run(h.bfloat16(), weight.bfloat16(), autocast=False)
        loss, d_hidden, d_weight = run(h, weight, autocast=True)
        assert torch.equal(loss, both_bf16[0])
        assert d_hidden.dtype == h.dtype and d_weight.dtype == torch.float32
        assert torch.equal(d_hidden, both_bf16[1].to(h.dtype)) and torch.equal(d_weight, both_bf16[2].float())
    plain64 = run(hidden.double(), weight.double(), autocast=False)
    for a, b in zip(run(hidden.double(), weight.double(), autocast=True), plain64):
        assert a.dtype == torch.float64 and torch.equal(a, b)
    with pytest.raises(TypeError, match="weight dtype torch.float32 must equal hidden dtype torch.bfloat16"):
        torch_heads.linear_cross_entropy(hb, weight, labels)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vocab_parallel_autocast_on_gloo(gloo_world, reduction):
    """The vocabulary-parallel op (one gloo rank holding the whole vocabulary) follows the same rule:
    within the bfloat16 bound, the same inside and outside the block, and a bfloat16 hidden with a
    float32 weight shard runs."""
    hidden, weight, labels, rng = _inputs(11 + REDUCTIONS.index(reduction), "cpu")
    upstream = upstream_for(labels.shape, reduction, labels.numpy(), rng).astype(np.float32).astype(np.float64)

    def fn(h, w, y):
        return vocab_parallel_linear_cross_entropy(
            h, w, y, vocab_start=0, vocab_size=w.shape[0], group=gloo_world, reduction=reduction
        )

    inside = _run(fn, hidden, weight, labels, upstream, torch.bfloat16, forward_in=True, backward_in=True)
    outside = _run(fn, hidden, weight, labels, upstream, torch.bfloat16, forward_in=True, backward_in=False)
    baseline = _run(lambda h, w, y: _naive(h, w, y, reduction), hidden, weight, labels, upstream, torch.bfloat16,
                    forward_in=True, backward_in=False)
    _check_bound(outside, baseline, _truth(hidden, weight, labels, upstream, reduction, torch.bfloat16), "bfloat16")
    for a, b in zip(inside, outside):
        assert torch.equal(a, b)
    mixed = _run(fn, hidden.bfloat16(), weight, labels, upstream, torch.bfloat16, forward_in=True, backward_in=True)
    assert mixed[1].dtype == torch.bfloat16 and mixed[2].dtype == torch.float32
    assert torch.equal(mixed[0], outside[0])
