"""``linear_cross_entropy`` for JAX: one entry point, a registry of implementations.

Implementations (``impl=``):

* ``"pallas"`` — GPU, our Pallas kernels (``jax_heads/pallas/``, imported on first use);
  on CPU only in Pallas interpret mode (``interpret=True``, for tests).
* ``"chunked"`` — any backend, ``lax.scan`` over token chunks under ``jax.custom_vjp``.
* ``"reference"`` — materialised logits, float32 math; the test oracle.

``impl=None`` picks the first of ``AUTO_ORDER`` that supports the inputs (``"pallas"`` on GPU,
``"chunked"`` elsewhere); a named implementation that cannot run raises ``ValueError`` saying why,
never falling back silently.

Labels out of range: concrete labels are checked on the host (``ValueError``, the message
``torch_heads`` gives). Under ``jit``/``vmap`` the labels are tracers and cannot raise: the loss
at each such position is NaN instead (so ``sum``/``mean`` are NaN too), its gradients are NaN as
well (never the gradient of another label, never a silent zero), and no implementation ever reads
out of bounds for it. ``docs/robustness.md`` lists every bad input and edge case and its answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from heads_common import (
    LM_IGNORE_INDEX,
    check_filter_eps,
    check_ignore_index,
    check_interpret,
    check_ignore_index_fits,
    check_lce_shapes,
    check_reduction,
    choose_implementation,
    label_range_message,
    unknown_impl_message,
)
from jax_heads.chunked import chunked_loss
from jax_heads.reference import reference_loss

FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))

Reduction = Literal["none", "sum", "mean"]


def _runs_anywhere(hidden: jax.Array, interpret: bool) -> str | None:
    return None


def _pallas_unsupported(hidden: jax.Array, interpret: bool) -> str | None:
    try:
        from jax_heads.pallas import unsupported_reason
    except ImportError as exc:  # pragma: no cover - depends on the checkout
        return f"jax_heads.pallas is not importable ({exc})"
    return unsupported_reason(hidden, interpret=interpret)


def _pallas_loss(hidden, weight, labels, ignore_index: int, interpret: bool, filter_eps: float | None = None):
    from jax_heads.pallas import pallas_loss

    # Labels reach here in [0, V) or equal to ignore_index (see linear_cross_entropy), so int32 is exact.
    return pallas_loss(hidden, weight, labels.astype(jnp.int32), ignore_index, interpret=interpret, filter_eps=filter_eps)


# name -> (why it cannot run on these inputs or None, flat per-token loss function)
_IMPLEMENTATIONS: dict[str, tuple[Callable[..., str | None], Callable[..., jax.Array]]] = {
    "pallas": (_pallas_unsupported, _pallas_loss),
    "chunked": (_runs_anywhere, lambda h, w, y, ignore_index, interpret: chunked_loss(h, w, y, ignore_index)),
    "reference": (_runs_anywhere, lambda h, w, y, ignore_index, interpret: reference_loss(h, w, y, ignore_index)),
}
AUTO_ORDER = ("pallas", "chunked")
IMPLEMENTATIONS = tuple(_IMPLEMENTATIONS)


def _check_arrays(hidden: object, weight: object, labels: object) -> None:
    # Unlike torch_heads there is no device check: JAX itself refuses arrays committed to different devices.
    for name, value in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(value, jax.Array):
            raise TypeError(f"{name} must be a jax.Array, got {type(value).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be a floating array of {[str(d) for d in FLOAT_DTYPES]}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be an integer array, got {labels.dtype}")


def widen_labels(labels: jax.Array) -> jax.Array:
    """Labels as a signed integer of at least 32 bits.

    JAX wraps a Python int that does not fit a narrow dtype (``int8`` labels are compared with
    507 as if it were -5), so narrow and unsigned labels are widened first. uint32/uint64 values past
    the signed range become negative, hence out of range, never a plausible label.
    """
    dtype = jnp.dtype(labels.dtype)
    if dtype.itemsize < 4 or jnp.issubdtype(dtype, jnp.unsignedinteger):
        return labels.astype(jnp.int64 if dtype.itemsize == 8 else jnp.int32)
    return labels


def check_label_range(labels: jax.Array, vocab_size: int, ignore_index: int) -> jax.Array | None:
    """Labels must lie in ``[0, vocab_size)`` or equal ``ignore_index``.

    Concrete labels are checked on the host (one device-to-host copy) and raise ``ValueError`` at
    once. Traced labels (under ``jit``/``vmap``) cannot raise: the boolean mask of out-of-range
    positions is returned instead, for the caller to turn into NaN losses.

    Returns:
        None for concrete labels (all in range), else the ``labels.shape`` mask of bad positions.
    """
    if isinstance(labels, jax.core.Tracer):
        return (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    values = np.asarray(labels)
    bad = (values != ignore_index) & ((values < 0) | (values >= vocab_size))
    if bad.any():
        position = [int(i) for i in np.argwhere(bad)[0]]
        raise ValueError(label_range_message(int(values[tuple(position)]), position, vocab_size, ignore_index))
    return None


def select_implementation(hidden: jax.Array, impl: str | None, interpret: bool = False) -> str:
    """The implementation that will run for ``hidden`` (and a weight of its dtype and device).

    Args:
        hidden: the hidden states (concrete or traced; a tracer is judged by the default backend).
        impl: a name of ``IMPLEMENTATIONS`` or None for the best available.
        interpret: run ``"pallas"`` in Pallas interpret mode; only with ``impl="pallas"``.

    Raises:
        ValueError: ``impl`` is unknown, ``interpret=True`` with another ``impl``, or it (or, with
            ``impl=None``, every candidate) cannot run.
    """
    check_interpret(interpret, impl, _check_known_impl)
    return choose_implementation(
        impl, IMPLEMENTATIONS, AUTO_ORDER, lambda name: _IMPLEMENTATIONS[name][0](hidden, interpret)
    )


def _check_known_impl(impl: object) -> None:
    if impl is not None and impl not in _IMPLEMENTATIONS:
        raise ValueError(unknown_impl_message(impl, IMPLEMENTATIONS))


def check_mesh_options(mesh: object, vocab_axis: object, batch_axis: object) -> bool:
    """Whether the options ask for a vocabulary-parallel call (``mesh`` and ``vocab_axis`` come together).

    Raises:
        TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
        ValueError: one of ``mesh``/``vocab_axis`` without the other, or ``batch_axis`` without them.
    """
    if (mesh is None) != (vocab_axis is None):
        given, missing = ("mesh", "vocab_axis") if vocab_axis is None else ("vocab_axis", "mesh")
        raise ValueError(f"{given} was given without {missing}: a vocabulary-parallel call needs both")
    if mesh is None:
        if batch_axis is not None:
            raise ValueError(f"batch_axis={batch_axis!r} needs mesh and vocab_axis (a vocabulary-parallel call)")
        return False
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    return True


def reduce_loss(loss: jax.Array, valid: jax.Array, reduction: str) -> jax.Array:
    """Apply ``reduction`` to a per-token loss; ``mean`` divides by the non-ignored count (0 if none)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / jnp.maximum(valid.sum(), 1).astype(total.dtype)


def linear_cross_entropy(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = LM_IGNORE_INDEX,
    reduction: Reduction = "none",
    impl: str | None = None,
    interpret: bool = False,
    mesh: Mesh | None = None,
    vocab_axis: str | None = None,
    batch_axis: str | None = None,
    filter_eps: float | Literal["auto"] | None = None,
) -> jax.Array:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` without materialising the logits.

    Works eagerly and under ``jax.jit``, ``jax.vmap`` and ``jax.grad`` (``reduction``, ``impl``,
    ``ignore_index``, ``interpret`` and the mesh options are static). With ``mesh`` and
    ``vocab_axis``, the weight is split along the vocabulary over that mesh axis and each device
    works on its own shard (:func:`jax_heads.parallel.vocab_parallel_linear_cross_entropy`;
    not under ``vmap``).

    Args:
        hidden: ``(..., D)`` float16/bfloat16/float32/float64 array.
        weight: ``(V, D)`` array, same dtype as ``hidden``.
        labels: ``(...)`` integer array (``hidden.shape[:-1]``), values in ``[0, V)`` or ``ignore_index``.
        ignore_index: label value that contributes loss 0 and gradient 0.
        reduction: ``"none"`` (per-token loss, shape of ``labels``), ``"sum"`` or ``"mean"``
            (mean over non-ignored tokens; 0 when every label is ignored).
        impl: ``"pallas"``, ``"chunked"``, ``"reference"`` or None for the best available (with
            ``vocab_axis``: the per-shard computation, same names and default). ``"fused"``
            (reductions ``"sum"``/``"mean"`` only, never chosen by None): the gradients are formed
            during the forward pass (6·N·D·V FLOPs instead of 8, all cuBLAS products;
            :mod:`jax_heads.fused`), at the price of memory — a 512 MiB float32 logits chunk and a
            float32 ``(V, D)`` accumulator during the forward, and the two gradients kept from the
            forward to the backward. Any backend.
        interpret: run the ``"pallas"`` kernels in Pallas interpret mode (any backend, slow; for
            tests). Only valid with ``impl="pallas"``.
        mesh: the device mesh of a vocabulary-parallel call; give it with ``vocab_axis``.
        vocab_axis: mesh axis the weight's vocabulary is split over (``V`` must divide evenly);
            ``hidden`` and ``labels`` are replicated over it. None: the single-device op.
        batch_axis: mesh axis the tokens are split over (data parallel; the flattened token count
            must divide evenly), or None. Only with ``vocab_axis``.
        filter_eps: None or ``"auto"`` (the default of every implementation here): exact
            gradients. A float in (0, 1): gradient filtering in the ``"pallas"`` backward (tiles
            whose ``|softmax − onehot|`` stays below it are skipped, as cut-cross-entropy does;
            its default is 2⁻¹² for bfloat16); needs ``impl="pallas"`` (or None where Pallas runs),
            not with ``vocab_axis``. The loss is unchanged.

    Returns:
        float32 loss (float64 for float64 inputs): shape ``labels.shape`` for ``"none"``, else a scalar.
        Gradients with respect to ``hidden`` and ``weight`` come back in their dtype. Under a
        transformation, the loss at an out-of-range label is NaN (see the module docstring). A
        token whose hidden state holds inf or NaN gets a NaN loss (and NaN gradients); the other
        tokens' losses and ``hidden`` gradients are unaffected.

    Raises:
        TypeError: non-array inputs, a non-float ``hidden``, mismatched dtypes, non-integer labels.
        ValueError: shape mismatch, concrete labels out of range, bad ``reduction``, an ``impl``
            that is unknown or cannot run on these inputs, mesh options given without one another
            or not fitting the mesh and shapes.

    Example:
        >>> h = jax.random.normal(jax.random.key(0), (2, 5, 16))
        >>> w = jax.random.normal(jax.random.key(1), (100, 16))
        >>> y = jax.random.randint(jax.random.key(2), (2, 5), 0, 100)
        >>> loss, (dh, dw) = jax.value_and_grad(
        ...     lambda h, w: linear_cross_entropy(h, w, y, reduction="mean"), argnums=(0, 1))(h, w)

        Vocabulary-parallel over a mesh axis ``"vocab"`` (the weight placed with
        :func:`jax_heads.parallel.shard_weight`)::

            loss = linear_cross_entropy(h, w_sharded, y, mesh=mesh, vocab_axis="vocab", reduction="mean")
    """
    _check_arrays(hidden, weight, labels)
    check_lce_shapes(hidden.shape, weight.shape, labels.shape)
    check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    parallel = check_mesh_options(mesh, vocab_axis, batch_axis)
    fused = impl == "fused"
    if fused:
        from jax_heads.fused import REDUCTIONS as FUSED_REDUCTIONS

        if reduction not in FUSED_REDUCTIONS:
            raise ValueError(
                f"impl='fused' forms the gradients in the forward and needs a uniform upstream gradient: "
                f"reduction in {FUSED_REDUCTIONS}, got {reduction!r}"
            )
        if parallel:
            raise ValueError("impl='fused' has no vocabulary-parallel form; pass impl='pallas' or 'chunked' with vocab_axis")
        check_interpret(interpret, impl)
    eps = check_filter_eps(filter_eps)
    eps = eps if isinstance(eps, float) else None
    if eps is not None:
        if parallel:
            raise ValueError(f"filter_eps={eps} (gradient filtering) is not supported with vocab_axis; pass None")
        if impl not in (None, "pallas"):  # "fused" included: its gradients are exact
            raise ValueError(
                f"impl={impl!r} computes exact gradients only (filter_eps={eps} asks for gradient filtering); "
                "gradient filtering needs impl='pallas'"
            )
        impl = "pallas"
    if fused:
        name = "fused"
    elif parallel:
        from jax_heads import parallel as vocab_parallel

        vocab_parallel.check_mesh_layout(weight.shape[0], math.prod(hidden.shape[:-1]), mesh, vocab_axis, batch_axis)
        name = vocab_parallel.select_parallel_implementation(hidden, impl, interpret)
    else:
        name = select_implementation(hidden, impl, interpret)
    vocab = weight.shape[0]
    labels = widen_labels(labels)
    info = jnp.iinfo(labels.dtype)
    check_ignore_index_fits(ignore_index, str(labels.dtype), int(info.min), int(info.max))
    bad = check_label_range(labels, vocab, ignore_index)

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if bad is not None:
        # Out-of-range labels reach the implementation as an in-range label (nothing is read out of
        # bounds); the NaN factor below then makes both their loss and their gradients NaN.
        bad = bad.reshape(-1)
        flat_labels = jnp.where(bad, 0 if ignore_index != 0 else vocab - 1, flat_labels)
    if fused:
        from jax_heads.fused import fused_loss

        # Out-of-range labels: NaN loss and NaN gradient rows there only (the other rows exact).
        loss = fused_loss(flat_hidden, weight, flat_labels, ignore_index, reduction, nan_rows=bad)
        return loss + jnp.where(jnp.isinf(loss), jnp.nan, 0.0)
    if parallel:
        loss = vocab_parallel.vocab_parallel_linear_cross_entropy(
            flat_hidden, weight, flat_labels, mesh=mesh, vocab_axis=vocab_axis, batch_axis=batch_axis,
            ignore_index=ignore_index, impl=name, interpret=interpret,
        )
    elif eps is not None:
        loss = _pallas_loss(flat_hidden, weight, flat_labels, ignore_index, interpret, filter_eps=eps)
    else:
        loss = _IMPLEMENTATIONS[name][1](flat_hidden, weight, flat_labels, ignore_index, interpret)
    if bad is not None:
        loss = loss * jnp.where(bad, jnp.nan, 1.0)
    # A row with non-finite logits (inf/NaN in its hidden state) is NaN in every implementation
    # (some log-sum-exps give inf there). Adding a constant keeps the gradient flowing unchanged.
    loss = loss + jnp.where(jnp.isinf(loss), jnp.nan, 0.0)
    loss = reduce_loss(loss, labels.reshape(-1) != ignore_index, reduction)
    return loss.reshape(labels.shape) if reduction == "none" else loss
