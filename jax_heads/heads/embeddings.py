"""``SplitTokenEmbeddings``: token embeddings over a split vocabulary (d9d layout)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from heads_common import check_hidden_size, check_split_config, token_id_range_message
from jax_heads.heads._common import TORCH_EMBEDDING_INIT
from jax_heads.labels import out_of_range_labels


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
