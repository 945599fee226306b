"""Bad inputs and edge cases, both frameworks side by side, every CPU implementation.

``docs/robustness.md`` is the table of every case, its answer and the test that checks it; this
file holds the cases no other test file covers. Parametrized over ``(framework, impl)``: torch
``chunked``/``reference`` and JAX ``chunked``/``reference``/``pallas`` (Pallas interpret mode,
about a second a call: those cases stay few and tiny).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from ground_truth import lce_ground_truth
from lce_runners import IGNORE, IMPL_PARAMS, as_float64, run, to_framework

import jax_heads
import torch_heads
from heads_common.tolerances import PARITY_FLOAT32, assert_close, rel_err
from interop import to_jax

REDUCTIONS = ("none", "sum", "mean")
FRAMEWORKS = {"torch": torch_heads, "jax": jax_heads}


def inputs(n, d, v, seed, scale=1.0, ignored=()):
    """float32-representable hidden ``(n, d)`` (times ``scale``), weight ``(v, d)``, labels, upstream."""
    rng = np.random.default_rng(seed)
    hidden = (rng.standard_normal((n, d)) * scale).astype(np.float32).astype(np.float64)
    weight = (rng.standard_normal((v, d)) / np.sqrt(d)).astype(np.float32).astype(np.float64)
    labels = rng.integers(0, v, n)
    labels[list(ignored)] = IGNORE
    upstream = rng.standard_normal(n).astype(np.float32).astype(np.float64)
    return hidden, weight, labels, upstream


def head(framework, name, *args):
    """A head of ``framework`` built with torch's constructor arguments (JAX adds ``rngs``)."""
    cls = getattr(FRAMEWORKS[framework], name)
    return cls(*args) if framework == "torch" else cls(*args, rngs=nnx.Rngs(0))


def raised(call) -> tuple[type, str]:
    with pytest.raises((TypeError, ValueError)) as error:
        call()
    return type(error.value), str(error.value)


# --- empty batch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("framework, impl", IMPL_PARAMS)
def test_empty_batch(framework, impl):
    """N = 0 (also as a (2, 0) batch): an empty loss (0 when reduced), zero gradients, no NaN."""
    weight = np.random.default_rng(0).standard_normal((7, 4))
    for lead in ((0,), (2, 0)):
        for reduction in REDUCTIONS:
            loss, d_hidden, d_weight = run(
                framework, impl, np.zeros((*lead, 4)), weight, np.zeros(lead, np.int64), reduction=reduction
            )
            assert loss.shape == (lead if reduction == "none" else ())
            assert np.array_equal(loss, np.zeros_like(loss))
            assert d_hidden.shape == (*lead, 4)
            assert d_weight.shape == (7, 4) and np.array_equal(d_weight, np.zeros((7, 4)))


# --- non-finite and extreme values ---------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("framework, impl", IMPL_PARAMS)
def test_non_finite_hidden_row(framework, impl, value):
    """NaN/inf in one token's hidden state: that token's loss is NaN and the others are exact.

    Row 2 (a counted label) gets ``value`` in one feature; row 4 (an ignored label) holds NaN, as
    padding sometimes does. The other rows' losses and hidden gradients match the float64 truth;
    the weight gradient sums over all rows, so it is not finite (documented, as in torch's own
    ``F.cross_entropy``).
    """
    hidden, weight, labels, upstream = inputs(7, 5, 11, seed=1, ignored=[4, 6])
    bad = hidden.copy()
    bad[2, 1] = value
    bad[4, :] = np.nan
    loss, d_hidden, d_weight = run(framework, impl, bad, weight, labels, upstream)

    assert np.isnan(loss[2]) and loss[4] == 0
    assert np.all(np.isnan(d_hidden[2]))
    assert not np.all(np.isfinite(d_weight))
    keep = [0, 1, 3, 5, 6]
    truth_loss, truth_d_hidden, _ = lce_ground_truth(hidden, weight, labels, upstream)
    assert_close("loss", loss[keep], truth_loss[keep], "float32")
    assert_close("d_hidden", d_hidden[keep], truth_d_hidden[keep], "float32")


@pytest.mark.parametrize("framework, impl", IMPL_PARAMS)
def test_extreme_magnitudes(framework, impl):
    """Hidden states of order 1e4 in float32 (logits of order 1e4; a plain exp overflows above 88):
    a finite loss equal to the float64 truth of the same inputs within the float32 bound, and
    finite gradients as close to it as materialised float32 logits get (see ``float32-extreme``)."""
    hidden, weight, labels, upstream = inputs(9, 6, 13, seed=2, scale=1e4, ignored=[3])
    loss, d_hidden, d_weight = run(framework, impl, hidden, weight, labels, upstream)
    _, naive_d_hidden, naive_d_weight = run(framework, "naive", hidden, weight, labels, upstream)
    truth_loss, truth_d_hidden, truth_d_weight = lce_ground_truth(hidden, weight, labels, upstream)
    assert np.abs(loss).max() > 1e3
    assert_close("loss", loss, truth_loss, "float32")
    assert_close("d_hidden", d_hidden, truth_d_hidden, "float32-extreme", naive=naive_d_hidden)
    assert_close("d_weight", d_weight, truth_d_weight, "float32-extreme", naive=naive_d_weight)


# --- labels under jit ------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["chunked", "reference", "pallas"])
def test_jax_out_of_range_label_under_jit_is_nan_in_loss_and_gradient(impl, monkeypatch):
    """Traced labels cannot raise: an out-of-range label gives NaN loss and NaN gradients at its
    row (never a plausible number); the other rows are exact, and the implementation only ever
    sees labels in ``[0, V)`` or the ignore index (nothing is read out of bounds)."""
    hidden, weight, labels, upstream = inputs(8, 4, 10, seed=3, ignored=[6])
    bad_labels = labels.copy()
    bad_labels[3], bad_labels[5] = 10, -1

    seen = []
    record = jax_heads.functional.REGISTRY[impl]

    def spy(h, w, y, options, **arrays):
        jax.debug.callback(lambda y: seen.append(np.asarray(y)), y)
        return record.loss(h, w, y, options, **arrays)

    monkeypatch.setitem(jax_heads.functional.REGISTRY._by_name, impl, dataclasses.replace(record, loss=spy))

    def objective(h, w, y):
        loss = jax_heads.linear_cross_entropy(h, w, y, impl=impl, interpret=impl == "pallas")
        return jnp.sum(loss * jnp.asarray(upstream, jnp.float32)), loss

    grad = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))
    (total, loss), (d_hidden, d_weight) = grad(
        jnp.asarray(hidden, jnp.float32), jnp.asarray(weight, jnp.float32), jnp.asarray(bad_labels, jnp.int32)
    )
    loss, d_hidden = np.asarray(loss), np.asarray(d_hidden)
    assert np.isnan(total) and np.isnan(loss[[3, 5]]).all()
    assert np.isnan(d_hidden[[3, 5]]).all() and np.isnan(np.asarray(d_weight)).any()
    keep = [0, 1, 2, 4, 6, 7]
    truth_loss, truth_d_hidden, _ = lce_ground_truth(hidden, weight, labels, upstream)
    assert_close("loss", loss[keep], truth_loss[keep], "float32")
    assert_close("d_hidden", d_hidden[keep], truth_d_hidden[keep], "float32")
    assert seen and all(np.all(((y >= 0) & (y < 10)) | (y == IGNORE)) for y in seen)


def test_jax_out_of_range_label_under_jit_with_ignore_index_zero():
    """The in-range stand-in for a bad label is never the ignore index (which would zero its gradient)."""
    hidden, weight, labels, _ = inputs(5, 3, 6, seed=4)
    labels = np.where(labels == 0, 1, labels)
    labels[1] = 6
    weight_j = jnp.asarray(weight, jnp.float32)
    fn = jax.jit(jax.value_and_grad(lambda h, y: jax_heads.linear_cross_entropy(h, weight_j, y, ignore_index=0).sum()))
    total, d_hidden = fn(jnp.asarray(hidden, jnp.float32), jnp.asarray(labels, jnp.int32))
    assert np.isnan(total) and np.isnan(np.asarray(d_hidden)[1]).all()
    assert np.isfinite(np.delete(np.asarray(d_hidden), 1, axis=0)).all()


# --- label and id dtypes -----------------------------------------------------------------------------


@pytest.mark.parametrize("framework, impl", IMPL_PARAMS)
def test_narrow_and_unsigned_label_dtypes_do_not_wrap(framework, impl):
    """uint8 label 156 is not the ignore index -100 (156 = -100 mod 256), and int8 label 50 is inside
    V = 300 (300 wraps to 44 in int8): both are compared as the integers they are."""
    hidden, weight, _, _ = inputs(4, 3, 300, seed=5)
    cases = {"uint8": np.array([156, 50, 255, 0]), "int8": np.array([IGNORE, 50, 127, 0])}
    for label_dtype, labels in cases.items():
        loss, d_hidden, _ = run(framework, impl, hidden, weight, labels, label_dtype=label_dtype)
        truth_loss, truth_d_hidden, _ = lce_ground_truth(hidden, weight, labels, np.ones(4))
        assert_close(f"loss ({label_dtype} labels)", loss, truth_loss, "float32")
        assert_close(f"d_hidden ({label_dtype} labels)", d_hidden, truth_d_hidden, "float32")


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_narrow_and_unsigned_token_ids_do_not_wrap(framework):
    """uint8 id 200 and int8 id 50 are inside V = 300 (300 wraps to 44 in both dtypes)."""
    embeddings = head(framework, "SplitTokenEmbeddings", {"a": 100, "b": 200}, ["a", "b"], 4)
    splits = [embeddings.token_embedding[name] for name in ("a", "b")]
    table = np.concatenate([as_float64(s.weight if framework == "torch" else s.embedding[...]) for s in splits])
    for dtype, ids in (("uint8", [200, 5, 255]), ("int8", [50, 127, 0])):
        out = as_float64(embeddings(to_framework(framework, np.array(ids), dtype)))
        np.testing.assert_array_equal(out, table[ids])


def test_jax_heads_quote_unsigned_labels_and_ids_as_given():
    """A uint32 label or token id past the int32 range (2**32 - 100 would wrap to the ignore index
    -100): the Flax LM head and token embeddings raise quoting 4294967196 eagerly, and give NaN (never
    a loss of 0) under ``nnx.jit``."""
    value = 2**32 - 100
    lm = head("jax", "SplitLanguageModellingHead", {"a": 100, "b": 200}, ["a", "b"], 4)
    embeddings = head("jax", "SplitTokenEmbeddings", {"a": 100, "b": 200}, ["a", "b"], 4)
    ids = jnp.asarray(np.array([[3, value, 250]], np.uint32))
    hidden = jnp.ones((1, 3, 4))
    with pytest.raises(ValueError, match=rf"found {value} at index \(0, 1\)"):
        lm(hidden, ids)
    with pytest.raises(ValueError, match=rf"input_ids must be in \[0, 300\); found {value} at index \(0, 1\)"):
        embeddings(ids)
    loss = np.asarray(nnx.jit(lambda m, h, y: m(h, y))(lm, hidden, ids))
    rows = np.asarray(nnx.jit(lambda m, y: m(y))(embeddings, ids))
    assert np.isnan(loss[0, 1]) and np.isfinite(loss[0, [0, 2]]).all()
    assert np.isnan(rows[0, 1]).all() and np.isfinite(rows[0, [0, 2]]).all()


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_ignore_index_must_fit_the_labels_dtype(framework):
    """An ignore index no label can hold (beyond int64 in torch, beyond int32 in JAX's default mode)
    is a ValueError naming it, not an overflow inside a comparison."""
    hidden, weight, labels, _ = inputs(3, 2, 5, seed=6)
    too_big = 2**63 if framework == "torch" else 2**31
    fn = FRAMEWORKS[framework].linear_cross_entropy
    args = (to_framework(framework, hidden, "float32"), to_framework(framework, weight, "float32"))
    with pytest.raises(ValueError, match=rf"ignore_index={too_big} does not fit the labels' integer dtype int(64|32)"):
        fn(*args, to_framework(framework, labels, "int32"), ignore_index=too_big)


INTEGRAL_IGNORE = {
    "numpy-int64": lambda fw: np.int64(2),
    "numpy-uint8": lambda fw: np.uint8(2),
    "numpy-0d": lambda fw: np.array(2, np.int16),
    "framework-0d": lambda fw: to_framework(fw, np.array(2), "int32"),
}
NOT_INTEGRAL_IGNORE = {
    "bool": lambda fw: True,
    "numpy-bool": lambda fw: np.bool_(True),
    "framework-bool": lambda fw: to_framework(fw, np.array(True), "bool"),
    "float": lambda fw: 2.0,
    "numpy-float": lambda fw: np.float32(2),
    "one-element-1d": lambda fw: to_framework(fw, np.array([2]), "int32"),
    "string": lambda fw: "2",
}


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_ignore_index_accepts_any_integral_scalar(framework):
    """``np.int64(2)``, a 0-d integer array or tensor: the same loss as the int 2; bools and
    anything else are a TypeError with the same text in both frameworks."""
    hidden, weight, _, _ = inputs(6, 4, 5, seed=7)
    labels = np.array([0, 2, 1, 3, 2, 4])
    fn = FRAMEWORKS[framework].linear_cross_entropy
    args = (
        *(to_framework(framework, x, "float32") for x in (hidden, weight)),
        to_framework(framework, labels, "int32"),
    )
    expected = as_float64(fn(*args, ignore_index=2))
    assert expected[1] == expected[4] == 0 and np.all(expected[[0, 2, 3, 5]] > 0)
    for make in INTEGRAL_IGNORE.values():
        np.testing.assert_array_equal(as_float64(fn(*args, ignore_index=make(framework))), expected)
    for make in NOT_INTEGRAL_IGNORE.values():
        value = make(framework)
        assert raised(lambda value=value: fn(*args, ignore_index=value)) == (
            TypeError, f"ignore_index must be an int (or an integer scalar), got {value!r}"
        )


# --- shapes and dtypes -----------------------------------------------------------------------------


def test_hidden_size_zero_is_the_same_error_in_both_frameworks():
    def call(framework):
        fn = FRAMEWORKS[framework].linear_cross_entropy
        hidden, weight = (to_framework(framework, np.zeros(shape), "float32") for shape in ((3, 0), (5, 0)))
        return fn(hidden, weight, to_framework(framework, np.zeros(3), "int32"))

    message = "hidden must have a hidden size D >= 1 in its last dimension, got shape (3, 0)"
    assert raised(lambda: call("torch")) == raised(lambda: call("jax")) == (ValueError, message)


@pytest.mark.skipif(not hasattr(jax, "enable_x64"), reason="jax.enable_x64 context manager not available")
def test_jax_float64_runs_on_chunked_and_reference_and_is_refused_by_pallas():
    """float64 exists in JAX only with 64-bit mode on; there chunked/reference compute in float64
    (``impl=None`` on CPU picks chunked) and Pallas refuses it by name, never downcasting."""
    hidden, weight, labels, _ = inputs(4, 3, 6, seed=7)
    with jax.enable_x64(True):
        h, w, y = jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(labels)
        assert h.dtype == jnp.float64
        assert jax_heads.select_implementation(h, None) == "chunked"
        assert jax_heads.linear_cross_entropy(h, w, y).dtype == jnp.float64
        with pytest.raises(ValueError, match="impl='pallas' cannot run on these inputs: supports .*, got float64"):
            jax_heads.linear_cross_entropy(h, w, y, impl="pallas", interpret=True)


@pytest.mark.parametrize("impl", ["chunked", "reference", "pallas"])
def test_jax_transposed_and_strided_inputs(impl):
    """The JAX counterpart of torch's non-contiguous cases: hidden, labels and the upstream gradient
    built by transposes and strided slices inside ``jit`` (XLA picks the layouts)."""
    hidden, weight, labels, _ = inputs(12, 5, 17, seed=8, ignored=[1, 7])
    scale = np.random.default_rng(9).standard_normal((4, 3)).astype(np.float32)
    storage = np.zeros((5, 4, 6), np.float32)  # (D, S, 2B): hidden (B=3, S=4, D) at stride 2
    storage[..., ::2] = hidden.reshape(3, 4, 5).transpose(2, 1, 0)

    def objective(storage, w, labels_t):
        h = storage[..., ::2].transpose(2, 1, 0)
        loss = jax_heads.linear_cross_entropy(h, w, labels_t.T, impl=impl, interpret=impl == "pallas")
        return jnp.sum(loss.T * scale), loss

    (_, loss), (d_storage, d_weight) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(
        jnp.asarray(storage), jnp.asarray(weight, jnp.float32), jnp.asarray(labels.reshape(3, 4).T, jnp.int32)
    )
    truths = lce_ground_truth(hidden, weight, labels, scale.T.reshape(-1))
    d_hidden = np.asarray(d_storage)[..., ::2].transpose(2, 1, 0).reshape(12, 5)
    assert not np.any(np.asarray(d_storage)[..., 1::2])
    for name, value, truth in zip(("loss", "d_hidden", "d_weight"), (loss, d_hidden, d_weight), truths, strict=True):
        assert_close(name, np.asarray(value).reshape(truth.shape), truth, "float32")


def test_non_contiguous_torch_tensors_through_dlpack():
    """Strided torch hidden and transposed labels cross the DLPack bridge (copied into row-major
    memory) and give JAX the loss torch computes."""
    hidden, weight, labels, _ = inputs(12, 6, 19, seed=10, ignored=[0])
    h = torch.from_numpy(hidden).float().reshape(3, 4, 6).transpose(0, 1)[:, ::2]
    y = torch.from_numpy(labels).reshape(3, 4).T[:, ::2]
    assert not h.is_contiguous() and not y.is_contiguous()
    w = torch.from_numpy(weight).float()
    want = torch_heads.linear_cross_entropy(h, w, y).numpy()
    got = jax_heads.linear_cross_entropy(to_jax(h), to_jax(w), to_jax(y))
    assert rel_err(got, want) <= PARITY_FLOAT32


# --- heads -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("framework", ["torch", "jax"])
@pytest.mark.parametrize("name, args", [("ClassificationHead", (8, 3, 0.0)), ("EmbeddingHead", (8, 4, True))],
                         ids=["classification", "embedding-normalized"])
def test_pooling_mask_selecting_no_rows(framework, name, args):
    """A mask with no 1s: a (0, C) float32 output and zero, finite gradients (normalisation of no rows
    divides nothing by zero). In JAX under jit, ``num_selected=0`` gives the same."""
    module = head(framework, name, *args)
    hidden = np.random.default_rng(11).standard_normal((2, 5, 8))
    mask = np.zeros((2, 5), np.int32)
    if framework == "torch":
        h = torch.from_numpy(hidden).float().requires_grad_(True)
        out = module(h, torch.from_numpy(mask))
        out.sum().backward()
        grads = [h.grad] + [p.grad for p in module.parameters()]
        assert out.shape == (0, args[1]) and out.dtype == torch.float32
        assert all(g is not None and not torch.any(g) for g in grads)
        return
    if name == "ClassificationHead":
        module.eval()
    h, m = jnp.asarray(hidden, jnp.float32), jnp.asarray(mask)
    out = module(h, m)
    assert out.shape == (0, args[1]) and out.dtype == jnp.float32
    jitted = nnx.jit(lambda module, h, m: module(h, m, num_selected=0))(module, h, m)
    assert jitted.shape == (0, args[1])
    d_params, d_hidden = nnx.grad(lambda module, h: module(h, m).sum(), argnums=(0, 1))(module, h)
    for g in [d_hidden, *jax.tree.leaves(d_params)]:
        assert not np.any(np.asarray(g))


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, float("nan"), float("inf"), True, "0.1", None],
                         ids=["neg", "one", "above-one", "nan", "inf", "bool", "str", "none"])
def test_dropout_out_of_range_is_the_same_error_in_both_frameworks(dropout):
    torch_error = raised(lambda: head("torch", "ClassificationHead", 8, 3, dropout))
    jax_error = raised(lambda: head("jax", "ClassificationHead", 8, 3, dropout))
    assert torch_error == jax_error
    assert torch_error[1].startswith("dropout must be")



# --- the torch vocabulary-parallel op against the single-device op -----------------------------------
# One gloo rank holding the whole vocabulary (conftest.py: gloo_world); the op's collectives still run.


def _parallel(group, hidden, weight, labels, **kwargs):
    from torch_heads.parallel import vocab_parallel_linear_cross_entropy

    return vocab_parallel_linear_cross_entropy(
        hidden, weight, labels, vocab_start=0, vocab_size=11, group=group, **kwargs
    )


def _uint(dtype, values):
    return torch.tensor(values, dtype=dtype)


PARALLEL_BAD_INPUTS = {  # name -> (hidden, weight, labels) differing from (4, 8), (11, 8), (4,) int64 in one place
    "labels-complex": (None, None, torch.zeros(4, dtype=torch.complex64)),
    "labels-bool": (None, None, torch.zeros(4, dtype=torch.bool)),
    "labels-float": (None, None, torch.zeros(4)),
    "hidden-0d": (torch.tensor(1.0), None, None),
    "hidden-int": (torch.ones(4, 8, dtype=torch.int32), None, None),
    "hidden-numpy": (np.zeros((4, 8)), None, None),
    "weight-dtype": (None, torch.zeros(11, 8, dtype=torch.float64), None),
    "weight-3d": (None, torch.zeros(11, 8, 1), None),
    "hidden-size": (None, torch.zeros(11, 7), None),
    "labels-shape": (None, None, torch.zeros(5, dtype=torch.long)),
    "label-eq-V": (None, None, torch.tensor([0, 11, 2, 3])),
    "label-uint64-2**64-100": (None, None, _uint(torch.uint64, [0, 2**64 - 100, 2, 3])),
    "label-uint32-max": (None, None, _uint(torch.uint32, [0, 1, 2**32 - 1, 3])),
}


@pytest.mark.parametrize("case", PARALLEL_BAD_INPUTS)
def test_vocab_parallel_refuses_what_linear_cross_entropy_refuses(gloo_world, case):
    """The same exception and message from both torch ops (the parallel op names its weight
    ``weight_shard``): complex labels are a TypeError, a 0-d hidden the single-device ValueError, a
    uint64 label beyond int64 is out of range and quoted as given."""
    valid = (torch.randn(4, 8), torch.randn(11, 8), torch.tensor([0, 1, -100, 10]))
    args = [v if bad is None else bad for v, bad in zip(valid, PARALLEL_BAD_INPUTS[case])]
    single = raised(lambda: torch_heads.linear_cross_entropy(*args))
    parallel = raised(lambda: _parallel(gloo_world, *args))
    assert (parallel[0], parallel[1].replace("weight_shard", "weight")) == single
    if case == "label-uint64-2**64-100":
        assert "found 18446744073709551516 at index (1,)" in single[1]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vocab_parallel_non_finite_hidden_row_is_nan_as_in_linear_cross_entropy(gloo_world, value, reduction):
    """A ±inf (or NaN) in one token's hidden state: NaN loss (never inf) and NaN hidden-gradient row in
    both torch ops; every other token's loss and hidden gradient equal the single-device op's."""
    hidden, weight, labels, upstream = inputs(7, 5, 11, seed=8, ignored=[4])
    hidden[2, 1] = value
    results = []
    for fn in (torch_heads.linear_cross_entropy, lambda *a, **k: _parallel(gloo_world, *a, **k)):
        h = torch.tensor(hidden, dtype=torch.float32, requires_grad=True)
        loss = fn(h, torch.tensor(weight, dtype=torch.float32), torch.tensor(labels), reduction=reduction)
        results.append(loss.detach())
        if reduction == "none":
            loss = (loss * torch.tensor(upstream, dtype=torch.float32)).sum()
        loss.backward()
        results.append(h.grad)
    loss, d_hidden, parallel_loss, parallel_d_hidden = results
    assert torch.isnan(parallel_loss[2] if reduction == "none" else parallel_loss)
    assert torch.isnan(parallel_d_hidden[2]).all()
    keep = [0, 1, 3, 4, 5, 6]
    if reduction == "none":
        assert_close("loss", parallel_loss[keep].numpy(), loss[keep].numpy(), "float32")
    assert_close("d_hidden", parallel_d_hidden[keep].numpy(), d_hidden[keep].numpy(), "float32")


def test_vocab_parallel_second_order_is_refused_clearly(gloo_world):
    """The parallel op's gradients can be taken with ``create_graph=True`` (and equal the single-device
    ones), but differentiating them raises a RuntimeError naming what supports second order."""
    hidden, weight, labels, _ = inputs(6, 5, 11, seed=9, ignored=[1])
    h = torch.tensor(hidden, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(weight, dtype=torch.float64)
    (g,) = torch.autograd.grad(_parallel(gloo_world, h, w, torch.tensor(labels)).sum(), h, create_graph=True)
    (expected,) = torch.autograd.grad(torch_heads.linear_cross_entropy(h, w, torch.tensor(labels)).sum(), h)
    assert_close("d_hidden", g.detach().numpy(), expected.numpy(), "float64")
    with pytest.raises(RuntimeError, match=r"second-order.*vocabulary-parallel.*linear_cross_entropy with "
                                           r"impl='chunked' \(twice\) or impl='reference'"):
        torch.autograd.grad((g**2).sum(), h)


def test_sanitize_script_lists_and_selects_its_cases(capsys):
    """``benchmarks/sanitize_pallas.py --list``/``--match``: what ``gpu_checks.sh sanitize`` runs one per process."""
    from benchmarks import sanitize_pallas

    sanitize_pallas.main(["--list"])
    names = capsys.readouterr().out.splitlines()
    assert len(names) == len(set(names)) == 13, names
    sanitize_pallas.main(["--list", "--only", "gif", "--match", "options []"])
    assert capsys.readouterr().out.splitlines() == ["gradient in forward, mean, options []"]
    with pytest.raises(SystemExit):
        sanitize_pallas.main(["--list", "--only", "exact", "--match", "gradient in forward"])
