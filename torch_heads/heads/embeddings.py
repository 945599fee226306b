"""``SplitTokenEmbeddings``: token embeddings over a split vocabulary (d9d layout)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from heads_common import check_hidden_size, check_split_config, token_id_range_message


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
