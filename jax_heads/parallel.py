"""Vocabulary-parallel linear cross-entropy on a JAX mesh (``shard_map`` + collectives).

The weight ``(V, D)`` is split along the vocabulary over one mesh axis (``vocab_axis``); hidden
states and labels may be split along the tokens over another (``batch_axis``, data parallel) and
are replicated over the vocabulary axis. Each device works on its own weight shard only:

* forward: the shard's per-token partial log-sum-exp ``lse_k`` and target logit (0 where the label
  lies in another shard), then ``lse = m + log(psum(exp(lse_k - m)))`` with ``m = pmax(lse_k)``
  and ``target = psum(target_k)`` over ``vocab_axis``;
* backward: the shard's gradient logits ``g·(exp(logits − lse) − onehot)`` against the *global*
  ``lse``, giving the shard's own ``d_weight`` (summed over ``batch_axis``) and a partial
  ``d_hidden`` summed over ``vocab_axis``.

The loss options: the bias is split with the weight (each device adds and differentiates its own
slice); soft-capping is elementwise, so each shard caps its own logits; label smoothing's row sum
of the logits is a ``psum`` of the shards' row sums; the z-loss and the per-row gradient
coefficients ``(A, B, C)`` (:func:`jax_heads.reference.grad_coefficients`) come from the global
``lse`` and the global ``V``; ``d_bias`` stays per shard like ``d_weight``.

The per-shard work runs on the same building blocks as the single-device implementations: the
Pallas kernels (``impl="pallas"``, GPU; ``interpret=True`` on CPU), the chunked XLA loop
(``impl="chunked"``, any backend) or materialised shard logits (``impl="reference"``). No
``(tokens × V_shard)`` array exists on any device with ``"pallas"`` or ``"chunked"``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from heads_common import LM_IGNORE_INDEX
from heads_common.registry import LossOptions
from jax_heads import pallas
from jax_heads.chunked import chunk_rows_for, chunked_grads, chunked_lse_target, logit_grads
from jax_heads.reference import PRECISION, grad_coefficients, loss_terms, math_dtype, transform_logits

PARALLEL_IMPLEMENTATIONS = ("pallas", "chunked", "reference")


# ------------------------------------------------------------------------------------------
# Per-shard building blocks: labels are shard-local (outside [0, V_shard): no target in this shard)
# ------------------------------------------------------------------------------------------


def _reference_logits(h, w, b, o):
    logits = jnp.dot(h, w.T, preferred_element_type=jnp.float32, precision=PRECISION)
    return transform_logits(logits, b, o.softcap)


def _reference_parts(h, w, b, local_labels, o):
    logits = _reference_logits(h, w, b, o)
    in_shard = (local_labels >= 0) & (local_labels < w.shape[0])
    idx = jnp.clip(local_labels, 0, w.shape[0] - 1)
    target = jnp.where(in_shard, jnp.take_along_axis(logits, idx[:, None], axis=1)[:, 0], 0.0)
    row_sum = jnp.sum(logits, axis=-1) if o.label_smoothing else None
    return jax.nn.logsumexp(logits, axis=-1), target, row_sum


def _reference_grads(h, w, b, local_labels, lse, coefficients, o):
    logits = _reference_logits(h, w, b, o)
    onehot = local_labels[:, None] == jnp.arange(w.shape[0])[None, :]
    grad_logits = logit_grads(logits, lse, onehot, coefficients, o.softcap)
    d_h = jnp.dot(grad_logits, w.astype(jnp.float32), precision=PRECISION)
    d_w = jnp.dot(grad_logits.T, h.astype(jnp.float32), precision=PRECISION)
    d_b = None if b is None else jnp.sum(grad_logits, axis=0).astype(b.dtype)
    return d_h.astype(h.dtype), d_w.astype(w.dtype), d_b


def _chunk_rows(h, w):
    return max(1, min(chunk_rows_for(w.shape[0], math_dtype(h.dtype).itemsize), h.shape[0]))


def _chunked_parts(h, w, b, local_labels, o):
    return chunked_lse_target(
        h, w, _outside_to_minus_one(local_labels, w.shape[0]), _chunk_rows(h, w), bias=b, softcap=o.softcap,
        row_sum=bool(o.label_smoothing),
    )


def _chunked_grads(h, w, b, local_labels, lse, coefficients, o):
    return chunked_grads(
        h, w, _outside_to_minus_one(local_labels, w.shape[0]), lse, coefficients, _chunk_rows(h, w), bias=b,
        softcap=o.softcap,
    )


def _outside_to_minus_one(local_labels, v_shard):
    return jnp.where((local_labels >= 0) & (local_labels < v_shard), local_labels, -1).astype(jnp.int32)


def _parts(impl: str, interpret: bool):
    """``(parts, grads)`` of one shard: ``parts(h, w, b, local_labels, o) -> (lse_k, target_k, row_sum_k)``
    and ``grads(h, w, b, local_labels, lse, (A, B, C), o) -> (d_h, d_w, d_b)``."""
    if impl == "pallas":
        def parts(h, w, b, y, o):
            lse, target, *row_sum = pallas.lse_and_target(h, w, y, bias=b, softcap=o.softcap,
                                                          row_sum=bool(o.label_smoothing), interpret=interpret)
            return lse, target, (row_sum[0] if row_sum else None)

        def grads(h, w, b, y, lse, coefficients, o):
            a, b_coef, c = coefficients  # B is None only with the plain loss (then C is None too)
            d_h, d_w, *d_b = pallas.grads(h, w, y, lse, a, bias=b, softcap=o.softcap,
                                          coefficients=None if b_coef is None else (b_coef, c), interpret=interpret)
            return d_h, d_w, (d_b[0] if d_b else None)

        return parts, grads
    if impl == "chunked":
        return _chunked_parts, _chunked_grads
    return _reference_parts, _reference_grads


# ------------------------------------------------------------------------------------------
# The sharded op
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
    mesh: Mesh
    vocab_axis: str
    batch_axis: str | None
    ignore_index: int
    impl: str
    interpret: bool
    softcap: float | None = None
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    return_lse: bool = False


def _specs(o: _Options):
    tokens = P(o.batch_axis)
    return tokens, P(o.batch_axis, None), P(o.vocab_axis, None), P(o.vocab_axis)


def _local_labels(labels, v_shard, o: _Options):
    offset = lax.axis_index(o.vocab_axis) * v_shard
    valid = labels != o.ignore_index
    return jnp.where(valid, labels - offset, -1), valid


def _vocab_size(v_shard: int, o: _Options) -> int:
    return v_shard * o.mesh.shape[o.vocab_axis]


def _sharded_forward(hidden, weight, bias, labels, o: _Options):
    tokens, rows, vocab, bias_spec = _specs(o)
    parts, _ = _parts(o.impl, o.interpret)

    def local(h, w, b, y):
        local_y, valid = _local_labels(y, w.shape[0], o)
        lse_k, target_k, row_sum_k = parts(h, w, b, local_y, o)
        m = lax.pmax(lse_k, o.vocab_axis)
        lse = m + jnp.log(lax.psum(jnp.exp(lse_k - m), o.vocab_axis))
        target = lax.psum(target_k, o.vocab_axis)
        row_sum = None if row_sum_k is None else lax.psum(row_sum_k, o.vocab_axis)
        loss = loss_terms(lse, target, row_sum, _vocab_size(w.shape[0], o), o.label_smoothing, o.lse_square_scale)
        return jnp.where(valid, loss, 0.0), lse

    return jax.shard_map(
        local, mesh=o.mesh, in_specs=(rows, vocab, bias_spec, tokens), out_specs=(tokens, tokens), check_vma=False
    )(hidden, weight, bias, labels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _vocab_parallel(hidden, weight, bias, labels, o: _Options):
    return _fwd(hidden, weight, bias, labels, o)[0]


def _fwd(hidden, weight, bias, labels, o: _Options):
    loss, lse = _sharded_forward(hidden, weight, bias, labels, o)
    out = (loss, jnp.where(labels != o.ignore_index, lse, 0.0)) if o.return_lse else loss
    return out, (hidden, weight, bias, labels, lse)


def _bwd(o: _Options, residuals, cotangent):
    hidden, weight, bias, labels, lse = residuals
    grad_loss, grad_lse = cotangent if o.return_lse else (cotangent, None)
    tokens, rows, vocab, bias_spec = _specs(o)
    _, grads = _parts(o.impl, o.interpret)

    def local(h, w, b, y, lse, g, g_lse):
        local_y, valid = _local_labels(y, w.shape[0], o)
        # Ignored rows get zero gradient whatever the upstream holds, even NaN.
        g = jnp.where(valid, g.astype(jnp.float32), 0.0)
        g_lse = None if g_lse is None else jnp.where(valid, g_lse.astype(jnp.float32), 0.0)
        # (A, B, C) from the global lse and the global vocabulary size.
        coefficients = grad_coefficients(
            g, g_lse, lse, _vocab_size(w.shape[0], o), o.label_smoothing, o.lse_square_scale
        )
        d_h, d_w, d_b = grads(h, w, b, local_y, lse, coefficients, o)
        d_h = lax.psum(d_h.astype(jnp.float32), o.vocab_axis).astype(h.dtype)
        if o.batch_axis is not None:
            d_w = lax.psum(d_w.astype(jnp.float32), o.batch_axis).astype(w.dtype)
            if d_b is not None:
                d_b = lax.psum(d_b.astype(jnp.float32), o.batch_axis).astype(b.dtype)
        return d_h, d_w, d_b

    d_hidden, d_weight, d_bias = jax.shard_map(
        local, mesh=o.mesh, in_specs=(rows, vocab, bias_spec, tokens, tokens, tokens, tokens),
        out_specs=(rows, vocab, bias_spec), check_vma=False,
    )(hidden, weight, bias, labels, lse, grad_loss, grad_lse)
    return d_hidden, d_weight, d_bias, None


_vocab_parallel.defvjp(_fwd, _bwd)


def sharded_loss(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    options: LossOptions,
    impl: str,
    bias: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Per-token ``(N,)`` float32 loss of flat, validated inputs with ``options.sharding`` (a
    :class:`~jax_heads.functional.VocabSharding`), each shard on the building blocks of ``impl``
    (``"pallas"``, ``"chunked"`` or ``"reference"``); with ``options.return_lse``, ``(loss, lse)``.
    ``bias`` (None or ``(V,)``) is split with the weight. The registry of :mod:`jax_heads.functional`
    calls it; labels are in ``[0, V)`` or ``options.ignore_index``."""
    s = options.sharding
    o = _Options(
        s.mesh, s.vocab_axis, s.batch_axis, options.ignore_index, impl, options.interpret, options.softcap,
        options.label_smoothing, options.lse_square_scale, options.return_lse,
    )
    return _vocab_parallel(hidden, weight, bias, labels.astype(jnp.int32), o)


def vocab_parallel_linear_cross_entropy(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    *,
    mesh: Mesh,
    vocab_axis: str,
    batch_axis: str | None = None,
    bias: jax.Array | None = None,
    ignore_index: int = LM_IGNORE_INDEX,
    reduction: str = "none",
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    shift: bool | int = 0,
    return_lse: bool = False,
    impl: str | None = None,
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Linear cross-entropy with the weight split along the vocabulary over ``mesh[vocab_axis]``.

    The same call as ``jax_heads.linear_cross_entropy(..., mesh=mesh, vocab_axis=vocab_axis)`` on
    ``(N, D)`` hidden states.

    Args:
        hidden: ``(N, D)`` float array; split over ``batch_axis`` (if given), replicated over
            ``vocab_axis``.
        weight: ``(V, D)``, same dtype; split over ``vocab_axis`` in equal contiguous shards (device
            ``k`` of the axis holds rows ``k·V/n : (k+1)·V/n``). ``V`` must divide evenly.
        labels: ``(N,)`` integer global ids in ``[0, V)`` or ``ignore_index``.
        mesh: the device mesh.
        vocab_axis: mesh axis the vocabulary is split over.
        batch_axis: mesh axis the tokens are split over (data parallel), or None.
        bias: None or ``(V,)`` of the weight's dtype, split with the weight over ``vocab_axis``.
        ignore_index: label value with loss 0 and gradient 0.
        reduction: ``"none"`` (``(N,)``), ``"sum"`` or ``"mean"`` (over non-ignored tokens).
        softcap, label_smoothing, lse_square_scale, shift, return_lse: the loss options of
            ``jax_heads.linear_cross_entropy``: soft-capping per shard, the smoothing's row sum and
            the log-sum-exp combined over ``vocab_axis``, the z-loss from the global log-sum-exp.
            Every per-shard ``impl`` supports all of them.
        impl: per-shard computation: ``"pallas"`` (our kernels; GPU, or ``interpret=True``),
            ``"chunked"`` (XLA loop over token chunks, any backend) or ``"reference"``
            (materialises the shard's logits); None: ``"pallas"`` where it runs, else ``"chunked"``.
        interpret: run the Pallas kernels in interpret mode (CPU tests).

    Returns:
        float32 loss with the tokens' sharding; with ``return_lse``, ``(loss, lse)``. Gradients:
        ``d_weight`` and ``d_bias`` keep the weight's sharding (each device gets its own shard's
        gradient); ``d_hidden`` is complete on every device of the vocabulary axis.

    Raises:
        TypeError, ValueError: as ``jax_heads.linear_cross_entropy``; also for ``hidden`` that is not 2-D.
    """
    from jax_heads.functional import linear_cross_entropy

    if getattr(hidden, "ndim", None) != 2:
        shape = getattr(hidden, "shape", None)
        raise ValueError(f"hidden must be (N, D) for the vocabulary-parallel op, got shape {shape}")
    return linear_cross_entropy(
        hidden, weight, labels, mesh=mesh, vocab_axis=vocab_axis, batch_axis=batch_axis, bias=bias,
        ignore_index=ignore_index, reduction=reduction, softcap=softcap, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale, shift=shift, return_lse=return_lse, impl=impl, interpret=interpret,
    )


def check_mesh_layout(vocab_size: int, tokens: int, mesh: Mesh, vocab_axis: str, batch_axis: str | None) -> None:
    """The mesh axes exist and are distinct, and ``V`` (and the tokens, with ``batch_axis``) divide evenly."""
    for name, axis in (("vocab_axis", vocab_axis), ("batch_axis", batch_axis)):
        if axis is not None and axis not in mesh.axis_names:
            raise ValueError(f"{name}={axis!r} is not an axis of the mesh {mesh.axis_names}")
    if batch_axis == vocab_axis:
        raise ValueError("batch_axis and vocab_axis must be different mesh axes")
    shards = mesh.shape[vocab_axis]
    if vocab_size % shards:
        raise ValueError(f"vocabulary size {vocab_size} must divide evenly over {shards} devices of {vocab_axis!r}")
    if batch_axis is not None and tokens % mesh.shape[batch_axis]:
        raise ValueError(
            f"token count {tokens} must divide evenly over {mesh.shape[batch_axis]} devices of {batch_axis!r}"
        )


def shard_weight(weight: jax.Array, mesh: Mesh, vocab_axis: str) -> jax.Array:
    """Place a ``(V, D)`` weight on ``mesh`` split along the vocabulary over ``vocab_axis``."""
    return jax.device_put(weight, NamedSharding(mesh, P(vocab_axis, None)))
