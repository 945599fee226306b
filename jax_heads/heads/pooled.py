"""The pooled heads: ``ClassificationHead`` and ``EmbeddingHead`` (d9d layout), and their ``pool``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from heads_common import check_bool, check_dropout, check_hidden_size, check_mask_shape
from jax_heads.heads._common import check_hidden, linear, reset_linear


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
        self.score = linear(hidden_size, num_labels, param_dtype, rngs)
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
        hidden_states = pool(check_hidden(hidden_states, self._hidden_size), pooling_mask, num_selected)
        if deterministic is None and self.dropout.deterministic is None:
            raise ValueError(
                "ClassificationHead has no dropout mode: pass deterministic=True/False to the constructor "
                "or to the call, or call head.train() / head.eval()"
            )
        hidden_states = self.dropout(hidden_states, deterministic=deterministic, rngs=rngs)
        return self.score(hidden_states).astype(jnp.float32)

    def reset_parameters(self) -> None:
        """Re-initialise ``score`` as torch's ``nn.Linear`` does, from the module's stream."""
        reset_linear(self.score, self.rngs())


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
        self._normalize = check_bool(normalize, "normalize")
        if embedding_dim is None:
            self.projection = None
        else:
            self.projection = linear(hidden_size, check_hidden_size(embedding_dim, "embedding_dim"), param_dtype, rngs)
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
        hidden_states = pool(check_hidden(hidden_states, self._hidden_size), pooling_mask, num_selected)
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
            reset_linear(self.projection, self.rngs())
