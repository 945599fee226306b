"""The d9d heads for Flax NNX: same class names and constructor arguments as ``torch_heads``.

Parameters are created eagerly from ``rngs`` with the distributions torch uses (bias-free linear
kernels uniform in ``±1/sqrt(in_features)``, embeddings standard normal), so both families start
from the same distribution. ``interop.porting`` moves weights between the two; it relies on the
layout documented on each class (an ``nnx.Linear`` kernel is ``(in, out)``, the transpose of
torch's ``(out, in)`` weight).

NNX conventions kept here: keyword-only ``rngs``; ``param_dtype`` where torch would use
``module.to(dtype)``; ``deterministic`` on the dropout, overridable per call, and
``module.train()`` / ``module.eval()``; ``reset_parameters()`` draws from a stream the module
keeps, so every call gives new weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from heads_common import (
    LM_IGNORE_INDEX,
    check_dropout,
    check_hidden_size,
    check_impl_name,
    check_interpret,
    check_mask_shape,
    check_split_config,
    token_id_range_message,
)
from jax_heads.functional import (
    IMPLEMENTATIONS,
    check_mesh_options,
    linear_cross_entropy,
    out_of_range_labels,
    select_implementation,
)
from jax_heads.reference import PRECISION

# torch's nn.Linear init, kaiming_uniform(a=sqrt(5)): uniform(-b, b) with b = sqrt(3 * (1/3) / fan_in).
TORCH_LINEAR_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# torch's nn.Embedding init: standard normal.
TORCH_EMBEDDING_INIT = nnx.initializers.normal(1.0)


def _linear(in_features: int, out_features: int, param_dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    # HIGHEST: true float32 products, as torch computes them (XLA's default may use tf32 on GPU).
    # Inputs and kernel of different dtypes are promoted, as in every nnx.Linear (torch would raise).
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=False,
        kernel_init=TORCH_LINEAR_INIT,
        param_dtype=param_dtype,
        precision=PRECISION,
        rngs=rngs,
    )


def _reset_linear(layer: nnx.Linear, key: jax.Array) -> None:
    kernel = layer.kernel[...]
    layer.kernel[...] = TORCH_LINEAR_INIT(key, kernel.shape, kernel.dtype)


def _check_hidden(hidden_states: object, hidden_size: int) -> jax.Array:
    if not isinstance(hidden_states, jax.Array):
        raise TypeError(f"hidden_states must be a jax.Array, got {type(hidden_states).__name__}")
    if not jnp.issubdtype(hidden_states.dtype, jnp.floating):
        raise TypeError(f"hidden_states must be a floating array, got {hidden_states.dtype}")
    if hidden_states.ndim < 1 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden size mismatch: expected hidden_states (..., {hidden_size}), got shape {tuple(hidden_states.shape)}"
        )
    return hidden_states


def pool(hidden_states: jax.Array, pooling_mask: jax.Array | None, num_selected: int | None = None) -> jax.Array:
    """``hidden_states[pooling_mask == 1]`` (rows selected, leading dims flattened), or unchanged if no mask.

    Eagerly the number of rows follows the data, as in torch. Under ``jit``/``vmap`` (a traced
    mask) the output shape must be static: pass ``num_selected=K`` to get exactly ``K`` rows, the
    first ``K`` where the mask is 1 in row-major order (``jnp.nonzero(size=K)``); if fewer rows are
    selected, the missing rows are NaN (never a plausible number).

    Args:
        hidden_states: ``(..., H)``.
        pooling_mask: None or a bool/integer array of shape ``hidden_states.shape[:-1]``.
        num_selected: None (data-dependent row count; concrete masks only) or a static ``K >= 0``.

    Returns:
        ``(K, H)`` for the ``K`` selected rows (K may be 0), or ``hidden_states`` itself.

    Raises:
        TypeError: a mask that is not a bool/integer ``jax.Array``, a non-int ``num_selected``.
        ValueError: a mask of the wrong shape, a negative ``num_selected``, ``num_selected`` without
            a mask, or a traced mask without ``num_selected``.
    """
    if pooling_mask is None:
        if num_selected is not None:
            raise ValueError(f"num_selected={num_selected} needs a pooling_mask")
        return hidden_states
    if not isinstance(pooling_mask, jax.Array):
        raise TypeError(f"pooling_mask must be a jax.Array or None, got {type(pooling_mask).__name__}")
    if not (jnp.issubdtype(pooling_mask.dtype, jnp.integer) or pooling_mask.dtype == jnp.bool_):
        raise TypeError(f"pooling_mask must be a bool or integer array, got {pooling_mask.dtype}")
    check_mask_shape(pooling_mask.shape, hidden_states.shape)
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    selected = (pooling_mask == 1).reshape(-1)
    if num_selected is None:
        if isinstance(pooling_mask, jax.core.Tracer):
            raise ValueError(
                "pooling_mask is traced (under jit/vmap), so hidden_states[pooling_mask == 1] has no static "
                "shape: pass num_selected=K (a Python int) to select the first K rows where the mask is 1"
            )
        return rows[selected]
    if isinstance(num_selected, bool) or not isinstance(num_selected, int):
        raise TypeError(f"num_selected must be an int or None, got {num_selected!r}")
    if num_selected < 0:
        raise ValueError(f"num_selected must be >= 0, got {num_selected}")
    (index,) = jnp.nonzero(selected, size=num_selected, fill_value=rows.shape[0])
    return jnp.take(rows, index, axis=0, mode="fill", fill_value=jnp.nan)


class ClassificationHead(nnx.Module):
    """Dropout then a bias-free linear ``score``, on all tokens or on those a pooling mask selects.

    Args:
        hidden_size: input size ``H``.
        num_labels: number of classes ``C``.
        dropout: dropout probability in ``[0, 1)``.
        rngs: parameter initialisation, the dropout stream and the stream ``reset_parameters`` uses.
        deterministic: dropout mode; False (training, as a new torch module) by default, None to
            require it at each call. ``train()``/``eval()`` set it.
        param_dtype: dtype of the ``score`` kernel.

    Parameters: ``score.kernel`` ``(H, C)`` (torch's ``score.weight`` transposed).

    Example:
        >>> head = ClassificationHead(64, 3, 0.1, rngs=nnx.Rngs(0))
        >>> head.eval()
        >>> logits = head(jnp.ones((2, 8, 64)), jnp.ones((2, 8), jnp.int32))  # (16, 3) float32
    """

    def __init__(
        self,
        hidden_size: int,
        num_labels: int,
        dropout: float,
        *,
        rngs: nnx.Rngs,
        deterministic: bool | None = False,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self._hidden_size = check_hidden_size(hidden_size)
        check_hidden_size(num_labels, "num_labels")
        self.dropout = nnx.Dropout(check_dropout(dropout), deterministic=deterministic, rngs=rngs)
        self.score = _linear(hidden_size, num_labels, param_dtype, rngs)
        self.rngs = rngs["params"].fork()

    def __call__(
        self,
        hidden_states: jax.Array,
        pooling_mask: jax.Array | None = None,
        *,
        num_selected: int | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """Class logits.

        Args:
            hidden_states: ``(..., H)`` floating array.
            pooling_mask: optional ``hidden_states.shape[:-1]`` mask; rows where it equals 1 are kept.
            num_selected: with a mask under ``jit``, the static number of rows to keep (see :func:`pool`).
            deterministic: overrides the module's dropout mode for this call.
            rngs: overrides the module's dropout stream for this call.

        Returns:
            float32 logits: ``(..., C)`` without a mask, ``(K, C)`` for ``K`` selected rows with one.
        """
        hidden_states = pool(_check_hidden(hidden_states, self._hidden_size), pooling_mask, num_selected)
        if deterministic is None and self.dropout.deterministic is None:
            raise ValueError(
                "ClassificationHead has no dropout mode: pass deterministic=True/False to the constructor "
                "or to the call, or call head.train() / head.eval()"
            )
        hidden_states = self.dropout(hidden_states, deterministic=deterministic, rngs=rngs)
        return self.score(hidden_states).astype(jnp.float32)

    def reset_parameters(self) -> None:
        """Re-initialise ``score`` as torch's ``nn.Linear`` does, from the module's stream."""
        _reset_linear(self.score, self.rngs())


class EmbeddingHead(nnx.Module):
    """Optional pooling, optional bias-free ``projection``, float32, optional L2 normalisation.

    Args:
        hidden_size: input size ``H``.
        embedding_dim: output size ``E``, or None for no projection (``E = H``).
        normalize: L2-normalise the last dimension.
        rngs: parameter initialisation and the stream ``reset_parameters`` uses.
        param_dtype: dtype of the ``projection`` kernel.

    Parameters: ``projection.kernel`` ``(H, E)`` when ``embedding_dim`` is given; none otherwise.

    Example:
        >>> head = EmbeddingHead(64, 32, True, rngs=nnx.Rngs(0))
        >>> emb = head(jnp.ones((2, 8, 64)))  # (2, 8, 32) float32, unit norm
    """

    def __init__(
        self,
        hidden_size: int,
        embedding_dim: int | None,
        normalize: bool,
        *,
        rngs: nnx.Rngs,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self._hidden_size = check_hidden_size(hidden_size)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {normalize!r}")
        self._normalize = normalize
        if embedding_dim is None:
            self.projection = None
        else:
            self.projection = _linear(hidden_size, check_hidden_size(embedding_dim, "embedding_dim"), param_dtype, rngs)
        self.rngs = rngs["params"].fork()

    def __call__(
        self, hidden_states: jax.Array, pooling_mask: jax.Array | None = None, *, num_selected: int | None = None
    ) -> jax.Array:
        """Embeddings.

        Args:
            hidden_states: ``(..., H)`` floating array.
            pooling_mask: optional ``hidden_states.shape[:-1]`` mask; rows where it equals 1 are kept.
            num_selected: with a mask under ``jit``, the static number of rows to keep (see :func:`pool`).

        Returns:
            float32 ``(..., E)`` (or ``(K, E)`` with a mask), unit L2 norm if ``normalize``.
        """
        hidden_states = pool(_check_hidden(hidden_states, self._hidden_size), pooling_mask, num_selected)
        if self.projection is not None:
            hidden_states = self.projection(hidden_states)
        hidden_states = hidden_states.astype(jnp.float32)
        if self._normalize:
            # torch's F.normalize: x / max(||x||, 1e-12). Clamping the squared norm keeps the
            # gradient finite at x = 0 (sqrt'(0) is infinite).
            norm = jnp.sqrt(jnp.maximum(jnp.sum(hidden_states * hidden_states, axis=-1, keepdims=True), 1e-24))
            hidden_states = hidden_states / norm
        return hidden_states

    def reset_parameters(self) -> None:
        """Re-initialise ``projection`` (if any) as torch's ``nn.Linear`` does."""
        if self.projection is not None:
            _reset_linear(self.projection, self.rngs())


class SplitLanguageModellingHead(nnx.Module):
    """Per-token cross-entropy over a vocabulary made of named splits, never materialising logits.

    One bias-free ``nnx.Linear(H, V_split)`` per split in ``lm_head``; the forward concatenates
    their kernels in ``split_order`` into one ``(V, H)`` matrix and calls :func:`linear_cross_entropy`.

    Vocabulary parallelism (``mesh`` and ``vocab_axis``): the concatenated weight is constrained to
    ``NamedSharding(mesh, P(vocab_axis, None))`` and the loss runs on each device's vocabulary shard
    (:func:`jax_heads.parallel.vocab_parallel_linear_cross_entropy`). The parameters stay whole
    kernels; where they live is the caller's choice, e.g. :meth:`shard_kernels`. A single-split head
    whose kernel is sharded ``P(None, vocab_axis)`` needs no communication to form the weight; with
    several splits XLA reshards their concatenation to the vocabulary split (the splits' boundaries
    are not the shards'). Unlike ``torch_heads`` (one process per device, each holding its rows),
    one JAX program sees the whole mesh, so the parameter shapes and d9d layout do not change.

    Args:
        split_vocab_size: split name -> vocabulary size.
        split_order: concatenation order; global label ids index the concatenation.
        hidden_size: input size ``H``.
        rngs: parameter initialisation and the stream ``reset_parameters`` uses.
        impl: ``linear_cross_entropy`` implementation (None: best available; with ``vocab_axis``,
            the per-shard computation).
        interpret: run ``impl="pallas"`` in Pallas interpret mode (tests on CPU).
        param_dtype: dtype of the kernels (hidden states must match it).
        mesh: device mesh of the vocabulary-parallel loss; give it with ``vocab_axis``.
        vocab_axis: mesh axis the vocabulary is split over (``V`` must divide evenly over it).
        batch_axis: mesh axis the tokens are split over (data parallel), or None.

    Parameters: ``lm_head[<split>].kernel`` ``(H, V_split)`` (torch's ``lm_head.<split>.weight``
    transposed).

    Raises (at construction, with the same text as ``torch_heads``): ``ValueError``/``TypeError``
    for a bad split configuration or split name (``heads_common.check_split_name``), an unknown
    ``impl`` (listing the known ones; with ``vocab_axis``, the per-shard ones), ``impl="fused"``
    (it needs a ``sum``/``mean`` reduction), or ``interpret=True`` with another ``impl``.

    Example:
        >>> head = SplitLanguageModellingHead({"text": 1000, "special": 4}, ["text", "special"], 64,
        ...                                   rngs=nnx.Rngs(0))
        >>> loss = head(jnp.ones((2, 8, 64)), jnp.zeros((2, 8), jnp.int32))  # (2, 8) float32

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
        known = tuple(dict.fromkeys((*IMPLEMENTATIONS, "fused")))
        if check_mesh_options(mesh, vocab_axis, batch_axis):
            from jax_heads.parallel import PARALLEL_IMPLEMENTATIONS, check_mesh_layout

            # The token count is only known per call; the vocabulary's fit is checked here.
            check_mesh_layout(self._layout.total, 0, mesh, vocab_axis, batch_axis)
            known = PARALLEL_IMPLEMENTATIONS
        check_interpret(interpret, impl, lambda name: check_impl_name(name, known))
        if impl == "fused":
            raise ValueError(
                "impl='fused' cannot run in the head: it forms the gradients in the forward and needs reduction "
                "'sum' or 'mean', while the head returns the per-token loss (reduction 'none')"
            )
        self.impl = impl
        self.interpret = interpret
        self.mesh = mesh
        self.vocab_axis = vocab_axis
        self.batch_axis = batch_axis
        self.lm_head = nnx.Dict(
            {name: _linear(hidden_size, size, param_dtype, rngs) for name, size in split_vocab_size.items()}
        )
        self.rngs = rngs["params"].fork()

    @property
    def vocab_size(self) -> int:
        return self._layout.total

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

    def __call__(self, hidden_states: jax.Array, labels: jax.Array) -> jax.Array:
        """Per-token loss.

        Args:
            hidden_states: ``(B, S, H)`` (any leading shape works) in the kernels' dtype.
            labels: ``(B, S)`` integer global ids in ``[0, V)`` or ``LM_IGNORE_INDEX``.

        Returns:
            ``(B, S)`` float32 loss, reduction none; 0 at ignored positions (NaN at out-of-range
            labels under ``jit``; eagerly they raise ``ValueError``).
        """
        _check_hidden(hidden_states, self._hidden_size)
        return linear_cross_entropy(
            hidden_states,
            self.weight(),
            labels,
            ignore_index=LM_IGNORE_INDEX,
            reduction="none",
            impl=self.impl,
            interpret=self.interpret,
            mesh=self.mesh,
            vocab_axis=self.vocab_axis,
            batch_axis=self.batch_axis,
        )

    def implementation_for(self, hidden_states: jax.Array) -> str:
        """The implementation the forward would run for these hidden states (per shard, with a mesh)."""
        return select_implementation(
            hidden_states, self.impl, self.interpret, mesh=self.mesh, vocab_axis=self.vocab_axis,
            batch_axis=self.batch_axis,
        )

    def shard_kernels(self) -> None:
        """Place each kernel ``(H, V_split)`` on the mesh, split along its vocabulary over ``vocab_axis``.

        A split whose size does not divide evenly over the axis is replicated instead.

        Raises:
            ValueError: the head has no ``mesh``/``vocab_axis``.
        """
        if self.vocab_axis is None:
            raise ValueError("shard_kernels needs a head built with mesh and vocab_axis")
        shards = self.mesh.shape[self.vocab_axis]
        for layer in self.lm_head.values():
            kernel = layer.kernel[...]
            spec = P(None, self.vocab_axis) if kernel.shape[1] % shards == 0 else P()
            layer.kernel[...] = jax.device_put(kernel, NamedSharding(self.mesh, spec))

    def reset_parameters(self) -> None:
        """Re-initialise every split as torch's ``nn.Linear`` does, from the module's stream."""
        for name in self._split_order:
            _reset_linear(self.lm_head[name], self.rngs())


class SplitTokenEmbeddings(nnx.Module):
    """Token embeddings over a vocabulary made of named splits (the LM head's input side).

    Args:
        split_vocab_size: split name -> vocabulary size.
        split_order: concatenation order; global ids map to splits as the LM head's labels do.
        hidden_size: embedding size ``H``.
        rngs: parameter initialisation and the stream ``reset_parameters`` uses.
        param_dtype: dtype of the embeddings.

    Parameters: ``token_embedding[<split>].embedding`` ``(V_split, H)`` (same layout as torch's
    ``token_embedding.<split>.weight``).

    Example:
        >>> emb = SplitTokenEmbeddings({"text": 1000, "special": 4}, ["text", "special"], 64, rngs=nnx.Rngs(0))
        >>> x = emb(jnp.array([[0, 1003]]))  # (1, 2, 64) float32
    """

    def __init__(
        self,
        split_vocab_size: dict[str, int],
        split_order: Sequence[str],
        hidden_size: int,
        *,
        rngs: nnx.Rngs,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self._layout = check_split_config(split_vocab_size, split_order)
        self._hidden_size = check_hidden_size(hidden_size)
        self._split_order = self._layout.order
        self.token_embedding = nnx.Dict(
            {
                name: nnx.Embed(
                    size, hidden_size, embedding_init=TORCH_EMBEDDING_INIT, param_dtype=param_dtype, rngs=rngs
                )
                for name, size in split_vocab_size.items()
            }
        )
        self.rngs = rngs["params"].fork()

    @property
    def vocab_size(self) -> int:
        return self._layout.total

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """Embed global token ids.

        Args:
            input_ids: integer array of any shape, values in ``[0, V)``.

        Returns:
            ``input_ids.shape + (H,)`` in the embedding dtype. Under ``jit``/``vmap`` an id outside
            ``[0, V)`` gives a NaN row (never another token's row, never an out-of-bounds read).

        Raises:
            ValueError: a concrete id outside ``[0, V)``.
        """
        if not isinstance(input_ids, jax.Array):
            raise TypeError(f"input_ids must be a jax.Array, got {type(input_ids).__name__}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise TypeError(f"input_ids must be an integer array, got {input_ids.dtype}")
        vocab = self.vocab_size
        bad = out_of_range_labels(input_ids, vocab)  # in the ids' own dtype: a uint32 id never wraps
        if not isinstance(input_ids, jax.core.Tracer) and input_ids.size and bool(bad.any()):
            position = [int(i) for i in np.argwhere(np.asarray(bad))[0]]
            raise ValueError(token_id_range_message(int(input_ids[tuple(position)]), position, vocab))
        table = jnp.concatenate([self.token_embedding[name].embedding[...] for name in self._split_order], axis=0)
        rows = jnp.take(table, jnp.where(bad, 0, input_ids), axis=0)
        return jnp.where(bad[..., None], jnp.nan, rows)

    def reset_parameters(self) -> None:
        """Re-initialise every split as torch's ``nn.Embedding`` does (standard normal)."""
        for name in self._split_order:
            embedding = self.token_embedding[name].embedding
            value = embedding[...]
            embedding[...] = TORCH_EMBEDDING_INIT(self.rngs(), value.shape, value.dtype)
