"""CUDA paths of ``torch_heads``: ``cce`` (cut-cross-entropy, exact mode) and ``chunked`` against the float64 truth.

Every test is marked ``gpu``; ``tests/conftest.py`` skips them where CUDA is unavailable. Run on the GPU
machine with ``python -m pytest -m gpu tests/test_torch_cce.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    REDUCTIONS,
    check_against_truth,
    make_inputs,
    naive,
    rng_for,
    to_np,
    truth_for,
)

from heads_common.tolerances import assert_close
from torch_heads import SplitLanguageModellingHead, linear_cross_entropy, select_implementation

pytestmark = pytest.mark.gpu

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
# cut-cross-entropy's float32 dots run on tf32 matrix units; torch's own CUDA matmuls stay float32 by default.
CCE_TOLERANCE = {"float32": "float32-tf32", "bfloat16": "bfloat16", "float16": "float16"}
# Unaligned shapes: a flat (N,) batch and a (B, S) batch.
SHAPES = {"252x123x507": ((252,), 123, 507), "4x63x123x1027": ((4, 63), 123, 1027)}


def _cases(dtypes, impl):
    return [
        pytest.param(shape, dtype, reduction, id=f"{shape}-{dtype}-{impl}-{reduction}")
        for shape in SHAPES
        for dtype in dtypes
        for reduction in REDUCTIONS
    ]


@pytest.mark.parametrize("shape, dtype, reduction", _cases(CCE_TOLERANCE, "cce"))
def test_cce_exact_matches_ground_truth(request, shape, dtype, reduction):
    lead, d, v = SHAPES[shape]
    rng = rng_for(request.node.callspec.id)
    hidden, weight, labels = make_inputs(rng, lead, d, v, DTYPES[dtype], device="cuda")

    def fn(h, w, y):
        return linear_cross_entropy(h, w, y, reduction=reduction, impl="cce", filter_eps=None)

    loss, d_hidden, d_weight = check_against_truth(fn, hidden, weight, labels, reduction, CCE_TOLERANCE[dtype], rng)
    assert loss.dtype == torch.float32 and loss.shape == (labels.shape if reduction == "none" else ())
    assert d_hidden.dtype == d_weight.dtype == DTYPES[dtype]


@pytest.mark.parametrize("shape, dtype, reduction", _cases(["float32", "bfloat16", "float64"], "chunked"))
def test_chunked_on_cuda_matches_ground_truth(request, shape, dtype, reduction):
    lead, d, v = SHAPES[shape]
    rng = rng_for(request.node.callspec.id)
    hidden, weight, labels = make_inputs(rng, lead, d, v, DTYPES[dtype], device="cuda")

    def fn(h, w, y):
        return linear_cross_entropy(h, w, y, reduction=reduction, impl="chunked")

    check_against_truth(fn, hidden, weight, labels, reduction, dtype, rng)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cce_default_filter_keeps_the_loss_exact(dtype):
    """The default gradient filter only approximates gradients: the forward is the exact loss."""
    rng = rng_for(f"cce-default-filter-{dtype}")
    hidden, weight, labels = make_inputs(rng, (4, 63), 123, 1027, DTYPES[dtype], device="cuda")
    loss = linear_cross_entropy(hidden, weight, labels, impl="cce")
    truth = truth_for(hidden, weight, labels, np.ones(labels.numel()), "none")[0]
    assert_close("loss", to_np(loss), truth, CCE_TOLERANCE[dtype], naive=to_np(naive(hidden, weight, labels, "none")))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_cce_non_contiguous_upstream_gradient(dtype, layout):
    """CCE 25.1.1 calls ``grad_out.view(-1)``: a transposed or a stride-0 upstream gradient must still work."""
    rng = rng_for(f"cce-upstream-{dtype}-{layout}")
    hidden, weight, labels = make_inputs(rng, (5, 61), 64, 509, DTYPES[dtype], device="cuda")
    scale = torch.from_numpy(rng.standard_normal((61, 5))).float().cuda()
    upstream = scale.t() if layout == "transposed" else torch.ones(5, 61, device="cuda")

    def run(fn):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss = fn(h, w, labels)
        if layout == "transposed":
            (loss.t() * scale).sum().backward()
        else:
            loss.sum().backward()
        return loss.detach(), h.grad, w.grad

    results = run(lambda h, w, y: linear_cross_entropy(h, w, y, impl="cce", filter_eps=None))
    baseline = run(lambda h, w, y: naive(h, w, y, "none")) if dtype == "bfloat16" else (None,) * 3
    truths = truth_for(hidden, weight, labels, to_np(upstream).reshape(-1), "none")
    for name, value, truth, base in zip(("loss", "d_hidden", "d_weight"), results, truths, baseline, strict=True):
        assert_close(name, to_np(value), truth, CCE_TOLERANCE[dtype], naive=to_np(base))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("lead", [(37,), (3, 11)], ids=["flat", "batched"])
def test_cce_all_labels_ignored(lead, reduction):
    hidden, weight, labels = make_inputs(
        rng_for(f"cce-ignored-{lead}-{reduction}"), lead, 64, 300, torch.bfloat16, ignored_fraction=1.0, device="cuda"
    )
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)
    loss = linear_cross_entropy(h, w, labels, reduction=reduction, impl="cce", filter_eps=None)
    loss.backward(torch.randn_like(loss) if reduction == "none" else None)
    assert loss.shape == (lead if reduction == "none" else ())
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("dtype, expected", [("bfloat16", "cce"), ("float16", "cce"), ("float64", "chunked")])
def test_auto_selection_on_cuda(dtype, expected):
    hidden = torch.zeros(2, 8, dtype=DTYPES[dtype], device="cuda")
    assert select_implementation(hidden, None) == expected
    assert select_implementation(hidden, None, filter_eps=None) == expected


def test_auto_selection_float32_on_cuda_trains():
    """Whatever ``impl=None`` picks for float32 CUDA inputs must give the loss and both gradients."""
    rng = rng_for("auto-float32-cuda")
    hidden, weight, labels = make_inputs(rng, (4, 63), 123, 1027, torch.float32, device="cuda")
    chosen = select_implementation(hidden, None, filter_eps=None)

    def fn(h, w, y):
        return linear_cross_entropy(h, w, y, filter_eps=None)

    check_against_truth(
        fn, hidden, weight, labels, "none", CCE_TOLERANCE["float32"] if chosen == "cce" else "float32", rng
    )


def test_filter_threshold_needs_cce():
    hidden = torch.zeros(2, 8, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match="no linear_cross_entropy implementation"):
        select_implementation(hidden, None, filter_eps=1e-3)
    with pytest.raises(ValueError, match="impl='cce' cannot run"):
        select_implementation(hidden, "cce")


def test_lm_head_exact_on_cuda():
    """The split LM head in bf16 on CUDA with ``filter_eps=None`` picks ``cce``: exact loss and gradients."""
    vocab = {"text": 1021, "special": 3}
    head = SplitLanguageModellingHead(vocab, ["text", "special"], 96, filter_eps=None).to("cuda", torch.bfloat16)
    rng = rng_for("lm-head-cuda")
    hidden, _, labels = make_inputs(rng, (3, 41), 96, 1024, torch.bfloat16, device="cuda")
    labels[:, ::5] = 1022  # a special token
    assert head.implementation_for(hidden) == "cce"

    upstream = torch.from_numpy(rng.standard_normal((3, 41))).float().cuda()
    h = hidden.clone().requires_grad_(True)
    loss = head(h, labels)
    loss.backward(upstream)
    weight = head.weight().detach()
    truths = truth_for(hidden, weight, labels, to_np(upstream).reshape(-1), "none")

    naive_h = hidden.clone().requires_grad_(True)
    naive_w = weight.clone().requires_grad_(True)
    naive_loss = naive(naive_h, naive_w, labels, "none")
    naive_loss.backward(upstream)
    d_weight = torch.cat([head.lm_head["text"].weight.grad, head.lm_head["special"].weight.grad])
    results = (loss, h.grad, d_weight)
    baseline = (naive_loss, naive_h.grad, naive_w.grad)
    for name, value, truth, base in zip(("loss", "d_hidden", "d_weight"), results, truths, baseline, strict=True):
        assert_close(name, to_np(value), truth, "bfloat16", naive=to_np(base))


_OUT_OF_RANGE_SCRIPT = """
import sys, torch
from torch_heads import SplitTokenEmbeddings, linear_cross_entropy
what, value = sys.argv[1], int(sys.argv[2])
ids = torch.zeros(2, 8, dtype=torch.long, device="cuda")
ids[1, 3] = value
if what == "labels":
    hidden = torch.randn(2, 8, 16, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(50, 16, device="cuda", dtype=torch.bfloat16)
    linear_cross_entropy(hidden, weight, ids, impl="cce", filter_eps=None)
else:
    SplitTokenEmbeddings({"text": 45, "special": 5}, ["text", "special"], 16).cuda()(ids)
torch.cuda.synchronize()
print("synchronized")
"""


@pytest.mark.parametrize(
    "what, value, fails",
    [
        ("labels", 49, False),
        ("labels", 50, True),
        ("labels", -1, True),
        ("input_ids", 49, False),
        ("input_ids", 50, True),
    ],
    ids=["labels-49", "labels-50", "labels-minus-1", "input-ids-49", "input-ids-50"],
)
def test_out_of_range_on_cuda_is_a_device_assert(what, value, fails):
    """On CUDA, ids outside [0, 50) trip ``torch._assert_async``; a subprocess keeps this process's context usable."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", _OUT_OF_RANGE_SCRIPT, what, str(value)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if fails:
        assert result.returncode != 0 and "synchronized" not in result.stdout, result.stdout + result.stderr
    else:
        assert result.returncode == 0 and "synchronized" in result.stdout, result.stderr
