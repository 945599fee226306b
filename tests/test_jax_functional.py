"""jax_heads.linear_cross_entropy: every implementation against the float64 ground truth.

Each case runs ``jax.value_and_grad`` over hidden and weight and compares the loss and both
gradients with ``tests/ground_truth.py`` through ``heads_common/tolerances.py`` (float32: fixed bound;
bfloat16: relative to the naive bfloat16 computation). ``"chunked"`` runs with 3 rows per chunk so
that several chunks and a padded last chunk are exercised at every shape.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ground_truth import lce_ground_truth, upstream_for

from heads_common import label_range_message
from heads_common.tolerances import PARITY_FLOAT32, assert_close, rel_err
from jax_heads import chunked as chunked_module
from jax_heads import linear_cross_entropy, select_implementation
from jax_heads.chunked import DEFAULT_CHUNK_BUDGET_BYTES, chunk_rows_for, chunked_loss

IGNORE = -100
HAS_PALLAS = True
try:
    import jax_heads.pallas  # noqa: F401
except ImportError:  # the kernel file is written in parallel; skip its cases until it exists
    HAS_PALLAS = False

# (leading shape, V, D): one token/one class/one feature, odd N with V = 507 and D = 3, leading dims.
SHAPES = [((1,), 1, 1), ((7,), 507, 3), ((3, 11), 130, 16)]
DTYPES = ["float32", "bfloat16"]
IMPLS = ["reference", "chunked", "pallas"]
REDUCTIONS = ["none", "sum", "mean"]
CHUNK_ROWS = 3


def shape_id(shape) -> str:
    lead, v, d = shape
    return "x".join(map(str, (*lead, v, d)))


def impl_kwargs(impl: str) -> dict:
    if impl == "pallas":
        if not HAS_PALLAS:
            pytest.skip("jax_heads/pallas/ is not there yet")
        return {"impl": "pallas", "interpret": True}
    return {"impl": impl}


@pytest.fixture
def small_chunks(monkeypatch):
    """Make ``chunked`` use CHUNK_ROWS rows per chunk for any vocabulary (restored afterwards)."""
    original = chunked_module.chunked_loss

    def chunked_loss_small(hidden, weight, labels, ignore_index, chunk_budget_bytes=None, **options):
        budget = CHUNK_ROWS * weight.shape[0] * 4
        return original(hidden, weight, labels, ignore_index, budget, **options)

    monkeypatch.setattr("jax_heads.functional.chunked_loss", chunked_loss_small)


def make_inputs(shape, dtype, seed=0, ignored=0.2):
    """hidden ``(*lead, D)``, weight ``(V, D)`` (NumPy, already rounded to ``dtype``), labels ``(*lead,)``."""
    lead, v, d = shape
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((*lead, d)), dtype)
    weight = jnp.asarray(rng.standard_normal((v, d)) / np.sqrt(d), dtype)
    labels = rng.integers(0, v, size=lead)
    flat = labels.reshape(-1)
    flat[rng.choice(flat.size, size=round(ignored * flat.size), replace=False)] = IGNORE
    return hidden, weight, jnp.asarray(labels, jnp.int32)


def naive_loss(hidden, weight, labels, *, reduction):
    """Materialised logits in the input dtype (the baseline of the bfloat16 bound)."""
    logits = hidden @ weight.T
    valid = labels != IGNORE
    target = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    loss = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - target, 0).astype(jnp.float32)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / jnp.maximum(valid.sum(), 1)


def loss_and_grads(fn, hidden, weight, upstream, reduction):
    """``(loss, d_hidden, d_weight)`` of ``fn(hidden, weight)``; "none" is weighted by ``upstream``.

    Compiled as one ``jit`` (far faster than op-by-op here); ``test_jit_matches_eager`` covers eager calls.
    """

    def objective(h, w):
        loss = fn(h, w)
        scalar = jnp.sum(loss * upstream.reshape(loss.shape)) if reduction == "none" else loss
        return scalar, loss

    (_, loss), (d_hidden, d_weight) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(
        hidden, weight
    )
    return loss, d_hidden, d_weight


def truth(hidden, weight, labels, upstream, reduction):
    d = hidden.shape[-1]
    loss, d_hidden, d_weight = lce_ground_truth(
        np.asarray(hidden, dtype=np.float64).reshape(-1, d),
        np.asarray(weight, dtype=np.float64),
        np.asarray(labels).reshape(-1),
        upstream,
        IGNORE,
    )
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / max(int((np.asarray(labels) != IGNORE).sum()), 1)
    else:
        loss = loss.reshape(labels.shape)
    return loss, d_hidden.reshape(hidden.shape), d_weight


def _in_matrix(shape, impl, reduction) -> bool:
    """Keep the suite fast where a case adds nothing: reductions are applied after the implementation,
    by the same code for all of them, so "sum" runs at the ragged shape only, and the (slow,
    interpreted) Pallas kernel runs every reduction only there."""
    if shape == SHAPES[1]:
        return True
    return reduction == "none" if impl == "pallas" else reduction != "sum"


CASES = [
    pytest.param(shape, dtype, impl, reduction, id=f"{shape_id(shape)}-{dtype}-{impl}-{reduction}")
    for shape in SHAPES
    for dtype in DTYPES
    for impl in IMPLS
    for reduction in REDUCTIONS
    if _in_matrix(shape, impl, reduction)
]


@pytest.mark.parametrize("shape, dtype, impl, reduction", CASES)
def test_matches_ground_truth(shape, dtype, impl, reduction, small_chunks):
    kwargs = impl_kwargs(impl)
    hidden, weight, labels = make_inputs(shape, dtype)
    upstream = upstream_for(labels.shape, reduction, labels, np.random.default_rng(1), IGNORE)
    g = jnp.asarray(upstream, jnp.float32)
    fn = functools.partial(linear_cross_entropy, labels=labels, reduction=reduction, **kwargs)
    loss, d_hidden, d_weight = loss_and_grads(lambda h, w: fn(h, w), hidden, weight, g, reduction)
    assert loss.dtype == jnp.float32
    assert d_hidden.dtype == hidden.dtype and d_weight.dtype == weight.dtype
    want = truth(hidden, weight, labels, upstream, reduction)

    naive = [None] * 3
    if dtype != "float32":
        naive_fn = functools.partial(naive_loss, labels=labels, reduction=reduction)
        naive = loss_and_grads(naive_fn, hidden, weight, g, reduction)
    for name, value, expected, baseline in zip(
        ("loss", "d_hidden", "d_weight"), (loss, d_hidden, d_weight), want, naive
    ):
        assert_close(name, value, expected, dtype, naive=baseline)


def test_bfloat16_bound_is_not_vacuous():
    """The naive bfloat16 error is small enough that a wrong row would fail the bound."""
    hidden, weight, labels = make_inputs(((33,), 130, 16), "bfloat16")
    naive = naive_loss(hidden, weight, labels, reduction="none")
    want = truth(hidden, weight, labels, np.zeros(33), "none")[0]
    assert rel_err(naive, want) < 0.02
    position = int(np.flatnonzero(np.asarray(labels) != IGNORE)[0])
    wrong = linear_cross_entropy(hidden, weight, labels.at[position].set((labels[position] + 1) % 130))
    assert rel_err(wrong, want) > rel_err(naive, want) + 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored(impl):
    kwargs = impl_kwargs(impl)
    hidden, weight, labels = make_inputs(((9,), 50, 4), "float32", ignored=1.0)
    for reduction in REDUCTIONS:
        fn = functools.partial(linear_cross_entropy, labels=labels, reduction=reduction, **kwargs)
        objective = lambda h, w, fn=fn: fn(h, w).sum()
        loss, (d_hidden, d_weight) = jax.value_and_grad(objective, argnums=(0, 1))(hidden, weight)
        assert float(loss) == 0.0
        assert not np.any(np.asarray(d_hidden)) and not np.any(np.asarray(d_weight))


@pytest.mark.parametrize("impl", IMPLS)
def test_upstream_nan_at_ignored_rows_gives_finite_gradients(impl):
    kwargs = impl_kwargs(impl)
    hidden, weight, labels = make_inputs(((12,), 40, 5), "float32", ignored=0.3)
    upstream = jnp.where(labels == IGNORE, jnp.nan, 1.0)
    fn = lambda h, w: jnp.sum(linear_cross_entropy(h, w, labels, **kwargs) * upstream)
    d_hidden, d_weight = jax.grad(lambda h, w: jnp.nan_to_num(fn(h, w)), argnums=(0, 1))(hidden, weight)
    assert np.all(np.isfinite(d_hidden)) and np.all(np.isfinite(d_weight))
    assert not np.any(np.asarray(d_hidden)[np.asarray(labels) == IGNORE])


@pytest.mark.parametrize("impl", IMPLS)
def test_jit_matches_eager(impl):
    kwargs = impl_kwargs(impl)
    hidden, weight, labels = make_inputs(((2, 7), 61, 6), "float32")
    fn = lambda h, w, y: linear_cross_entropy(h, w, y, reduction="mean", **kwargs)
    grad = jax.value_and_grad(fn, argnums=(0, 1))
    eager = grad(hidden, weight, labels)
    jitted = jax.jit(grad)(hidden, weight, labels)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        assert rel_err(b, a) <= PARITY_FLOAT32


@pytest.mark.parametrize("impl", IMPLS)
def test_vmap_over_batch(impl):
    kwargs = impl_kwargs(impl)
    hidden, weight, labels = make_inputs(((3, 5), 37, 4), "float32")
    fn = lambda h, w, y: linear_cross_entropy(h, w, y, reduction="sum", **kwargs)
    grad = jax.value_and_grad(fn, argnums=(0, 1))
    loss, (d_hidden, d_weight) = jax.vmap(grad, in_axes=(0, None, 0))(hidden, weight, labels)
    assert loss.shape == (3,) and d_hidden.shape == hidden.shape and d_weight.shape == (3, *weight.shape)
    for b in range(3):
        want = truth(hidden[b], weight, labels[b], np.ones(5), "sum")
        for value, expected in zip((loss[b], d_hidden[b], d_weight[b]), want):
            assert_close("vmap", value, expected, "float32")


def test_out_of_range_label_raises_eagerly_with_torch_message():
    torch = pytest.importorskip("torch")
    import torch_heads

    hidden, weight, labels = make_inputs(((2, 4), 10, 3), "float32", ignored=0.0)
    labels = labels.at[1, 2].set(10)
    with pytest.raises(ValueError) as jax_error:
        linear_cross_entropy(hidden, weight, labels, impl="chunked")
    with pytest.raises(ValueError) as torch_error:
        torch_heads.linear_cross_entropy(
            torch.from_numpy(np.array(hidden)), torch.from_numpy(np.array(weight)), torch.from_numpy(np.array(labels))
        )
    assert str(jax_error.value) == label_range_message(10, (1, 2), 10, IGNORE) == str(torch_error.value)
    with pytest.raises(ValueError, match=r"found -3 at index \(0, 0\)"):
        linear_cross_entropy(hidden, weight, labels.at[0, 0].set(-3))


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_range_label_under_jit_is_nan_there_only(impl):
    kwargs = impl_kwargs(impl)
    hidden, weight, labels = make_inputs(((9,), 20, 4), "float32")
    good = linear_cross_entropy(hidden, weight, labels, **kwargs)
    for bad_value in (20, -1, 2**30):
        bad_labels = labels.at[4].set(bad_value)
        fn = jax.jit(lambda h, w, y: linear_cross_entropy(h, w, y, **kwargs))
        loss = np.asarray(fn(hidden, weight, bad_labels))
        assert np.isnan(loss[4])
        np.testing.assert_allclose(np.delete(loss, 4), np.delete(np.asarray(good), 4), rtol=1e-6)
    mean = jax.jit(lambda y: linear_cross_entropy(hidden, weight, y, reduction="mean", **kwargs))(labels.at[0].set(99))
    assert np.isnan(mean)


def test_narrow_label_dtypes_are_checked_without_wrapping():
    hidden, weight, labels = make_inputs(((6,), 300, 4), "float32", ignored=0.0)
    want = linear_cross_entropy(hidden, weight, labels % 200)
    got = linear_cross_entropy(hidden, weight, (labels % 200).astype(jnp.uint8))
    np.testing.assert_array_equal(got, want)
    # int8 label 120 with V = 100 is out of range (a naive compare against 100 in int8 is fine, but
    # the point is that V = 300 would wrap in int8): under jit it must be NaN, not a loss.
    small = jnp.full((6,), 120, jnp.int8)
    with pytest.raises(ValueError, match="found 120"):
        linear_cross_entropy(hidden, weight[:100], small)
    loss = jax.jit(lambda y: linear_cross_entropy(hidden, weight[:100], y))(small)
    assert np.all(np.isnan(loss))
    in_range = jax.jit(lambda y: linear_cross_entropy(hidden, weight, y))(small)
    assert np.all(np.isfinite(in_range))


def _with_label(labels, dtype: str, position, value: int) -> jax.Array:
    """``labels`` as ``dtype`` with ``value`` (which may not fit a signed dtype) at ``position``."""
    values = np.asarray(labels).astype(dtype)
    values[position] = value
    return jnp.asarray(values)


UNSIGNED = [
    pytest.param("uint32", 2**32 - 100, id="uint32-wraps-to-ignore-index"),
    pytest.param("uint32", 2**32 - 1, id="uint32-wraps-to-minus-1"),
    pytest.param("uint32", 2**31, id="uint32-wraps-to-int32-min"),
    pytest.param("uint64", 2**64 - 100, id="uint64-wraps-to-ignore-index"),
]


@pytest.mark.skipif(not hasattr(jax, "enable_x64"), reason="jax.enable_x64 context manager not available")
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "vocab-parallel"])
@pytest.mark.parametrize("dtype, value", UNSIGNED)
def test_unsigned_labels_are_range_checked_before_widening(dtype, value, sharded):
    """An unsigned label past the signed range (2**32 - 100 becomes -100 in int32) is an error
    quoting the label as given, and under ``jit`` a NaN loss and NaN gradient row, never an ignored
    token; also through the vocabulary-parallel path (a one-device mesh) and for uint64 labels in
    64-bit mode."""
    from jax.sharding import Mesh

    mesh = {"mesh": Mesh(np.array(jax.devices()[:1]), ("vocab",)), "vocab_axis": "vocab"} if sharded else {}
    with jax.enable_x64(dtype == "uint64"):
        hidden, weight, labels = make_inputs(((2, 4), 10, 3), "float32", ignored=0.0)
        bad = _with_label(labels, dtype, (1, 2), value)
        with pytest.raises(ValueError) as error:
            linear_cross_entropy(hidden, weight, bad, **mesh)
        assert str(error.value) == label_range_message(value, (1, 2), 10, IGNORE)

        def objective(h, w, y):
            loss = linear_cross_entropy(h, w, y, **mesh)
            return loss.sum(), loss

        grad = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))
        (_, loss), (d_hidden, _) = grad(hidden, weight, bad)
        (_, good), (good_d_hidden, _) = grad(hidden, weight, labels.astype(dtype))
    loss, d_hidden = np.asarray(loss), np.asarray(d_hidden)
    assert np.isnan(loss[1, 2]) and np.isnan(d_hidden[1, 2]).all()
    keep = np.ones((2, 4), bool)
    keep[1, 2] = False
    np.testing.assert_array_equal(loss[keep], np.asarray(good)[keep])
    np.testing.assert_array_equal(d_hidden[keep], np.asarray(good_d_hidden)[keep])


@pytest.mark.parametrize("impl", [*IMPLS, "fused"])
def test_repeated_eager_calls_compile_nothing(impl):
    """Eager ``value_and_grad`` in a loop, as a training loop without ``jit`` runs it: after the first
    call nothing is traced or compiled again and no array is left behind (``fused`` used to rebuild
    and recompile its loops on every call, growing memory and taking ~100x longer than ``chunked``)."""
    kwargs = {"impl": "fused"} if impl == "fused" else impl_kwargs(impl)
    hidden, weight, labels = make_inputs(((16,), 50, 8), "float32")
    grad = jax.value_and_grad(lambda h, w: linear_cross_entropy(h, w, labels, reduction="mean", **kwargs), (0, 1))
    jax.block_until_ready(grad(hidden, weight))
    live = len(jax.live_arrays())
    events = []

    def listener(name, *args, **kwargs):
        events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for _ in range(3):
            jax.block_until_ready(grad(hidden, weight))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not [name for name in events if name.startswith("/jax/core/compile/")], events
    assert len(jax.live_arrays()) == live


def test_chunked_memory_is_bounded_by_a_chunk():
    """Compiled temp memory of value_and_grad: the reference holds (N, V) logits, chunked does not."""
    n, v, d = 2048, 1000, 16
    budget = 64 * v * 4
    hidden, weight = jnp.ones((n, d)), jnp.ones((v, d))
    labels = jnp.zeros(n, jnp.int32)

    def temp_bytes(fn):
        lowered = jax.jit(jax.value_and_grad(lambda h, w: fn(h, w).sum(), argnums=(0, 1))).lower(hidden, weight)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(lambda h, w: chunked_loss(h, w, labels, IGNORE, budget))
    reference = temp_bytes(lambda h, w: linear_cross_entropy(h, w, labels, impl="reference"))
    assert reference >= n * v * 4
    assert chunked <= 3 * budget + 4 * v * d * 4, (chunked, reference)


def test_chunk_rows_for():
    assert chunk_rows_for(1000, 4, 4000 * 7) == 7
    assert chunk_rows_for(10**9, 4) == 1
    assert chunk_rows_for(256_000, 4) == DEFAULT_CHUNK_BUDGET_BYTES // (256_000 * 4)


def test_chunked_budgets_agree():
    hidden, weight, labels = make_inputs(((10,), 33, 5), "float32")
    want = linear_cross_entropy(hidden, weight, labels, impl="reference")
    for rows in (1, 3, 4, 10, 64):
        got = chunked_loss(hidden, weight, labels, IGNORE, rows * 33 * 4)
        assert rel_err(got, want) <= PARITY_FLOAT32


def test_empty_tokens():
    hidden, weight = jnp.zeros((0, 4)), jnp.ones((5, 4))
    labels = jnp.zeros((0,), jnp.int32)
    for impl in ("chunked", "reference"):
        assert linear_cross_entropy(hidden, weight, labels, impl=impl).shape == (0,)
        assert float(linear_cross_entropy(hidden, weight, labels, impl=impl, reduction="mean")) == 0.0


@pytest.mark.skipif(not hasattr(jax, "enable_x64"), reason="jax.enable_x64 context manager not available")
@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_float64(impl):
    with jax.enable_x64(True):
        hidden, weight, labels = make_inputs(((7,), 23, 3), "float64")
        loss, d_hidden, d_weight = loss_and_grads(
            lambda h, w: linear_cross_entropy(h, w, labels, impl=impl), hidden, weight, jnp.ones(7), "none"
        )
        assert loss.dtype == jnp.float64 and d_hidden.dtype == jnp.float64
        for value, expected in zip((loss, d_hidden, d_weight), truth(hidden, weight, labels, np.ones(7), "none")):
            assert_close("float64", value, expected, "float64")


def test_select_implementation():
    hidden = jnp.ones((2, 3))
    on_gpu = jax.default_backend() == "gpu"
    assert select_implementation(hidden, None) == ("pallas" if on_gpu and HAS_PALLAS else "chunked")
    assert select_implementation(hidden, "reference") == "reference"
    if not on_gpu:
        with pytest.raises(ValueError, match="impl='pallas' cannot run on these inputs: needs a GPU"):
            select_implementation(hidden, "pallas")
    if HAS_PALLAS:
        assert select_implementation(hidden, "pallas", interpret=True) == "pallas"
    with pytest.raises(ValueError, match="interpret=True applies to impl='pallas' only"):
        select_implementation(hidden, "chunked", interpret=True)
    with pytest.raises(ValueError, match="interpret=True applies to impl='pallas' only"):
        select_implementation(hidden, None, interpret=True)
    with pytest.raises(ValueError, match=r"impl must be None or one of \('pallas', 'chunked', 'reference', 'fused'\)"):
        select_implementation(hidden, "cce")


def test_validation_errors():
    torch = pytest.importorskip("torch")
    import torch_heads

    hidden, weight, labels = make_inputs(((2, 3), 7, 4), "float32")
    with pytest.raises(TypeError, match="hidden must be a jax.Array, got ndarray"):
        linear_cross_entropy(np.asarray(hidden), weight, labels)
    with pytest.raises(TypeError, match="hidden must be a floating array"):
        linear_cross_entropy(labels[..., None], weight.astype(jnp.int32), labels)
    with pytest.raises(TypeError, match="weight dtype bfloat16 must equal hidden dtype float32"):
        linear_cross_entropy(hidden, weight.astype(jnp.bfloat16), labels)
    with pytest.raises(TypeError, match="labels must be an integer array, got float32"):
        linear_cross_entropy(hidden, weight, labels.astype(jnp.float32))
    with pytest.raises(TypeError, match="labels must be an integer array, got bool"):
        linear_cross_entropy(hidden, weight, labels > 0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        linear_cross_entropy(hidden, weight, labels, ignore_index=1.5)
    with pytest.raises(TypeError, match="interpret must be a bool"):
        linear_cross_entropy(hidden, weight, labels, interpret="yes")

    # Shape and reduction errors: the same message as torch_heads for the same bad input.
    t = lambda x: torch.from_numpy(np.array(x))
    bad_inputs = [
        {"hidden": hidden, "weight": weight[:, :3], "labels": labels},
        {"hidden": hidden, "weight": weight[None], "labels": labels},
        {"hidden": hidden, "weight": weight, "labels": labels[:, :2]},
        {"hidden": hidden, "weight": weight[:0], "labels": labels},
        {"hidden": hidden, "weight": weight, "labels": labels, "reduction": "avg"},
    ]
    for bad in bad_inputs:
        with pytest.raises(ValueError) as jax_error:
            linear_cross_entropy(**bad)
        torch_bad = {k: t(v) if isinstance(v, jax.Array) else v for k, v in bad.items()}
        with pytest.raises(ValueError) as torch_error:
            torch_heads.linear_cross_entropy(**torch_bad)
        assert str(jax_error.value) == str(torch_error.value)


def test_mesh_options_on_a_one_device_mesh():
    """``mesh``/``vocab_axis`` route to the vocabulary-parallel op (one shard here; several devices run in
    tests/multidevice/jax_vocab_parallel.py), and come together or not at all."""
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "vocab"))
    hidden, weight, labels = make_inputs(((2, 3), 7, 4), "float32")
    loss = linear_cross_entropy(hidden, weight, labels, mesh=mesh, vocab_axis="vocab", batch_axis="data")
    assert loss.shape == (2, 3)
    np.testing.assert_allclose(loss, linear_cross_entropy(hidden, weight, labels, impl="reference"), rtol=1e-6)
    with pytest.raises(ValueError, match="mesh was given without vocab_axis"):
        linear_cross_entropy(hidden, weight, labels, mesh=mesh)
    with pytest.raises(ValueError, match="vocab_axis was given without mesh"):
        linear_cross_entropy(hidden, weight, labels, vocab_axis="vocab")
    with pytest.raises(ValueError, match="batch_axis='data' needs mesh and vocab_axis"):
        linear_cross_entropy(hidden, weight, labels, batch_axis="data")
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        linear_cross_entropy(hidden, weight, labels, mesh="mesh", vocab_axis="vocab")
    message = r"impl must be None or one of \('pallas', 'chunked', 'reference', 'fused'\), got 'cce'"
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(hidden, weight, labels, mesh=mesh, vocab_axis="vocab", impl="cce")


def test_import_does_not_import_torch():
    code = "import sys, jax_heads, jax_heads.functional, jax_heads.heads; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_filter_eps_runs_the_filtered_pallas_backward():
    """A float ``filter_eps`` reaches the Pallas kernel; exact implementations refuse it by name."""
    from jax_heads.pallas import pallas_loss

    rng = np.random.default_rng(4)
    # Near-uniform softmax over 1000 classes, targets all in the first 256-row vocabulary tile: the
    # other tiles hold only probabilities ~1e-3 < eps, so the filter skips them.
    h = jnp.asarray(rng.standard_normal((37, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1000, 24)) * 0.1, jnp.float32)
    y = jnp.asarray(rng.integers(0, 256, 37), jnp.int32)
    eps = 1e-2

    def grads(fn):
        return jax.grad(lambda a, b: jnp.sum(fn(a, b)), (0, 1))(h, w)

    mine = grads(lambda a, b: linear_cross_entropy(a, b, y, impl="pallas", interpret=True, filter_eps=eps))
    direct = grads(lambda a, b: pallas_loss(a, b, y, -100, interpret=True, filter_eps=eps))
    exact = grads(lambda a, b: linear_cross_entropy(a, b, y, impl="pallas", interpret=True, filter_eps="auto"))
    for a, b in zip(mine, direct):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(mine[1]), np.asarray(exact[1]))
    with pytest.raises(ValueError, match="computes exact gradients only"):
        linear_cross_entropy(h, w, y, impl="chunked", filter_eps=eps)
    with pytest.raises(ValueError, match=r"filter_eps must be in \(0, 1\)"):
        linear_cross_entropy(h, w, y, impl="pallas", interpret=True, filter_eps=2.0)
