"""``torch_heads.linear_cross_entropy`` on CPU: every implementation against the float64 ground truth.

Loss and both gradients are checked through ``heads_common/tolerances.py``: float32/float64 against a fixed
bound, float16/bfloat16 relative to the naive computation in the same dtype (materialised logits).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ground_truth import lce_ground_truth
from helpers import (
    IGNORE,
    REDUCTIONS,
    check_against_truth,
    loss_and_grads,
    make_inputs,
    naive,
    rng_for,
    to_np,
    truth_for,
)

from heads_common.tolerances import assert_close
from torch_heads import linear_cross_entropy, select_implementation
from torch_heads.chunked import chunk_rows_for, chunked_loss

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMPLS = ("chunked", "reference")
# name -> (leading shape of hidden, D, V); all unaligned, the last two include V = 50257 + 1 special.
SHAPES = {
    "1x1x1": ((1,), 1, 1),
    "7x3x5": ((7,), 3, 5),
    "252x123x507": ((252,), 123, 507),
    "64x32x50258": ((64,), 32, 50258),
    "3x37x48x301": ((3, 37), 48, 301),
}


def _cases():
    return [
        pytest.param(shape, dtype, impl, reduction, id=f"{shape}-{dtype}-{impl}-{reduction}")
        for shape in SHAPES
        for dtype in DTYPES
        for impl in IMPLS
        for reduction in REDUCTIONS
    ]


@pytest.mark.parametrize("shape, dtype, impl, reduction", _cases())
def test_matches_ground_truth(request, shape, dtype, impl, reduction):
    lead, d, v = SHAPES[shape]
    rng = rng_for(request.node.callspec.id)
    hidden, weight, labels = make_inputs(rng, lead, d, v, DTYPES[dtype])

    def fn(h, w, y):
        return linear_cross_entropy(h, w, y, reduction=reduction, impl=impl)

    loss, d_hidden, d_weight = check_against_truth(fn, hidden, weight, labels, reduction, dtype, rng)

    assert loss.shape == (labels.shape if reduction == "none" else ())
    assert loss.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    assert d_hidden.dtype == d_weight.dtype == DTYPES[dtype]
    if reduction == "none":
        assert torch.all(loss[labels == IGNORE] == 0)
        assert torch.all(d_hidden[labels == IGNORE] == 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_labels_ignored(dtype, impl, reduction):
    rng = rng_for(f"all-ignored-{dtype}-{impl}-{reduction}")
    hidden, weight, labels = make_inputs(rng, (4, 9), 16, 37, DTYPES[dtype], ignored_fraction=1.0)
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)
    loss = linear_cross_entropy(h, w, labels, reduction=reduction, impl=impl)
    upstream = torch.randn(loss.shape) if reduction == "none" else None
    loss.backward(upstream)
    assert loss.shape == (labels.shape if reduction == "none" else ())
    assert torch.equal(loss, torch.zeros_like(loss))  # no NaN, and mean over no tokens is 0
    assert torch.equal(h.grad, torch.zeros_like(h))
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("rows_per_chunk", [1, 10, 251], ids=lambda r: f"{r}rows")
def test_chunked_tiny_budget(rows_per_chunk):
    """Many chunks with a ragged last one: 252 tokens in chunks of 1, 10 (last 2) or 251 (last 1)."""
    rng = rng_for(f"tiny-budget-{rows_per_chunk}")
    hidden, weight, labels = make_inputs(rng, (252,), 123, 507, torch.float32)
    budget = rows_per_chunk * 507 * 4
    assert chunk_rows_for(507, 4, budget) == rows_per_chunk

    def fn(h, w, y):
        return chunked_loss(h, w, y, IGNORE, chunk_budget_bytes=budget)

    check_against_truth(fn, hidden, weight, labels, "none", "float32", rng)


def test_chunk_budget_below_one_row():
    """A budget smaller than one row of logits still makes progress, one row at a time."""
    assert chunk_rows_for(50258, 4, 1000) == 1
    rng = rng_for("budget-below-one-row")
    hidden, weight, labels = make_inputs(rng, (5,), 8, 50258, torch.float32)

    def fn(h, w, y):
        return chunked_loss(h, w, y, IGNORE, chunk_budget_bytes=1000)

    check_against_truth(fn, hidden, weight, labels, "none", "float32", rng)


def _strided(hidden: torch.Tensor) -> torch.Tensor:
    """The values of a ``(B, S, D)`` tensor as a view of ``(D, S, 2B)`` storage: permuted and stride 2."""
    b, s, d = hidden.shape
    storage = hidden.new_zeros(d, s, 2 * b)
    storage[..., ::2] = hidden.permute(2, 1, 0)
    return storage[..., ::2].permute(2, 1, 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_inputs(impl):
    """Hidden as a permuted, stride-2 view and labels as the transpose of a (S, B) tensor."""
    rng = rng_for(f"non-contiguous-inputs-{impl}")
    hidden, weight, labels = make_inputs(rng, (6, 11), 24, 97, torch.float32)
    strided_labels = labels.t().contiguous().t()
    assert not _strided(hidden).is_contiguous() and not strided_labels.is_contiguous()
    assert torch.equal(_strided(hidden), hidden) and torch.equal(strided_labels, labels)

    def fn(h, w, y):
        return linear_cross_entropy(_strided(h), w, strided_labels, impl=impl)

    check_against_truth(fn, hidden, weight, labels, "none", "float32", rng)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_non_contiguous_upstream_gradient(impl, layout):
    """The (B, S) loss used through ``.t()`` times a random tensor, or through ``.sum()`` (a stride-0 gradient)."""
    rng = rng_for(f"non-contiguous-upstream-{impl}-{layout}")
    hidden, weight, labels = make_inputs(rng, (5, 13), 32, 211, torch.float32)
    scale = torch.from_numpy(rng.standard_normal((13, 5))).float()
    upstream = scale.t() if layout == "transposed" else torch.ones(5, 13)
    truth = truth_for(hidden, weight, labels, upstream.double().reshape(-1).numpy(), "none")

    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = linear_cross_entropy(h, w, labels, impl=impl)
    if layout == "transposed":
        (loss.t() * scale).sum().backward()
    else:
        loss.sum().backward()
    for name, value, expected in zip(
        ("loss", "d_hidden", "d_weight"), (loss.detach(), h.grad, w.grad), truth, strict=True
    ):
        assert_close(name, to_np(value), expected, "float32")


def test_custom_ignore_index():
    """``ignore_index`` may be any int, even a valid class id: those labels then contribute nothing."""
    rng = rng_for("custom-ignore-index")
    hidden, weight, labels = make_inputs(rng, (40,), 16, 23, torch.float32, ignored_fraction=0.0)
    labels[::4] = 3
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    upstream = rng.standard_normal(40).astype(np.float32).astype(np.float64)
    loss = linear_cross_entropy(h, w, labels, ignore_index=3)
    loss.backward(torch.from_numpy(upstream).float())
    truth = lce_ground_truth(hidden.double().numpy(), weight.double().numpy(), labels.numpy(), upstream, ignore_index=3)
    for name, value, expected in zip(
        ("loss", "d_hidden", "d_weight"), (loss.detach(), h.grad, w.grad), truth, strict=True
    ):
        assert_close(name, to_np(value), expected, "float32")
    assert torch.all(loss[labels == 3] == 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_auto_selects_chunked_on_cpu(dtype):
    hidden, weight, labels = make_inputs(rng_for(f"auto-{dtype}"), (9,), 8, 31, DTYPES[dtype])
    assert select_implementation(hidden, None) == "chunked"
    assert select_implementation(hidden, None, filter_eps=None) == "chunked"
    assert torch.equal(
        linear_cross_entropy(hidden, weight, labels), linear_cross_entropy(hidden, weight, labels, impl="chunked")
    )


# --- the tolerance check itself can fail -------------------------------------------------------


def _truth_and_naive_bf16():
    """bf16 inputs with 10-30% ignored labels, a random upstream gradient, the truth and the naive baseline."""
    rng = rng_for("tolerance-can-fail")
    hidden, weight, labels = make_inputs(rng, (252,), 123, 507, torch.bfloat16)
    upstream = rng.standard_normal(252).astype(np.float32).astype(np.float64)
    truth = truth_for(hidden, weight, labels, upstream, "none")
    base = loss_and_grads(lambda h, w, y: naive(h, w, y, "none"), hidden, weight, labels, upstream, "none")
    return hidden, weight, labels, upstream, truth, [to_np(t) for t in base]


def test_tolerance_rejects_one_wrong_row_float32():
    rng = rng_for("tolerance-one-row-float32")
    hidden, weight, labels = make_inputs(rng, (252,), 123, 507, torch.float32)
    truth_loss = truth_for(hidden, weight, labels, np.ones(252), "none")[0]
    loss = linear_cross_entropy(hidden, weight, labels).double().numpy()
    assert_close("loss", loss, truth_loss, "float32")
    row = int(np.flatnonzero(labels.numpy() != IGNORE)[0])
    loss[row] *= 1 + 1e-3
    with pytest.raises(AssertionError, match="loss: relative error"):
        assert_close("loss", loss, truth_loss, "float32")


def test_tolerance_rejects_dropped_ignore_mask_bfloat16():
    """Treating ignored labels as class 0 moves loss and gradients far beyond the bf16 baseline."""
    hidden, weight, labels, upstream, truth, base = _truth_and_naive_bf16()
    unmasked = torch.where(labels == IGNORE, 0, labels)

    def fn(h, w, y):
        return linear_cross_entropy(h, w, unmasked, impl="reference")

    results = loss_and_grads(fn, hidden, weight, labels, upstream, "none")
    for name, value, expected, naive_value in zip(("loss", "d_hidden", "d_weight"), results, truth, base, strict=True):
        with pytest.raises(AssertionError, match=f"{name}: relative error"):
            assert_close(name, to_np(value), expected, "bfloat16", naive=naive_value)


def test_tolerance_rejects_one_dropped_row_bfloat16():
    """One valid token of 252 treated as ignored is caught in the loss and in both gradients."""
    hidden, weight, labels, upstream, truth, base = _truth_and_naive_bf16()
    wrong = labels.clone()
    wrong[int(np.flatnonzero(labels.numpy() != IGNORE)[0])] = IGNORE

    def fn(h, w, y):
        return linear_cross_entropy(h, w, wrong, impl="chunked")

    results = loss_and_grads(fn, hidden, weight, labels, upstream, "none")
    for name, value, expected, naive_value in zip(("loss", "d_hidden", "d_weight"), results, truth, base, strict=True):
        with pytest.raises(AssertionError, match=f"{name}: relative error"):
            assert_close(name, to_np(value), expected, "bfloat16", naive=naive_value)


def test_tolerance_baseline_relative_needs_naive():
    with pytest.raises(ValueError, match="naive"):
        assert_close("loss", np.ones(3), np.ones(3), "bfloat16")


# --- validation --------------------------------------------------------------------------------


def _valid():
    return torch.randn(4, 6, 8), torch.randn(11, 8), torch.randint(0, 11, (4, 6))


def _with(**changes):
    hidden, weight, labels = _valid()
    args = {"hidden": hidden, "weight": weight, "labels": labels}
    args.update({k: v for k, v in changes.items() if k in args})
    kwargs = {k: v for k, v in changes.items() if k not in args}
    return args, kwargs


def _labels_with(value):
    labels = _valid()[2]
    labels[2, 3] = value
    return labels


def _unsigned_labels_with(dtype, value):
    """Valid labels of an unsigned ``dtype`` holding ``value`` (as given, possibly beyond int64) at (2, 3)."""
    labels = _valid()[2].to(dtype)
    labels[2, 3] = torch.tensor([value], dtype=dtype)[0]
    return labels


BAD_INPUTS = [
    pytest.param({"hidden": np.zeros((4, 6, 8))}, TypeError, "hidden must be a torch.Tensor", id="hidden-numpy"),
    pytest.param({"weight": [[0.0] * 8] * 11}, TypeError, "weight must be a torch.Tensor", id="weight-list"),
    pytest.param({"labels": 3}, TypeError, "labels must be a torch.Tensor", id="labels-int"),
    pytest.param(
        {"hidden": torch.ones(4, 6, 8, dtype=torch.int32)}, TypeError, "hidden must be a floating", id="hidden-int"
    ),
    pytest.param({"weight": torch.randn(11, 8, dtype=torch.float64)}, TypeError, "weight dtype", id="weight-dtype"),
    pytest.param({"labels": torch.zeros(4, 6)}, TypeError, "labels must be an integer", id="labels-float"),
    pytest.param(
        {"labels": torch.zeros(4, 6, dtype=torch.bool)}, TypeError, "labels must be an integer", id="labels-bool"
    ),
    pytest.param(
        {"labels": torch.zeros(4, 5, dtype=torch.long)}, ValueError, "labels must have shape", id="labels-shape"
    ),
    pytest.param({"labels": torch.zeros(24, dtype=torch.long)}, ValueError, "labels must have shape", id="labels-flat"),
    pytest.param({"weight": torch.randn(11, 7)}, ValueError, "hidden size mismatch", id="hidden-size"),
    pytest.param({"weight": torch.randn(11, 8, 1)}, ValueError, r"weight must have shape \(V, D\)", id="weight-3d"),
    pytest.param({"weight": torch.randn(8)}, ValueError, r"weight must have shape \(V, D\)", id="weight-1d"),
    pytest.param(
        {"labels": _labels_with(11)},
        ValueError,
        r"labels must be in \[0, 11\).*found 11 at index \(2, 3\)",
        id="label-eq-V",
    ),
    pytest.param({"labels": _labels_with(1000)}, ValueError, "found 1000 at", id="label-above-V"),
    pytest.param({"labels": _labels_with(-1)}, ValueError, "labels must be in .*found -1 at", id="label-minus-1"),
    pytest.param({"labels": _labels_with(-101)}, ValueError, "found -101 at", id="label-minus-101"),
    pytest.param(  # int64 would wrap it onto the ignore index -100
        {"labels": _unsigned_labels_with(torch.uint64, 2**64 - 100)},
        ValueError,
        r"labels must be in \[0, 11\).*found 18446744073709551516 at index \(2, 3\)",
        id="label-uint64-2**64-100",
    ),
    pytest.param(
        {"labels": _unsigned_labels_with(torch.uint64, 2**63)}, ValueError, "found 9223372036854775808 at",
        id="label-uint64-2**63",
    ),
    pytest.param(
        {"labels": _unsigned_labels_with(torch.uint32, 2**32 - 1)}, ValueError, "found 4294967295 at",
        id="label-uint32-max",
    ),
    pytest.param(
        {"labels": _unsigned_labels_with(torch.uint16, 2**16 - 100)}, ValueError, "found 65436 at",
        id="label-uint16-2**16-100",
    ),
    pytest.param(
        {"labels": torch.zeros(4, 6, dtype=torch.complex64)}, TypeError, "labels must be an integer tensor, got "
        "torch.complex64", id="labels-complex",
    ),
    pytest.param({"hidden": torch.tensor(1.0)}, ValueError, "hidden must have at least one dimension", id="hidden-0d"),
    pytest.param({"reduction": "avg"}, ValueError, "reduction must be one of", id="reduction-unknown"),
    pytest.param({"reduction": None}, ValueError, "reduction must be one of", id="reduction-none-object"),
    pytest.param({"impl": "triton"}, ValueError, "impl must be None or one of", id="impl-unknown"),
    pytest.param({"impl": "cce"}, ValueError, "impl='cce' cannot run.*needs CUDA", id="impl-cce-cpu"),
    pytest.param(
        {"impl": "chunked", "filter_eps": 1e-3}, ValueError, "impl='chunked'.*filter_eps", id="filter-chunked"
    ),
    pytest.param(
        {"impl": "reference", "filter_eps": 1e-3}, ValueError, "impl='reference'.*filter_eps", id="filter-reference"
    ),
    pytest.param(
        {"filter_eps": 1e-3}, ValueError, "no linear_cross_entropy implementation.*filter_eps", id="filter-auto-cpu"
    ),
    pytest.param({"filter_eps": "fast"}, TypeError, "filter_eps", id="filter-str"),
    pytest.param({"filter_eps": True}, TypeError, "filter_eps", id="filter-bool"),
    pytest.param({"filter_eps": 0.0}, ValueError, r"filter_eps must be in \(0, 1\)", id="filter-zero"),
    pytest.param({"filter_eps": 1.0}, ValueError, r"filter_eps must be in \(0, 1\)", id="filter-one"),
    pytest.param({"filter_eps": -0.5}, ValueError, r"filter_eps must be in \(0, 1\)", id="filter-negative"),
    pytest.param({"filter_eps": float("nan")}, ValueError, r"filter_eps must be in \(0, 1\)", id="filter-nan"),
    pytest.param({"ignore_index": 1.5}, TypeError, "ignore_index must be an int", id="ignore-index-float"),
]


@pytest.mark.parametrize("changes, error, match", BAD_INPUTS)
def test_bad_inputs_raise(changes, error, match):
    args, kwargs = _with(**changes)
    with pytest.raises(error, match=match):
        linear_cross_entropy(args["hidden"], args["weight"], args["labels"], **kwargs)


def test_valid_inputs_pass():
    """The unmodified inputs of ``BAD_INPUTS`` are accepted (each bad case differs by one argument)."""
    hidden, weight, labels = _valid()
    labels[0, 0] = IGNORE
    assert linear_cross_entropy(hidden, weight, labels, filter_eps=None).shape == (4, 6)
    assert linear_cross_entropy(hidden, weight, labels.int(), impl="reference").shape == (4, 6)


@pytest.mark.parametrize("dtype", [torch.uint64, torch.uint32, torch.uint16], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_unsigned_labels_in_range_equal_int64(dtype, impl):
    """Unsigned labels in range (no ignore index: an unsigned label cannot be -100) give the int64 result."""
    hidden, weight, labels = _valid()
    labels[1, 2] = 10  # the last class
    expected = linear_cross_entropy(hidden, weight, labels, impl=impl)
    assert torch.equal(linear_cross_entropy(hidden, weight, labels.to(dtype), impl=impl), expected)


# --- higher order and torch.func ------------------------------------------------------------------


def _second_order(loss_fn, hidden, weight, labels, rng):
    """The gradients w.r.t. (hidden, weight) of a function of the first gradients, and those gradients.

    The per-token loss is weighted by ``tanh(hidden.sum(-1))``, so the upstream gradient depends on
    ``hidden`` too (the second derivative then flows through it); the second objective is
    ``sum(d_hidden**2) + sum(r * d_weight)``.
    """
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    r = torch.from_numpy(rng.standard_normal(weight.shape)).to(weight.dtype)
    loss = (loss_fn(h, w, labels) * torch.tanh(h.sum(-1))).sum()
    d_hidden, d_weight = torch.autograd.grad(loss, (h, w), create_graph=True)
    second = torch.autograd.grad((d_hidden**2).sum() + (r * d_weight).sum(), (h, w))
    return (d_hidden.detach(), d_weight.detach()), second


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("rows_per_chunk", [None, 7], ids=["default-chunks", "7rows"])
def test_chunked_second_order_matches_reference(dtype, rows_per_chunk):
    """Differentiating the ``chunked`` gradients (``create_graph=True``) gives the float64 reference's
    plain-autograd second derivatives, across chunk boundaries and with ignored labels."""
    rng = rng_for(f"second-order-{dtype}-{rows_per_chunk}")
    hidden, weight, labels = make_inputs(rng, (3, 37), 48, 301, DTYPES[dtype])
    budget = {} if rows_per_chunk is None else {"chunk_budget_bytes": rows_per_chunk * 301 * 4}

    def chunked(h, w, y):
        return chunked_loss(h.reshape(-1, h.shape[-1]), w, y.reshape(-1), IGNORE, **budget).reshape(y.shape)

    def reference(h, w, y):
        return linear_cross_entropy(h, w, y, impl="reference")

    first, second = _second_order(chunked, hidden, weight, labels, rng_for("r"))
    truth_first, truth_second = _second_order(reference, hidden.double(), weight.double(), labels, rng_for("r"))
    for name, value, truth in zip(("d_hidden", "d_weight", "dd_hidden", "dd_weight"), first + second,
                                  truth_first + truth_second, strict=True):
        assert value.dtype == DTYPES[dtype]
        assert_close(name, to_np(value), to_np(truth), dtype)


def test_chunked_gradgradcheck():
    """``torch.autograd.gradgradcheck`` (float64, finite differences of the gradients, with random
    upstream gradients that are differentiated too) on 2-row chunks with ignored labels."""
    rng = rng_for("gradgradcheck")
    hidden, weight, labels = make_inputs(rng, (5,), 4, 7, torch.float64, ignored_fraction=0.4)

    def fn(h, w):
        return chunked_loss(h, w, labels, IGNORE, chunk_budget_bytes=2 * 7 * 8)

    args = (hidden.requires_grad_(True), weight.requires_grad_(True))
    assert torch.autograd.gradcheck(fn, args) and torch.autograd.gradgradcheck(fn, args)


def test_third_order_is_refused_by_chunked_only():
    hidden, weight, labels = make_inputs(rng_for("third-order"), (6,), 5, 9, torch.float64)

    def third(impl):
        h = hidden.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(linear_cross_entropy(h, weight, labels, impl=impl).sum(), h, create_graph=True)
        (gg,) = torch.autograd.grad((g**2).sum(), h, create_graph=True)
        return torch.autograd.grad(gg.sum(), h)[0]

    assert torch.isfinite(third("reference")).all()
    with pytest.raises(RuntimeError, match=r"third-order derivatives.*impl='reference'.*supports any order"):
        third("chunked")


def test_torch_func_grad_and_vmap_over_the_default_path():
    """``torch.func.grad``, ``vmap`` (over hidden and labels), per-sample gradients (``vmap(grad)``, also
    of an empty batch) and ``grad(grad)`` through the default (chunked) path equal the same computations
    done one by one."""
    rng = rng_for("torch-func")
    hidden, weight, labels = make_inputs(rng, (4, 9), 16, 37, torch.float64)
    assert select_implementation(hidden, None) == "chunked"

    def loss(h, w, y):
        return linear_cross_entropy(h, w, y, reduction="mean")

    d_hidden, d_weight = torch.func.grad(loss, argnums=(0, 1))(hidden, weight, labels)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss(h, w, labels).backward()
    assert torch.equal(d_hidden, h.grad) and torch.equal(d_weight, w.grad)

    per_sample = torch.func.vmap(loss, in_dims=(0, None, 0))(hidden, weight, labels)
    assert torch.equal(per_sample, torch.stack([loss(hidden[b], weight, labels[b]) for b in range(4)]))

    per_sample_grad = torch.func.vmap(torch.func.grad(loss, argnums=1), in_dims=(0, None, 0))
    expected = [torch.autograd.grad(loss(hidden[b], w, labels[b]), w)[0] for b in range(4)]
    assert torch.equal(per_sample_grad(hidden, weight, labels), torch.stack(expected))
    assert per_sample_grad(hidden[:0], weight, labels[:0]).shape == (0, *weight.shape)  # an empty batch

    def gradient_norm(fn):
        return lambda h: (torch.func.grad(lambda x: fn(x, weight, labels))(h) ** 2).sum()

    reference = torch.func.grad(
        gradient_norm(lambda h, w, y: linear_cross_entropy(h, w, y, reduction="mean", impl="reference"))
    )(hidden)
    assert_close("grad(grad)", to_np(torch.func.grad(gradient_norm(loss))(hidden)), to_np(reference), "float64")


def test_torch_func_vmap_still_checks_labels():
    hidden, weight, labels = make_inputs(rng_for("vmap-labels"), (3, 5), 8, 11, torch.float32)
    labels[1, 2] = 11
    fn = torch.func.vmap(lambda h, y: linear_cross_entropy(h, weight, y))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 11\).*found 11 at index \(1, 2\)"):
        fn(hidden, labels)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside torch.func.jvp
def test_forward_mode_refused_by_chunked_and_exact_in_reference():
    """``torch.func.jvp`` (also ``jacfwd``/``hessian``): ``chunked`` refuses naming ``impl='reference'``;
    the reference's directional derivative equals the gradient's inner product with the direction."""
    hidden, weight, labels = make_inputs(rng_for("jvp"), (6,), 5, 9, torch.float64)
    direction = torch.randn(hidden.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss(impl):
        return lambda h: linear_cross_entropy(h, weight, labels, reduction="sum", impl=impl)

    with pytest.raises(RuntimeError, match=r"forward-mode AD.*impl='reference'"):
        torch.func.jvp(loss("chunked"), (hidden,), (direction,))
    _, tangent = torch.func.jvp(loss("reference"), (hidden,), (direction,))
    h = hidden.clone().requires_grad_(True)
    loss("reference")(h).backward()
    assert_close("jvp", to_np(tangent), to_np((h.grad * direction).sum()), "float64")
    assert torch.func.hessian(loss("reference"))(hidden).shape == (6, 5, 6, 5)
