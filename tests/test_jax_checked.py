"""Checked mode (``jax_heads.checked``) and the inputs it guards against under ``jit``.

Under ``jit`` an out-of-range label or a non-finite hidden state at a counted token makes the step's
``d_weight`` NaN without an exception; ``invalid_tokens`` and ``check_inputs`` find them. A NaN
hidden state at an *ignored* token leaves the loss finite but makes ``d_weight`` NaN in every
implementation (as in torch); checked mode flags it too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ground_truth import lce_ground_truth
from jax.experimental import checkify
from jax.sharding import Mesh

import jax_heads
from heads_common import label_range_message
from heads_common.tolerances import assert_close

IGNORE = -100
IMPLS = ["chunked", "reference", "pallas", "fused"]


def impl_kwargs(impl: str) -> dict:
    return {"impl": impl, "interpret": True} if impl == "pallas" else {"impl": impl}


def make_inputs(lead, v, d, seed=0):
    """float32 hidden ``(*lead, d)``, weight ``(v, d)``, int32 labels ``(*lead,)`` with a few ignored."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((*lead, d)).astype(np.float32)
    weight = (rng.standard_normal((v, d)) / np.sqrt(d)).astype(np.float32)
    labels = rng.integers(0, v, lead)
    labels.reshape(-1)[::4] = IGNORE
    return hidden, weight, labels


def checked(fn):
    """``fn`` under ``checkify`` and ``jit``: returns ``(error message or None, fn's result)``."""
    compiled = jax.jit(checkify.checkify(fn))

    def call(*args):
        error, out = compiled(*args)
        return error.get(), out

    return call


# --- invalid_tokens ---------------------------------------------------------------------------------


def test_invalid_tokens_marks_bad_labels_and_non_finite_rows():
    hidden, _, labels = make_inputs((2, 5), 10, 4)
    hidden[0, 1, 2] = np.nan  # counted: flagged
    hidden[1, 2, :] = np.inf  # counted: flagged
    hidden[0, 0, 1] = np.nan  # ignored (labels[0, 0] is IGNORE): still reaches d_weight, flagged
    labels[0, 3], labels[1, 1] = 10, -1
    want = np.zeros((2, 5), bool)
    want[0, 1] = want[1, 2] = want[0, 3] = want[1, 1] = want[0, 0] = True
    h, y = jnp.asarray(hidden), jnp.asarray(labels, jnp.int32)
    np.testing.assert_array_equal(jax_heads.invalid_tokens(h, y, 10), want)
    np.testing.assert_array_equal(jax.jit(lambda h, y: jax_heads.invalid_tokens(h, y, 10))(h, y), want)
    labels_only = np.zeros((2, 5), bool)
    labels_only[0, 3] = labels_only[1, 1] = True
    assert not jax_heads.invalid_tokens(jnp.nan_to_num(h), jnp.where(jnp.asarray(labels_only), IGNORE, y), 10).any()


def test_invalid_tokens_compares_unsigned_labels_without_wrapping():
    """uint32 2**32 - 100 is not the ignore index -100; with ignore_index=5, label 5 is ignored."""
    hidden = jnp.ones((3, 2))
    labels = jnp.asarray(np.array([2**32 - 100, 5, 9], np.uint32))
    np.testing.assert_array_equal(jax_heads.invalid_tokens(hidden, labels, 9), [True, False, True])
    np.testing.assert_array_equal(jax_heads.invalid_tokens(hidden, labels, 9, ignore_index=9), [True, False, False])


@pytest.mark.parametrize(
    "call, error",
    [
        pytest.param(lambda f: f(np.ones((2, 3)), jnp.zeros(2, jnp.int32), 5), TypeError, id="hidden-numpy"),
        pytest.param(lambda f: f(jnp.ones((2, 3), jnp.int32), jnp.zeros(2, jnp.int32), 5), TypeError, id="hidden-int"),
        pytest.param(lambda f: f(jnp.ones((2, 3)), jnp.zeros(2), 5), TypeError, id="labels-float"),
        pytest.param(lambda f: f(jnp.ones((2, 3)), jnp.zeros(3, jnp.int32), 5), ValueError, id="labels-shape"),
        pytest.param(lambda f: f(jnp.ones((2, 3)), jnp.zeros(2, jnp.int32), 0), ValueError, id="vocab-zero"),
        pytest.param(lambda f: f(jnp.ones((2, 3)), jnp.zeros(2, jnp.int32), 5.0), TypeError, id="vocab-float"),
        pytest.param(
            lambda f: f(jnp.ones((2, 3)), jnp.zeros(2, jnp.int32), 5, ignore_index=1.5),
            TypeError,
            id="ignore-index-float",
        ),
    ],
)
@pytest.mark.parametrize("fn", [jax_heads.invalid_tokens, jax_heads.check_inputs], ids=["mask", "checkify"])
def test_bad_arguments_raise(fn, call, error):
    with pytest.raises(error):
        call(fn)


# --- check_inputs (checkify) --------------------------------------------------------------------------


def test_check_inputs_names_the_first_bad_label_as_the_eager_error_does():
    hidden, weight, labels = make_inputs((2, 4), 10, 3)
    labels[1, 2], labels[1, 3] = 12, -7
    h, w, y = jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(labels, jnp.int32)
    with pytest.raises(ValueError) as eager:
        jax_heads.linear_cross_entropy(h, w, y)
    message, _ = checked(lambda h, y: jax_heads.check_inputs(h, y, 10))(h, y)
    assert str(eager.value) == label_range_message(12, (1, 2), 10, IGNORE)
    assert message.startswith(str(eager.value))
    # An unsigned label is quoted as given, never as the negative number it wraps to.
    unsigned = jnp.asarray(np.where(labels < 0, 0, labels).astype(np.uint32)).at[0, 1].set(2**32 - 1)
    message, _ = checked(lambda h, y: jax_heads.check_inputs(h, y, 10))(h, unsigned)
    assert message.startswith(label_range_message(2**32 - 1, (0, 1), 10, IGNORE))


def test_check_inputs_names_the_first_non_finite_hidden_state():
    hidden, _, labels = make_inputs((2, 4), 10, 3)
    labels[0, 2] = 7
    hidden[0, 2, 1:] = [np.inf, np.nan]
    hidden[1, 1, 0] = np.nan
    call = checked(lambda h, y: jax_heads.check_inputs(h, y, 10))
    message, _ = call(jnp.asarray(hidden), jnp.asarray(labels, jnp.int32))
    assert message.startswith("hidden must be finite at every token; found inf at index (0, 2, 1) (label 7)")
    hidden[0, 0, 1] = np.nan  # an ignored token (labels[0, 0]) comes first in row-major order
    message, _ = call(jnp.asarray(hidden), jnp.asarray(labels, jnp.int32))
    assert message.startswith(f"hidden must be finite at every token; found nan at index (0, 0, 1) (label {IGNORE})")
    hidden[~np.isfinite(hidden)] = 0.0
    assert call(jnp.asarray(hidden), jnp.asarray(labels, jnp.int32))[0] is None


def test_check_inputs_outside_checkify():
    hidden, labels = jnp.ones((2, 3)), jnp.asarray([1, 11], jnp.int32)
    with pytest.raises(checkify.JaxRuntimeError, match=r"found 11 at index \(1,\)"):
        jax_heads.check_inputs(hidden, labels, 10)
    with pytest.raises(ValueError, match="checkify"):
        jax.jit(lambda h, y: jax_heads.check_inputs(h, y, 10))(hidden, labels)


@pytest.mark.parametrize("impl", IMPLS)
def test_check_inputs_in_a_checkified_gradient_step(impl):
    """``checkify.checkify`` of ``value_and_grad`` through every implementation: the error names the bad
    token; with valid inputs there is none and the loss and gradients are those of the unchecked call."""
    hidden, weight, labels = make_inputs((2, 5), 12, 4)
    h, w, y = jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(labels, jnp.int32)

    def loss_fn(h, w, y, check):
        if check:
            jax_heads.check_inputs(h, y, w.shape[0])
        return jax_heads.linear_cross_entropy(h, w, y, reduction="mean", **impl_kwargs(impl))

    step = checked(jax.value_and_grad(lambda h, w, y: loss_fn(h, w, y, True), (0, 1)))
    message, clean = step(h, w, y)
    assert message is None
    plain = jax.jit(jax.value_and_grad(lambda h, w, y: loss_fn(h, w, y, False), (0, 1)))(h, w, y)
    for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(a, b)
    message, (loss, _) = step(h, w, y.at[1, 3].set(12))
    assert message.startswith(label_range_message(12, (1, 3), 12, IGNORE)) and np.isnan(loss)
    message, _ = step(h.at[0, 1, 2].set(jnp.nan), w, y)
    assert message.startswith("hidden must be finite at every token; found nan at index (0, 1, 2)")


def test_training_step_skips_an_invalid_batch_on_device():
    """The module docstring's pattern: the mask's ``any()`` keeps the old parameters and optimizer state."""
    hidden, weight, labels = make_inputs((6,), 9, 4)
    optimizer = optax.adam(1e-2)

    def loss_fn(params, hidden, labels):
        loss = jax_heads.linear_cross_entropy(hidden, params["w"], labels, reduction="mean")
        return loss, jax_heads.invalid_tokens(hidden, labels, params["w"].shape[0]).any()

    @jax.jit
    def step(params, opt_state, hidden, labels):
        (_, skip), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, hidden, labels)
        updates, new_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(skip, o, n), new, old)

        return keep(new_params, params), keep(new_state, opt_state), skip

    params = {"w": jnp.asarray(weight)}
    state = optimizer.init(params)
    h, y = jnp.asarray(hidden), jnp.asarray(labels, jnp.int32)
    for bad_h, bad_y in ((h, y.at[2].set(9)), (h.at[1, 0].set(jnp.inf), y)):
        new_params, new_state, skip = step(params, state, bad_h, bad_y)
        assert bool(skip)
        for a, b in zip(jax.tree.leaves((new_params, new_state)), jax.tree.leaves((params, state))):
            np.testing.assert_array_equal(a, b)
    new_params, _, skip = step(params, state, h, y)
    assert not bool(skip) and np.isfinite(new_params["w"]).all()
    assert not np.array_equal(new_params["w"], params["w"])


# --- NaN at an ignored token ------------------------------------------------------------------------


# fused has no vocabulary-parallel form
PLACEMENTS = [(impl, False) for impl in IMPLS] + [(impl, True) for impl in IMPLS if impl != "fused"]


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize(
    "impl, sharded", [pytest.param(i, s, id=f"{i}-{'vocab-parallel' if s else 'single'}") for i, s in PLACEMENTS]
)
def test_non_finite_hidden_state_at_an_ignored_token(impl, sharded, value):
    """Padding that holds NaN or inf: the loss and the counted rows of ``d_hidden`` equal the float64
    truth and ``d_weight`` is NaN (``0·NaN`` in ``Gᵀ·H``), in
    every implementation and per vocabulary shard, as in torch; ``invalid_tokens`` flags the rows."""
    hidden, weight, labels = make_inputs((7,), 11, 5, seed=3)
    ignored = np.flatnonzero(labels == IGNORE)
    dirty = hidden.copy()
    dirty[ignored[0], 2] = value
    dirty[ignored[1], :] = value
    mesh = {"mesh": Mesh(np.array(jax.devices()[:1]), ("vocab",)), "vocab_axis": "vocab"} if sharded else {}

    def objective(h, w):
        return jax_heads.linear_cross_entropy(
            h, w, jnp.asarray(labels, jnp.int32), reduction="sum", **mesh, **impl_kwargs(impl)
        )

    loss, (d_hidden, d_weight) = jax.jit(jax.value_and_grad(objective, (0, 1)))(jnp.asarray(dirty), jnp.asarray(weight))
    counted = labels != IGNORE
    truth_loss, truth_d_hidden, _ = lce_ground_truth(hidden, weight, labels, np.ones(7), IGNORE)
    assert_close("loss", loss, truth_loss.sum(), "float32")
    assert_close("d_hidden", np.asarray(d_hidden)[counted], truth_d_hidden[counted], "float32")
    assert np.isfinite(np.asarray(loss))
    assert np.isnan(np.asarray(d_weight)).any()
    flagged = jax_heads.invalid_tokens(jnp.asarray(dirty), jnp.asarray(labels, jnp.int32), 11)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(flagged)), ignored[:2])
