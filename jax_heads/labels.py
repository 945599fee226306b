"""Label checks of the JAX ops: the range in the labels' own dtype, and the flat, shifted labels an
implementation receives.

Concrete labels raise ``ValueError`` at once (the message ``torch_heads`` gives); traced labels
(under ``jit``/``vmap``) cannot raise, so their out-of-range positions come back as a mask that the
caller turns into NaN losses and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from heads_common import check_ignore_index_fits, label_range_message


def out_of_range_labels(labels: jax.Array | np.ndarray, vocab_size: int, ignore_index: int | None = None):
    """The mask of labels outside ``[0, vocab_size)`` that are not ``ignore_index``.

    Compared in the labels' own integer dtype, on NumPy or JAX (concrete or traced) arrays, before
    any narrowing or change of sign: a bound the dtype cannot hold is settled without converting it.
    So a ``uint32`` label ``2**32 - 100`` is out of range (never the ignore index -100), an ``int8``
    label 50 is inside a vocabulary of 300 (which ``int8`` would wrap to 44), and an ignore index the
    dtype cannot hold matches no label.
    """
    info = np.iinfo(labels.dtype)
    xp = np if isinstance(labels, np.ndarray) else jnp
    bad = labels >= vocab_size if vocab_size <= info.max else xp.zeros(labels.shape, bool)
    if info.min < 0:
        bad = bad | (labels < 0)
    if ignore_index is not None and info.min <= ignore_index <= info.max:
        bad = bad & (labels != ignore_index)
    return bad


def check_label_range(labels: jax.Array, vocab_size: int, ignore_index: int) -> jax.Array | None:
    """Labels must lie in ``[0, vocab_size)`` or equal ``ignore_index``.

    Concrete labels are checked on the host (one device-to-host copy) and raise ``ValueError`` at
    once, quoting the first bad label as given (a ``uint32`` label ``2**32 - 1`` as 4294967295).
    Traced labels (under ``jit``/``vmap``) cannot raise: the boolean mask of out-of-range
    positions is returned instead, for the caller to turn into NaN losses.

    Returns:
        None for concrete labels (all in range), else the ``labels.shape`` mask of bad positions.
    """
    if isinstance(labels, jax.core.Tracer):
        return out_of_range_labels(labels, vocab_size, ignore_index)
    values = np.asarray(labels)
    bad = out_of_range_labels(values, vocab_size, ignore_index)
    if bad.any():
        position = [int(i) for i in np.argwhere(bad)[0]]
        raise ValueError(label_range_message(int(values[tuple(position)]), position, vocab_size, ignore_index))
    return None


def checked_labels(
    labels: jax.Array, vocab: int, ignore_index: int, shift: int = 0
) -> tuple[jax.Array, jax.Array | None]:
    """Flat signed labels safe to index with, and the mask of out-of-range ones (None when concrete: those raise).

    The range is checked in the labels' own dtype first (:func:`out_of_range_labels`); only then
    are they widened to int32 (int64 for 64-bit labels), which is exact for every label that passed.
    Out-of-range traced labels reach the implementation as an in-range label (nothing is read out of
    bounds); the ``bad`` mask then makes both their loss and their gradients NaN. With ``shift`` ``k``
    position ``t`` gets ``labels[..., t + k]`` and the last ``k`` positions ``ignore_index``.
    """
    index_dtype = jnp.dtype(jnp.int64 if jnp.dtype(labels.dtype).itemsize == 8 else jnp.int32)
    info = jnp.iinfo(index_dtype)
    check_ignore_index_fits(ignore_index, str(index_dtype), int(info.min), int(info.max))
    bad = check_label_range(labels, vocab, ignore_index)
    labels = labels.astype(index_dtype)
    if shift:
        labels = _shift_left(labels, shift, ignore_index)
        bad = None if bad is None else _shift_left(bad, shift, False)
    flat = labels.reshape(-1)
    if bad is None:
        return flat, None
    bad = bad.reshape(-1)
    return jnp.where(bad, 0 if ignore_index != 0 else vocab - 1, flat), bad


def _shift_left(x: jax.Array, shift: int, fill) -> jax.Array:
    """``x[..., t + shift]`` at position ``t``, ``fill`` at the last ``shift`` positions."""
    tail = jnp.full((*x.shape[:-1], shift), fill, x.dtype)
    return jnp.concatenate([x[..., shift:], tail], axis=-1)
