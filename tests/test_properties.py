"""Property tests: random small problems, every CPU implementation of both frameworks against the
float64 ground truth, through the loss and both gradients (``heads_common/tolerances.py``).

Hypothesis draws the leading shape (one or two dimensions, ``N = 0`` included), ``V`` and ``D``
from 1, the input dtype, the label dtype, the ignored fraction (none, some, all), the reduction
and the scale of the hidden states (near-uniform to peaked softmax). Half-precision results are
judged relative to the materialised same-dtype computation, as everywhere in the suite. Errors are
taken relative to the magnitude of the terms of each result (``ground_truth.lce_condition_scales``)
rather than to the result itself: random problems include near-certain tokens, whose loss is a tiny
difference of two large logits and has no meaningful relative error in float32.

Run time follows the Hypothesis profile (``tests/conftest.py``): ``HYPOTHESIS_PROFILE=ci`` (the
default; few examples, the same every run) or ``dev`` (many, random). The JAX cases compile once
per drawn shape and the Pallas kernel runs in interpret mode, so they draw fewer examples.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import jax
import numpy as np
import pytest
from ground_truth import lce_condition_scales, lce_ground_truth, upstream_for
from hypothesis import given, settings
from hypothesis import strategies as st
from lce_runners import IGNORE, rounded, run

from heads_common.tolerances import assert_close

REDUCTIONS = ("none", "sum", "mean")
HALF = ("bfloat16", "float16")
BASE_EXAMPLES = settings.default.max_examples


@dataclass(frozen=True)
class Problem:
    lead: tuple[int, ...]
    d: int
    v: int
    dtype: str
    label_dtype: str
    ignored: str  # "none", "some" or "all"
    reduction: str
    scale: float
    seed: int


@st.composite
def problems(draw, dtypes: tuple[str, ...], label_dtypes: tuple[str, ...]) -> Problem:
    lead = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=2)))
    if draw(st.integers(0, 9)) == 0:  # now and then no tokens at all (N = 0)
        lead = (0, *lead[1:])
    return Problem(
        lead=lead,
        d=draw(st.integers(1, 9)),
        v=draw(st.integers(1, 40)),
        dtype=draw(st.sampled_from(dtypes)),
        label_dtype=draw(st.sampled_from(label_dtypes)),
        ignored=draw(st.sampled_from(["none", "some", "all"])),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        scale=draw(st.sampled_from([0.1, 1.0, 4.0])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def check_against_truth(framework: str, impl: str, p: Problem) -> None:
    rng = np.random.default_rng(p.seed)
    hidden = rng.standard_normal((*p.lead, p.d)) * p.scale
    weight = rng.standard_normal((p.v, p.d)) / np.sqrt(p.d)
    labels = rng.integers(0, p.v, p.lead)
    ignored = {"none": np.zeros(p.lead, bool), "some": rng.random(p.lead) < 0.3, "all": np.ones(p.lead, bool)}
    labels[ignored[p.ignored]] = IGNORE
    if p.reduction == "none":  # float32-representable, as the loss's dtype rounds it
        upstream = rng.standard_normal(p.lead).astype(np.float32).astype(np.float64)
    else:
        upstream = upstream_for(p.lead, p.reduction, labels, rng).reshape(p.lead)

    flat = (rounded(framework, hidden, p.dtype).reshape(-1, p.d), rounded(framework, weight, p.dtype),
            labels.reshape(-1))
    loss, d_hidden, d_weight = lce_ground_truth(*flat, upstream.reshape(-1))
    loss_scale, d_hidden_scale, d_weight_scale = lce_condition_scales(*flat, upstream.reshape(-1))
    if p.reduction != "none":  # the upstream of "sum" is 1 and of "mean" 1 / (counted tokens)
        loss = np.sum(loss * upstream.reshape(-1))
        loss_scale = np.sum(loss_scale * upstream.reshape(-1))
    shapes = (p.lead if p.reduction == "none" else (), hidden.shape, weight.shape)
    truths = [x.reshape(shape) for x, shape in zip((loss, d_hidden, d_weight), shapes)]
    scales = [x.reshape(shape) for x, shape in zip((loss_scale, d_hidden_scale, d_weight_scale), shapes)]

    kwargs = {"reduction": p.reduction, "dtype": p.dtype, "label_dtype": p.label_dtype}
    results = run(framework, impl, hidden, weight, labels, upstream, **kwargs)
    naive = run(framework, "naive", hidden, weight, labels, upstream, **kwargs) if p.dtype in HALF else (None,) * 3
    for name, value, truth, baseline, scale in zip(("loss", "d_hidden", "d_weight"), results, truths, naive, scales):
        # Random problems include near-certain tokens (a tiny loss from two large logits), so errors
        # are relative to the magnitude of the terms (see heads_common/tolerances.py).
        assert_close(name, value, truth, p.dtype, naive=baseline, scale=scale)


@pytest.mark.parametrize("impl", ["chunked", "reference"])
@settings(max_examples=3 * BASE_EXAMPLES)
@given(p=problems(("float32", "float64", "bfloat16", "float16"), ("int64", "int32", "int16", "int8")))
def test_torch_matches_ground_truth(impl, p):
    check_against_truth("torch", impl, p)


# float64 exists in JAX only in 64-bit mode (the jax.enable_x64 context).
JAX_DTYPES = ("float32", "bfloat16", "float16") + (("float64",) if hasattr(jax, "enable_x64") else ())


@pytest.mark.parametrize("impl", ["chunked", "reference"])
@settings(max_examples=BASE_EXAMPLES)
@given(p=problems(JAX_DTYPES, ("int32", "int16", "int8")))
def test_jax_matches_ground_truth(impl, p):
    with jax.enable_x64(True) if p.dtype == "float64" else contextlib.nullcontext():
        check_against_truth("jax", impl, p)


@settings(max_examples=max(4, BASE_EXAMPLES // 2))
@given(p=problems(("float32", "bfloat16", "float16"), ("int32", "int8")))
def test_jax_pallas_interpret_matches_ground_truth(p):
    check_against_truth("jax", "pallas", p)
