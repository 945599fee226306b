"""``SplitLanguageModellingHead`` for Flax NNX: d9d's split-vocabulary LM head on :func:`linear_cross_entropy`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from heads_common import (
    LM_IGNORE_INDEX,
    check_hidden_size,
    check_impl_name,
    check_interpret,
    check_reduction,
    check_split_config,
)
from heads_common.options import check_head_bias, check_label_smoothing, check_lse_square_scale, check_softcap
from jax_heads.functional import IMPLEMENTATIONS, check_mesh_options, linear_cross_entropy, select_implementation
from jax_heads.heads._common import check_hidden, linear, reset_linear


class SplitLanguageModellingHead(nnx.Module):
    """Per-token cross-entropy over a vocabulary made of named splits, never materialising logits.

    One ``nnx.Linear(H, V_split)`` per split in ``lm_head`` (bias-free unless ``bias=True``); the
    forward concatenates their kernels (and biases) in ``split_order`` into one ``(V, H)`` matrix
    (and one ``(V,)`` vector) and calls :func:`linear_cross_entropy` with the head's loss options.

    Vocabulary parallelism (``mesh`` and ``vocab_axis``): the concatenated weight (and bias) is
    constrained to ``NamedSharding(mesh, P(vocab_axis, ...))`` and the loss runs on each device's
    vocabulary shard (:func:`jax_heads.parallel.vocab_parallel_linear_cross_entropy`). The
    parameters stay whole kernels; where they live is the caller's choice, e.g.
    :meth:`shard_kernels`. A single-split head whose kernel is sharded ``P(None, vocab_axis)`` needs
    no communication to form the weight; with several splits XLA reshards their concatenation to
    the vocabulary split (the splits' boundaries are not the shards'). Unlike ``torch_heads`` (one
    process per device, each holding its rows), one JAX program sees the whole mesh, so the
    parameter shapes and d9d layout do not change.

    Args:
        split_vocab_size: split name -> vocabulary size.
        split_order: concatenation order; global label ids index the concatenation.
        hidden_size: input size ``H``.
        rngs: parameter initialisation and the stream ``reset_parameters`` uses.
        bias: one learnable ``(V_split,)`` bias per split (the ``nnx.Linear``'s ``bias``, initialised
            as torch's ``nn.Linear`` bias), added to the logits.
        softcap: None or ``c > 0``: logits become ``c·tanh(logits / c)`` (after the bias).
        label_smoothing: ``ε`` in ``[0, 1)`` (``torch.nn.functional.cross_entropy``'s definition).
        lse_square_scale: ``λ >= 0``: adds ``λ·lse²`` per counted token (z-loss).
        reduction: ``"none"`` (d9d's per-token loss), ``"sum"`` or ``"mean"`` (over non-ignored tokens).
        impl: ``linear_cross_entropy`` implementation (None: best available that supports the
            options; with ``vocab_axis``, the per-shard computation). ``"fused"`` needs reduction
            ``"sum"`` or ``"mean"``.
        interpret: run ``impl="pallas"`` in Pallas interpret mode (tests on CPU).
        param_dtype: dtype of the kernels and biases (hidden states must match it).
        mesh: device mesh of the vocabulary-parallel loss; give it with ``vocab_axis``.
        vocab_axis: mesh axis the vocabulary is split over (``V`` must divide evenly over it).
        batch_axis: mesh axis the tokens are split over (data parallel), or None.

    Parameters: ``lm_head[<split>].kernel`` ``(H, V_split)`` (torch's ``lm_head.<split>.weight``
    transposed) and, with ``bias=True``, ``lm_head[<split>].bias`` ``(V_split,)`` (torch's
    ``lm_head.<split>.bias``).

    Raises (at construction, with the same text as ``torch_heads``): ``ValueError``/``TypeError``
    for a bad split configuration or split name (``heads_common.check_split_name``), an unknown
    ``impl`` (listing the known ones; with ``vocab_axis``, the per-shard ones), ``impl="fused"``
    with reduction ``"none"``, ``interpret=True`` with another ``impl``, a non-bool ``bias``, a bad
    ``softcap``/``label_smoothing``/``lse_square_scale`` (``heads_common.options``) or ``reduction``.
    An implementation that does not support an option set here refuses it, by name, at the call.

    Example:
        >>> head = SplitLanguageModellingHead({"text": 1000, "special": 4}, ["text", "special"], 64,
        ...                                   rngs=nnx.Rngs(0))
        >>> loss = head(jnp.ones((2, 8, 64)), jnp.zeros((2, 8), jnp.int32))  # (2, 8) float32

        Gemma-2's head (soft-capped logits), training on the mean loss::

            head = SplitLanguageModellingHead({"text": 256000}, ["text"], 2304, rngs=nnx.Rngs(0),
                                              softcap=30.0, reduction="mean")

        Vocabulary-parallel over the 4 devices of a ``("data", "vocab")`` mesh::

            mesh = jax.make_mesh((1, 4), ("data", "vocab"))
            head = SplitLanguageModellingHead({"text": 1024}, ["text"], 64, rngs=nnx.Rngs(0),
                                              mesh=mesh, vocab_axis="vocab")
            head.shard_kernels()
            loss = nnx.jit(lambda head, h, y: head(h, y).mean())(head, h, y)
    """

    def __init__(
        self,
        split_vocab_size: dict[str, int],
        split_order: Sequence[str],
        hidden_size: int,
        *,
        rngs: nnx.Rngs,
        bias: bool = False,
        softcap: float | None = None,
        label_smoothing: float = 0.0,
        lse_square_scale: float = 0.0,
        reduction: Literal["none", "sum", "mean"] = "none",
        impl: str | None = None,
        interpret: bool = False,
        param_dtype: jnp.dtype = jnp.float32,
        mesh: Mesh | None = None,
        vocab_axis: str | None = None,
        batch_axis: str | None = None,
    ):
        self._layout = check_split_config(split_vocab_size, split_order)
        self._hidden_size = check_hidden_size(hidden_size)
        self._split_order = self._layout.order
        self._has_bias = check_head_bias(bias)
        self.softcap = check_softcap(softcap)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.lse_square_scale = check_lse_square_scale(lse_square_scale)
        self.reduction = check_reduction(reduction)
        known = tuple(dict.fromkeys((*IMPLEMENTATIONS, "fused")))
        if check_mesh_options(mesh, vocab_axis, batch_axis):
            from jax_heads.parallel import PARALLEL_IMPLEMENTATIONS, check_mesh_layout

            # The token count is only known per call; the vocabulary's fit is checked here.
            check_mesh_layout(self._layout.total, 0, mesh, vocab_axis, batch_axis)
            known = PARALLEL_IMPLEMENTATIONS
        check_interpret(interpret, impl, lambda name: check_impl_name(name, known))
        if impl == "fused" and self.reduction == "none":
            raise ValueError(
                "impl='fused' cannot run in the head: it forms the gradients in the forward and needs reduction "
                "'sum' or 'mean', while this head returns the per-token loss (reduction 'none')"
            )
        self.impl = impl
        self.interpret = interpret
        self.mesh = mesh
        self.vocab_axis = vocab_axis
        self.batch_axis = batch_axis
        self.lm_head = nnx.Dict(
            {
                name: linear(hidden_size, size, param_dtype, rngs, use_bias=bias)
                for name, size in split_vocab_size.items()
            }
        )
        self.rngs = rngs["params"].fork()

    @property
    def vocab_size(self) -> int:
        return self._layout.total

    @property
    def has_bias(self) -> bool:
        """Whether the head was built with ``bias=True`` (one bias per split)."""
        return self._has_bias

    def weight(self) -> jax.Array:
        """The ``(V, H)`` concatenation of the split kernels in ``split_order`` (differentiable).

        A copy of the whole weight per call (as ``torch.cat`` is in ``torch_heads``): the kernels
        are stored per split and ``(H, V_split)``, while the op takes one ``(V, H)`` matrix. With
        ``vocab_axis`` it is constrained to the vocabulary split over the mesh.
        """
        weight = jnp.concatenate([self.lm_head[name].kernel[...] for name in self._split_order], axis=1).T
        if self.vocab_axis is not None:
            weight = jax.lax.with_sharding_constraint(weight, NamedSharding(self.mesh, P(self.vocab_axis, None)))
        return weight

    def bias(self) -> jax.Array | None:
        """The ``(V,)`` concatenation of the split biases in ``split_order`` (differentiable), or None
        without ``bias=True``. With ``vocab_axis`` it is constrained to the vocabulary split, as :meth:`weight`."""
        if not self._has_bias:
            return None
        bias = jnp.concatenate([self.lm_head[name].bias[...] for name in self._split_order])
        if self.vocab_axis is not None:
            bias = jax.lax.with_sharding_constraint(bias, NamedSharding(self.mesh, P(self.vocab_axis)))
        return bias

    def __call__(self, hidden_states: jax.Array, labels: jax.Array) -> jax.Array:
        """The loss, with the head's options and reduction.

        Args:
            hidden_states: ``(B, S, H)`` (any leading shape works) in the kernels' dtype.
            labels: ``(B, S)`` integer global ids in ``[0, V)`` or ``LM_IGNORE_INDEX``.

        Returns:
            float32: the ``(B, S)`` per-token loss for reduction ``"none"`` (0 at ignored positions),
            else a scalar. NaN at out-of-range labels under ``jit`` (eagerly they raise ``ValueError``).
        """
        check_hidden(hidden_states, self._hidden_size)
        return linear_cross_entropy(
            hidden_states,
            self.weight(),
            labels,
            bias=self.bias(),
            ignore_index=LM_IGNORE_INDEX,
            reduction=self.reduction,
            softcap=self.softcap,
            label_smoothing=self.label_smoothing,
            lse_square_scale=self.lse_square_scale,
            impl=self.impl,
            interpret=self.interpret,
            mesh=self.mesh,
            vocab_axis=self.vocab_axis,
            batch_axis=self.batch_axis,
        )

    def implementation_for(self, hidden_states: jax.Array) -> str:
        """The implementation the forward would run for these hidden states (per shard, with a mesh).

        Raises:
            ValueError: the named ``impl`` (or, for None, every candidate) cannot run with these
                inputs and the head's options, saying why.
        """
        return select_implementation(
            hidden_states, self.impl, self.interpret, reduction=self.reduction, softcap=self.softcap,
            label_smoothing=self.label_smoothing, lse_square_scale=self.lse_square_scale, has_bias=self._has_bias,
            mesh=self.mesh, vocab_axis=self.vocab_axis, batch_axis=self.batch_axis,
        )

    def shard_kernels(self) -> None:
        """Place each kernel ``(H, V_split)`` (and bias ``(V_split,)``) on the mesh, split along its
        vocabulary over ``vocab_axis``.

        A split whose size does not divide evenly over the axis is replicated instead.

        Raises:
            ValueError: the head has no ``mesh``/``vocab_axis``.
        """
        if self.vocab_axis is None:
            raise ValueError("shard_kernels needs a head built with mesh and vocab_axis")
        shards = self.mesh.shape[self.vocab_axis]
        for layer in self.lm_head.values():
            even = layer.kernel[...].shape[1] % shards == 0
            _place(layer.kernel, NamedSharding(self.mesh, P(None, self.vocab_axis) if even else P()))
            if layer.bias is not None:
                _place(layer.bias, NamedSharding(self.mesh, P(self.vocab_axis) if even else P()))

    def reset_parameters(self) -> None:
        """Re-initialise every split as torch's ``nn.Linear`` does, from the module's stream."""
        for name in self._split_order:
            reset_linear(self.lm_head[name], self.rngs())


def _place(variable: nnx.Variable, sharding: NamedSharding) -> None:
    """Put ``variable``'s array at ``sharding``: ``set_value`` replaces the array, where
    ``variable[...] = x`` would copy ``x`` into the array's old placement."""
    variable.set_value(jax.device_put(variable[...], sharding))
