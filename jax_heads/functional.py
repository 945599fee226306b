"""``linear_cross_entropy`` for JAX: one entry point, a registry of implementations.

Implementations (``impl=``), each an :class:`~heads_common.registry.Implementation` record of
``REGISTRY`` with its own support check:

* ``"pallas"`` — GPU, our Pallas kernels (:mod:`jax_heads.pallas`, imported on first use); on CPU
  only in Pallas interpret mode (``interpret=True``, for tests). The only one with gradient
  filtering (a float ``filter_eps``). Reductions ``"sum"``/``"mean"`` form the gradients in the
  forward (:mod:`jax_heads.pallas.gradient_in_forward`) unless ``return_lse``, ``filter_eps`` or
  ``vocab_axis`` ask for the exact recomputing kernels.
* ``"chunked"`` — any backend, ``lax.scan`` over token chunks under ``jax.custom_vjp``.
* ``"reference"`` — materialised logits, float32 math; the test oracle. Named only.
* ``"fused"`` — reductions ``"sum"``/``"mean"`` only: gradients formed in the forward
  (:mod:`jax_heads.fused`), so no ``return_lse`` (its upstream is unknown then). Named only.

``impl=None`` picks the first record marked ``auto`` (``"pallas"``, then ``"chunked"``) that supports
the inputs and options; a named implementation that cannot run raises ``ValueError`` saying why,
never falling back silently. With ``mesh``/``vocab_axis`` the same records run per vocabulary shard
(:mod:`jax_heads.parallel`).

Labels out of range: concrete labels are checked on the host (``ValueError``, the message
``torch_heads`` gives). Under ``jit``/``vmap`` the labels are tracers and cannot raise: the loss
at each such position is NaN instead (so ``sum``/``mean`` are NaN too), its gradients are NaN as
well (never the gradient of another label, never a silent zero), and no implementation ever reads
out of bounds for it. Labels of any integer dtype are range-checked in that dtype before they are
widened, so an unsigned label never wraps onto ``ignore_index``.

Such a label poisons the whole ``d_weight`` of a training step, as does a counted token whose hidden
state is not finite — and so does a non-finite hidden state at an *ignored* token (padding): its
loss is 0 and its own gradient row 0, but ``0·NaN`` in ``Gᵀ·H`` makes ``d_weight`` NaN, as in
``torch_heads`` (zeroing such rows inside the op would cost a copy of ``hidden`` kept from the
forward to the backward, ``N·D`` elements; see ``docs/robustness.md``). Checked mode
(:mod:`jax_heads.checked`) finds all of them under ``jit``: :func:`~jax_heads.checked.invalid_tokens`
(a mask, to skip the step on device) and :func:`~jax_heads.checked.check_inputs` (``checkify``
errors naming the first such token).

Every implementation runs compiled (one ``jax.jit`` per implementation, options and shapes), so
an eager call costs what a call under ``jit`` does. ``docs/robustness.md`` lists every bad input
and edge case and its answer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from heads_common import (
    LM_IGNORE_INDEX,
    check_filter_eps,
    check_ignore_index,
    check_interpret,
    check_lce_shapes,
    check_reduction,
)
from heads_common.options import (
    check_bias_shape,
    check_label_smoothing,
    check_lse_square_scale,
    check_return_lse,
    check_shift,
    check_shift_fits,
    check_softcap,
    filter_smoothing_message,
)
from heads_common.registry import LOSS_OPTIONS, Implementation, LossOptions, Registry
from jax_heads.chunked import chunked_loss
from jax_heads.labels import checked_labels
from jax_heads.reduction import finish_loss, nan_where_infinite
from jax_heads.reference import reference_loss

FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))

Reduction = Literal["none", "sum", "mean"]


def _pallas_reason(hidden: jax.Array, options: LossOptions) -> str | None:
    if options.filtered and options.sharding is not None:
        return f"gradient filtering (filter_eps={options.filter_eps}) is not supported with vocab_axis"
    try:
        from jax_heads.pallas import unsupported_reason
    except ImportError as exc:  # pragma: no cover - depends on the checkout
        return f"jax_heads.pallas is not importable ({exc})"
    if options.filtered and options.label_smoothing:
        return filter_smoothing_message(options.filter_eps)
    return unsupported_reason(hidden, interpret=options.interpret)


def _exact_reason(hidden: jax.Array, options: LossOptions) -> str | None:
    if options.filtered:
        return (f"computes exact gradients only (filter_eps={options.filter_eps} asks for gradient filtering, "
                "which needs impl='pallas')")
    return None


def _fused_reason(hidden: jax.Array, options: LossOptions) -> str | None:
    from jax_heads.fused import REDUCTIONS as FUSED_REDUCTIONS

    if options.reduction not in FUSED_REDUCTIONS:
        return (f"forms the gradients in the forward and needs a uniform upstream gradient: reduction in "
                f"{FUSED_REDUCTIONS}, got {options.reduction!r}")
    if options.sharding is not None:
        return "has no vocabulary-parallel form; pass impl='pallas' or 'chunked' with vocab_axis"
    return _exact_reason(hidden, options)


def _pallas_tokens(hidden, weight, labels, options: LossOptions, bias):
    from jax_heads.pallas import pallas_loss

    eps = options.filter_eps if options.filtered else None
    # Labels reach here in [0, V) or equal to ignore_index (see linear_cross_entropy), so int32 is exact.
    return pallas_loss(hidden, weight, labels.astype(jnp.int32), options.ignore_index, interpret=options.interpret,
                       filter_eps=eps, bias=bias, softcap=options.softcap, label_smoothing=options.label_smoothing,
                       lse_square_scale=options.lse_square_scale, return_lse=options.return_lse)


def _per_token(name: str, single: Callable[..., jax.Array]):
    """The registry's loss function of a per-token implementation: single-device or sharded, then
    :func:`finish_loss` (NaN rows, reduction). ``single(hidden, weight, labels, options, bias)``
    returns the per-token loss, or ``(loss, lse)`` when ``options.return_lse``."""

    def loss(hidden, weight, labels, options: LossOptions, *, bias=None, bad=None):
        if options.sharding is None:
            out = single(hidden, weight, labels, options, bias)
        else:
            from jax_heads.parallel import sharded_loss

            out = sharded_loss(hidden, weight, labels, options, name, bias)
        per_token, lse = out if options.return_lse else (out, None)
        valid = labels != options.ignore_index
        loss = finish_loss(per_token, valid, bad, options.reduction)
        if lse is None:
            return loss
        return loss, (lse if bad is None else lse * jnp.where(bad, jnp.nan, 1.0))

    return loss


def _reference_tokens(hidden, weight, labels, o: LossOptions, bias):
    loss, lse = reference_loss(
        hidden, weight, labels, o.ignore_index, bias, softcap=o.softcap, label_smoothing=o.label_smoothing,
        lse_square_scale=o.lse_square_scale,
    )
    return (loss, lse) if o.return_lse else loss


def _chunked_tokens(hidden, weight, labels, o: LossOptions, bias):
    return chunked_loss(
        hidden, weight, labels, o.ignore_index, bias=bias, softcap=o.softcap, label_smoothing=o.label_smoothing,
        lse_square_scale=o.lse_square_scale, return_lse=o.return_lse,
    )


def _fused(hidden, weight, labels, options: LossOptions, *, bias=None, bad=None):
    from jax_heads.fused import fused_loss

    # Out-of-range labels: NaN loss and NaN gradient rows there only (the other rows exact).
    return nan_where_infinite(fused_loss(
        hidden, weight, labels, options.ignore_index, options.reduction, bias=bias, softcap=options.softcap,
        label_smoothing=options.label_smoothing, lse_square_scale=options.lse_square_scale, nan_rows=bad,
    ))


def _pallas(hidden, weight, labels, options: LossOptions, *, bias=None, bad=None):
    """The Pallas record: gradients in the forward for ``"sum"``/``"mean"``, else the per-token kernels."""
    from jax_heads.pallas.gradient_in_forward import gradient_in_forward_loss, uses_gradient_in_forward

    if not uses_gradient_in_forward(options):
        return _pallas_per_token(hidden, weight, labels, options, bias=bias, bad=bad)
    return nan_where_infinite(gradient_in_forward_loss(
        hidden, weight, labels.astype(jnp.int32), options.ignore_index, options.reduction, bias=bias,
        softcap=options.softcap, label_smoothing=options.label_smoothing,
        lse_square_scale=options.lse_square_scale, interpret=options.interpret, nan_rows=bad,
    ))


_pallas_per_token = _per_token("pallas", _pallas_tokens)
REGISTRY = Registry([
    Implementation("pallas", _pallas_reason, _pallas, options=frozenset(LOSS_OPTIONS)),
    Implementation("chunked", _exact_reason, _per_token("chunked", _chunked_tokens), options=frozenset(LOSS_OPTIONS)),
    Implementation("reference", _exact_reason, _per_token("reference", _reference_tokens), auto=False,
                   options=frozenset(LOSS_OPTIONS)),
    # No return_lse: fused forms the gradients in the forward, before the lse's upstream is known.
    Implementation("fused", _fused_reason, _fused, auto=False,
                   options=frozenset({"bias", "softcap", "label_smoothing", "lse_square_scale"})),
])
IMPLEMENTATIONS = REGISTRY.names


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


@dataclasses.dataclass(frozen=True)
class VocabSharding:
    """A vocabulary-parallel call: the weight split along the vocabulary over ``mesh[vocab_axis]``,
    the tokens over ``mesh[batch_axis]`` (or not split, None)."""

    mesh: Mesh
    vocab_axis: str
    batch_axis: str | None = None


def check_mesh_options(mesh: object, vocab_axis: object, batch_axis: object) -> VocabSharding | None:
    """The :class:`VocabSharding` the options ask for, or None for a single-device call.

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
        return None
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    return VocabSharding(mesh, vocab_axis, batch_axis)


def loss_options(
    impl: object,
    *,
    ignore_index: object = LM_IGNORE_INDEX,
    reduction: object = "none",
    filter_eps: object = None,
    interpret: object = False,
    mesh: object = None,
    vocab_axis: object = None,
    batch_axis: object = None,
    softcap: object = None,
    label_smoothing: object = 0.0,
    lse_square_scale: object = 0.0,
    shift: object = 0,
    return_lse: object = False,
    has_bias: bool = False,
) -> LossOptions:
    """Validate the options of :func:`linear_cross_entropy` into a :class:`~heads_common.registry.LossOptions`.

    Raises:
        TypeError, ValueError: as :func:`linear_cross_entropy` documents.
    """
    check_interpret(interpret, impl, REGISTRY.check_name)
    return LossOptions(
        ignore_index=check_ignore_index(ignore_index),
        reduction=check_reduction(reduction),
        filter_eps=check_filter_eps(filter_eps),
        interpret=interpret,
        sharding=check_mesh_options(mesh, vocab_axis, batch_axis),
        softcap=check_softcap(softcap),
        label_smoothing=check_label_smoothing(label_smoothing),
        lse_square_scale=check_lse_square_scale(lse_square_scale),
        shift=check_shift(shift),
        return_lse=check_return_lse(return_lse),
        has_bias=has_bias,
    )


def select_implementation(hidden: jax.Array, impl: str | None, interpret: bool = False, **options) -> str:
    """The implementation that will run for ``hidden`` (and a weight of its dtype and device).

    Args:
        hidden: the hidden states (concrete or traced; a tracer is judged by the default backend).
        impl: a name of ``IMPLEMENTATIONS`` or None for the best available.
        interpret: run ``"pallas"`` in Pallas interpret mode; only with ``impl="pallas"``.
        **options: the other keyword options of :func:`linear_cross_entropy` (``reduction``,
            ``filter_eps``, ``mesh``, ``vocab_axis``, ``batch_axis``, ``ignore_index``).

    Raises:
        ValueError: ``impl`` is unknown, ``interpret=True`` with another ``impl``, or it (or, with
            ``impl=None``, every candidate) cannot run.
    """
    return REGISTRY.choose(impl, hidden, loss_options(impl, interpret=interpret, **options)).name


def linear_cross_entropy(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    *,
    bias: jax.Array | None = None,
    ignore_index: int = LM_IGNORE_INDEX,
    reduction: Reduction = "none",
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    shift: bool | int = 0,
    return_lse: bool = False,
    impl: str | None = None,
    interpret: bool = False,
    mesh: Mesh | None = None,
    vocab_axis: str | None = None,
    batch_axis: str | None = None,
    filter_eps: float | Literal["auto"] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
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
        bias: None or ``(V,)`` of the weight's dtype, added to the logits first; differentiable.
        ignore_index: label value that contributes loss 0 and gradient 0.
        reduction: ``"none"`` (per-token loss, shape of ``labels``), ``"sum"`` or ``"mean"``
            (mean over non-ignored tokens; 0 when every label is ignored).
        softcap: None or ``c > 0``: logits become ``c·tanh(logits / c)`` (after the bias).
        label_smoothing: ``ε`` in ``[0, 1)``: per counted token
            ``(1 − ε)·nll + ε·(lse − mean over V of the logits)``.
        lse_square_scale: ``λ >= 0``: adds ``λ·lse²`` per counted token (z-loss).
        shift: ``k >= 0`` (``True`` is 1): hidden position ``t`` predicts ``labels[..., t + k]`` (the
            labels are shifted, the hidden states are not copied); with ``"none"`` the loss has the
            shape of ``labels[..., k:]``. ``k`` must be smaller than the labels' last dimension.
        return_lse: also return the per-token log-sum-exp (float32, the per-token loss's shape
            whatever the reduction, 0 where ignored; differentiable).
        impl: ``"pallas"``, ``"chunked"``, ``"reference"`` or None for the best available (with
            ``vocab_axis``: the per-shard computation, same names and default). ``"fused"``
            (reductions ``"sum"``/``"mean"`` only, no ``return_lse``, never chosen by None): the
            gradients are formed during the forward pass (6·N·D·V FLOPs instead of 8, all cuBLAS products;
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
        float32 loss (float64 for float64 inputs): shape ``labels.shape`` (``labels[..., k:].shape``
        with ``shift``) for ``"none"``, else a scalar; with ``return_lse``, ``(loss, lse)``.
        Gradients with respect to ``hidden`` and ``weight`` come back in their dtype. Under a
        transformation, the loss at an out-of-range label is NaN (see the module docstring). A
        counted token whose hidden state holds inf or NaN gets a NaN loss (and NaN gradients); the
        other tokens' losses and ``hidden`` gradients are unaffected. A non-finite hidden state at
        an ignored token gives loss 0 there but a NaN ``d_weight`` (module docstring).

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
    _check_bias(bias, weight)
    options = loss_options(
        impl, ignore_index=ignore_index, reduction=reduction, filter_eps=filter_eps, interpret=interpret,
        mesh=mesh, vocab_axis=vocab_axis, batch_axis=batch_axis, softcap=softcap, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale, shift=shift, return_lse=return_lse, has_bias=bias is not None,
    )
    check_shift_fits(options.shift, labels.shape)
    if options.sharding is not None:
        from jax_heads.parallel import check_mesh_layout

        s = options.sharding
        check_mesh_layout(weight.shape[0], math.prod(hidden.shape[:-1]), s.mesh, s.vocab_axis, s.batch_axis)
    implementation = REGISTRY.choose(impl, hidden, options)

    flat_labels, bad = checked_labels(labels, weight.shape[0], options.ignore_index, options.shift)
    out = _compiled_loss(implementation, options, hidden, weight, flat_labels, bias, bad)
    loss, lse = out if options.return_lse else (out, None)
    if reduction == "none":
        loss = _unshift(loss.reshape(labels.shape), options.shift)
    if lse is None:
        return loss
    return loss, _unshift(lse.reshape(labels.shape), options.shift)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _compiled_loss(implementation: Implementation, options: LossOptions, hidden, weight, labels, bias, bad):
    """``implementation.loss`` on ``hidden`` flattened to ``(N, D)``, compiled once per implementation,
    options, shapes and dtypes: an eager call costs what a call under ``jit`` does (no op-by-op
    dispatch, no retracing of the implementation's loops).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return implementation.loss(hidden, weight, labels, options, bias=bias, bad=bad)


def _check_bias(bias: object, weight: jax.Array) -> None:
    if bias is None:
        return
    if not isinstance(bias, jax.Array):
        raise TypeError(f"bias must be a jax.Array or None, got {type(bias).__name__}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must equal the weight dtype {weight.dtype}")
    check_bias_shape(bias.shape, weight.shape[0])


def _unshift(x: jax.Array, shift: int) -> jax.Array:
    """The positions that have a target under ``shift``: ``x[..., :S - shift]``."""
    return x[..., : x.shape[-1] - shift] if shift else x
