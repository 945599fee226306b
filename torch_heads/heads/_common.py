"""The input check every torch head shares."""

from __future__ import annotations

import torch


def check_hidden(hidden_states: object, hidden_size: int) -> torch.Tensor:
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be a floating tensor, got {hidden_states.dtype}")
    if hidden_states.ndim < 1 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden size mismatch: expected hidden_states (..., {hidden_size}), got shape {tuple(hidden_states.shape)}"
        )
    return hidden_states
