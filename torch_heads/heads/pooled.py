"""The pooled heads: ``ClassificationHead`` and ``EmbeddingHead`` (d9d layout), and their ``pool``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from heads_common import check_bool, check_dropout, check_hidden_size, check_mask_shape
from torch_heads.heads._common import check_hidden


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
        hidden_states = pool(check_hidden(hidden_states, self._hidden_size), pooling_mask)
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
        self._normalize = check_bool(normalize, "normalize")
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
        hidden_states = pool(check_hidden(hidden_states, self._hidden_size), pooling_mask)
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
