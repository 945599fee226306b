"""Checked mode: find, under ``jit``, the inputs that would silently poison a training step.

Eagerly, :func:`jax_heads.linear_cross_entropy` raises ``ValueError`` for an out-of-range label.
Under ``jit`` the labels are tracers and nothing can raise: such a token's loss is NaN, and so is
the whole ``d_weight`` (every token adds into it); a counted token whose hidden state holds inf or
NaN does the same, and so does one at an *ignored* token (``0·NaN`` in ``Gᵀ·H``). Two
ways to catch them inside a compiled step:

* :func:`invalid_tokens` — a boolean mask of the offending tokens, an ordinary array. Skip the
  step on device without a host round trip (keep the old parameters where ``mask.any()``).
* :func:`check_inputs` — ``jax.experimental.checkify`` checks that name the first offending
  token, its position and value (for a label, the text of the eager ``ValueError``). Call it inside
  a function transformed by ``checkify.checkify``; the returned error's ``get()`` is None when the
  inputs are valid.

Example (skip the step when invalid, on device)::

    def loss_fn(params, hidden, labels):
        loss = jax_heads.linear_cross_entropy(hidden, params["w"], labels, reduction="mean")
        return loss, jax_heads.invalid_tokens(hidden, labels, params["w"].shape[0]).any()

    @jax.jit
    def step(params, opt_state, hidden, labels):
        (loss, skip), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, hidden, labels)
        updates, new_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(skip, o, n), new, old)
        return keep(new_params, params), keep(new_state, opt_state), loss, skip

With ``checkify`` (the host learns which token, at the cost of a synchronisation per step)::

    def loss_fn(params, hidden, labels):
        jax_heads.check_inputs(hidden, labels, params["w"].shape[0])
        return jax_heads.linear_cross_entropy(hidden, params["w"], labels, reduction="mean")

    checked_grad = jax.jit(checkify.checkify(jax.value_and_grad(loss_fn)))
    err, (loss, grads) = checked_grad(params, hidden, labels)
    if err.get() is None:
        ...  # apply the update; else log err.get() and skip the batch
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from heads_common import LM_IGNORE_INDEX, check_ignore_index
from jax_heads.functional import FLOAT_DTYPES
from jax_heads.labels import out_of_range_labels


def _check(hidden: object, labels: object, vocab_size: object, ignore_index: object) -> int:
    for name, value in (("hidden", hidden), ("labels", labels)):
        if not isinstance(value, jax.Array):
            raise TypeError(f"{name} must be a jax.Array, got {type(value).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be a floating array of {[str(d) for d in FLOAT_DTYPES]}, got {hidden.dtype}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be an integer array, got {labels.dtype}")
    if hidden.ndim < 1 or hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {hidden.shape[:-1]}, got {labels.shape}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return check_ignore_index(ignore_index)


def _masks(hidden, labels, vocab_size, ignore_index):
    """(out-of-range labels, tokens with a non-finite hidden state, non-finite hidden elements).

    Every token counts for the hidden states, ignored ones too: a NaN there still reaches ``d_weight``."""
    non_finite = ~jnp.isfinite(hidden)
    return out_of_range_labels(labels, vocab_size, ignore_index), non_finite.any(axis=-1), non_finite


def invalid_tokens(
    hidden: jax.Array, labels: jax.Array, vocab_size: int, *, ignore_index: int = LM_IGNORE_INDEX
) -> jax.Array:
    """The tokens that make a training step's loss or ``d_weight`` NaN.

    Works eagerly and under ``jit``/``vmap``/``grad`` (it has no gradient of its own).

    Args:
        hidden: ``(..., D)`` float16/bfloat16/float32/float64 array.
        labels: ``(...)`` integer array of shape ``hidden.shape[:-1]`` (any integer dtype; compared
            in its own dtype, so unsigned labels never wrap onto ``ignore_index``).
        vocab_size: ``V``, the number of classes.
        ignore_index: label value of tokens that are not counted.

    Returns:
        bool array of ``labels``' shape: True where the label is neither in ``[0, V)`` nor
        ``ignore_index``, or where the hidden state holds inf or NaN (ignored tokens included).

    Raises:
        TypeError, ValueError: non-array inputs, a non-float ``hidden``, non-integer labels,
            mismatched shapes, a ``vocab_size`` that is not a positive int, a non-int ``ignore_index``.
    """
    ignore_index = _check(hidden, labels, vocab_size, ignore_index)
    bad_label, bad_hidden, _ = _masks(hidden, labels, vocab_size, ignore_index)
    return bad_label | bad_hidden


def check_inputs(hidden: jax.Array, labels: jax.Array, vocab_size: int, *, ignore_index: int = LM_IGNORE_INDEX) -> None:
    """``checkify`` checks for the first out-of-range label and the first non-finite hidden state.

    Call inside a function transformed by ``jax.experimental.checkify.checkify`` (itself under
    ``jit`` or not). The first failing check (labels first, then hidden states, each in row-major
    order) becomes the error, with its position and value::

        labels must be in [0, 10) or equal ignore_index=-100; found 12 at index (1, 1)
        hidden must be finite at every token; found nan at index (0, 2, 5) (label 7)

    Arguments, returns and raises as :func:`invalid_tokens` (which gives the mask of every such
    token). Outside ``checkify``: eagerly, a failing check raises
    ``jax.experimental.checkify.JaxRuntimeError`` at once; under ``jit`` tracing raises
    ``ValueError`` (the check must be functionalized by ``checkify.checkify``).
    """
    ignore_index = _check(hidden, labels, vocab_size, ignore_index)
    bad_label, bad_hidden, non_finite = _masks(hidden, labels, vocab_size, ignore_index)

    first = jnp.argmax(bad_label.reshape(-1))
    position = jnp.unravel_index(first, labels.shape)
    names = [f"p{i}" for i in range(labels.ndim)]
    checkify.check(
        ~bad_label.any(),
        f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
        f"found {{value}} at index {_index_format(names)}",
        value=labels.reshape(-1)[first],
        **dict(zip(names, position)),
    )

    # The first non-finite element of the first token with a non-finite hidden state.
    element = jnp.argmax((bad_hidden[..., None] & non_finite).reshape(-1))
    position = jnp.unravel_index(element, hidden.shape)
    names = [f"p{i}" for i in range(hidden.ndim)]
    checkify.check(
        ~bad_hidden.any(),
        f"hidden must be finite at every token; found {{value}} at index {_index_format(names)} "
        "(label {label})",
        value=hidden.reshape(-1)[element],
        label=labels[position[:-1]],
        **dict(zip(names, position)),
    )


def _index_format(names: list[str]) -> str:
    """The format of a Python tuple of the named fields, as ``str(tuple(position))`` prints it."""
    fields = ", ".join(f"{{{name}}}" for name in names)
    return f"({fields},)" if len(names) == 1 else f"({fields})"
