"""The d9d heads for PyTorch: same class names, constructor arguments and ``state_dict`` keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from heads_common import (
    LM_IGNORE_INDEX,
    check_dropout,
    check_hidden_size,
    check_mask_shape,
    check_split_config,
    token_id_range_message,
)
from torch_heads.functional import linear_cross_entropy, select_implementation


def _check_hidden(hidden_states: object, hidden_size: int) -> torch.Tensor:
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be a floating tensor, got {hidden_states.dtype}")
    if hidden_states.ndim < 1 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden size mismatch: expected hidden_states (..., {hidden_size}), got shape {tuple(hidden_states.shape)}"
        )
    return hidden_states


def pool(hidden_states: torch.Tensor, pooling_mask: torch.Tensor | None) -> torch.Tensor:
    """``hidden_states[pooling_mask == 1]`` (rows selected, leading dims flattened), or unchanged if no mask.

    Args:
        hidden_states: ``(..., H)``.
        pooling_mask: None or an integer/bool tensor of shape ``hidden_states.shape[:-1]``.

    Returns:
        ``(K, H)`` for the ``K`` selected rows (K may be 0), or ``hidden_states`` itself.
    """
    if pooling_mask is None:
        return hidden_states
    if not isinstance(pooling_mask, torch.Tensor):
        raise TypeError(f"pooling_mask must be a torch.Tensor or None, got {type(pooling_mask).__name__}")
    if pooling_mask.is_floating_point() or pooling_mask.is_complex():
        raise TypeError(f"pooling_mask must be a bool or integer tensor, got {pooling_mask.dtype}")
    check_mask_shape(pooling_mask.shape, hidden_states.shape)
    return hidden_states[pooling_mask == 1]


class ClassificationHead(nn.Module):
    """Dropout then a bias-free linear ``score``, on all tokens or on those a pooling mask selects.

    Args:
        hidden_size: input size ``H``.
        num_labels: number of classes ``C``.
        dropout: dropout probability in ``[0, 1)``.

    ``state_dict`` keys: ``score.weight`` ``(C, H)``.
    """

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self._hidden_size = check_hidden_size(hidden_size)
        check_hidden_size(num_labels, "num_labels")
        self.dropout = nn.Dropout(check_dropout(dropout))
        self.score = nn.Linear(hidden_size, num_labels, bias=False)

    def forward(self, hidden_states: torch.Tensor, pooling_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits.

        Args:
            hidden_states: ``(..., H)`` floating tensor.
            pooling_mask: optional ``hidden_states.shape[:-1]`` mask; rows where it equals 1 are kept.

        Returns:
            float32 logits: ``(..., C)`` without a mask, ``(K, C)`` for ``K`` selected rows with one.
        """
        hidden_states = pool(_check_hidden(hidden_states, self._hidden_size), pooling_mask)
        return self.score(self.dropout(hidden_states)).float()

    def reset_parameters(self) -> None:
        """Re-initialise ``score`` as ``nn.Linear`` does."""
        self.score.reset_parameters()


class EmbeddingHead(nn.Module):
    """Optional pooling, optional bias-free ``projection``, float32, optional L2 normalisation.

    Args:
        hidden_size: input size ``H``.
        embedding_dim: output size ``E``, or None for no projection (``E = H``).
        normalize: L2-normalise the last dimension.

    ``state_dict`` keys: ``projection.weight`` ``(E, H)`` when ``embedding_dim`` is given; none otherwise.
    """

    def __init__(self, hidden_size: int, embedding_dim: int | None, normalize: bool):
        super().__init__()
        self._hidden_size = check_hidden_size(hidden_size)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {normalize!r}")
        self._normalize = normalize
        if embedding_dim is None:
            self.projection = None
        else:
            self.projection = nn.Linear(hidden_size, check_hidden_size(embedding_dim, "embedding_dim"), bias=False)

    def forward(self, hidden_states: torch.Tensor, pooling_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings.

        Args:
            hidden_states: ``(..., H)`` floating tensor.
            pooling_mask: optional ``hidden_states.shape[:-1]`` mask; rows where it equals 1 are kept.

        Returns:
            float32 ``(..., E)`` (or ``(K, E)`` with a mask), unit L2 norm if ``normalize``.
        """
        hidden_states = pool(_check_hidden(hidden_states, self._hidden_size), pooling_mask)
        if self.projection is not None:
            hidden_states = self.projection(hidden_states)
        hidden_states = hidden_states.float()
        if self._normalize:
            hidden_states = F.normalize(hidden_states, p=2, dim=-1)
        return hidden_states

    def reset_parameters(self) -> None:
        """Re-initialise ``projection`` (if any) as ``nn.Linear`` does."""
        if self.projection is not None:
            self.projection.reset_parameters()


class SplitLanguageModellingHead(nn.Module):
    """Per-token cross-entropy over a vocabulary made of named splits, never materialising logits.

    One bias-free ``nn.Linear(H, V_split)`` per split in ``lm_head``; the forward concatenates their
    weights in ``split_order`` into one ``(V, H)`` matrix and calls :func:`linear_cross_entropy`.

    Args:
        split_vocab_size: split name -> vocabulary size.
        split_order: concatenation order; global label ids index the concatenation.
        hidden_size: input size ``H``.
        impl: ``linear_cross_entropy`` implementation (None: best available, ``"cce"`` on CUDA;
            ``"pallas"`` runs our JAX Pallas kernels on CUDA tensors, zero-copy, exact gradients).
        filter_eps: gradient filtering, as in :func:`linear_cross_entropy` (``None`` for exact).

    ``state_dict`` keys: ``lm_head.<split>.weight`` ``(V_split, H)``.

    Example:
        >>> head = SplitLanguageModellingHead({"text": 1000, "special": 4}, ["text", "special"], 64)
        >>> loss = head(torch.randn(2, 8, 64), torch.randint(0, 1004, (2, 8)))  # (2, 8) float32
    """

    def __init__(
        self,
        split_vocab_size: dict[str, int],
        split_order: Sequence[str],
        hidden_size: int,
        *,
        impl: str | None = None,
        filter_eps: float | Literal["auto"] | None = "auto",
    ):
        super().__init__()
        self._layout = check_split_config(split_vocab_size, split_order)
        self._hidden_size = check_hidden_size(hidden_size)
        self._split_order = self._layout.order
        self.impl = impl
        self.filter_eps = filter_eps
        self.lm_head: Mapping[str, nn.Linear] = nn.ModuleDict(
            {name: nn.Linear(hidden_size, size, bias=False) for name, size in split_vocab_size.items()}
        )

    @property
    def vocab_size(self) -> int:
        return self._layout.total

    def weight(self) -> torch.Tensor:
        """The ``(V, H)`` concatenation of the split weights in ``split_order`` (differentiable)."""
        return torch.cat([self.lm_head[name].weight for name in self._split_order], dim=0)

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token loss.

        Args:
            hidden_states: ``(B, S, H)`` (any leading shape works) in the weights' dtype.
            labels: ``(B, S)`` integer global ids in ``[0, V)`` or ``LM_IGNORE_INDEX``.

        Returns:
            ``(B, S)`` float32 loss, reduction none; 0 at ignored positions.
        """
        _check_hidden(hidden_states, self._hidden_size)
        return linear_cross_entropy(
            hidden_states,
            self.weight(),
            labels,
            ignore_index=LM_IGNORE_INDEX,
            reduction="none",
            impl=self.impl,
            filter_eps=self.filter_eps,
        )

    def implementation_for(self, hidden_states: torch.Tensor) -> str:
        """The implementation the forward would run for these hidden states."""
        return select_implementation(hidden_states, self.impl, self.filter_eps)

    def reset_parameters(self) -> None:
        """Re-initialise every split as ``nn.Linear`` does."""
        for layer in self.lm_head.values():
            layer.reset_parameters()


class SplitTokenEmbeddings(nn.Module):
    """Token embeddings over a vocabulary made of named splits (the LM head's input side).

    Args:
        split_vocab_size: split name -> vocabulary size.
        split_order: concatenation order; global ids map to splits as the LM head's labels do.
        hidden_size: embedding size ``H``.

    ``state_dict`` keys: ``token_embedding.<split>.weight`` ``(V_split, H)``.
    """

    def __init__(self, split_vocab_size: dict[str, int], split_order: Sequence[str], hidden_size: int):
        super().__init__()
        self._layout = check_split_config(split_vocab_size, split_order)
        self._hidden_size = check_hidden_size(hidden_size)
        self._split_order = self._layout.order
        self.token_embedding: Mapping[str, nn.Embedding] = nn.ModuleDict(
            {name: nn.Embedding(size, hidden_size) for name, size in split_vocab_size.items()}
        )

    @property
    def vocab_size(self) -> int:
        return self._layout.total

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed global token ids.

        Args:
            input_ids: integer tensor of any shape, values in ``[0, V)``.

        Returns:
            ``input_ids.shape + (H,)`` in the embedding dtype.

        Raises:
            ValueError: an id outside ``[0, V)`` (eagerly on CPU; on CUDA an asynchronous device
                assert, as for the LM head's labels).
        """
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        vocab = self.vocab_size
        input_ids = input_ids.long()  # a narrow or unsigned dtype would wrap in the comparison with vocab
        bad = (input_ids < 0) | (input_ids >= vocab)
        if input_ids.device.type == "cuda":
            torch._assert_async(~bad.any(), f"input_ids must be in [0, {vocab})")
        elif input_ids.numel() and bool(bad.any()):
            position = [int(i) for i in bad.nonzero()[0]]
            raise ValueError(token_id_range_message(int(input_ids[tuple(position)]), position, vocab))
        table = torch.cat([self.token_embedding[name].weight for name in self._split_order], dim=0)
        return F.embedding(input_ids, table)

    def reset_parameters(self) -> None:
        """Re-initialise every split as ``nn.Embedding`` does."""
        for layer in self.token_embedding.values():
            layer.reset_parameters()
