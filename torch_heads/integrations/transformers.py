"""Hugging Face ``transformers`` causal LMs with their training loss on our fused linear cross-entropy.

:func:`patch_causal_lm` patches one model instance (never a class, never globally) so that a forward
call given ``labels`` computes the loss with :func:`torch_heads.linear_cross_entropy` from the
final hidden states and the output embedding's weight, without forming the ``(tokens × V)``
logits; the returned output has ``loss`` set and ``logits=None``. Without ``labels`` (generation,
evaluation of logits) the model runs unchanged.

The loss is the model's own: labels shifted by one position (``labels[..., t + 1]`` is the target of
position ``t``; a caller's ``shift_labels`` is used as given), ``-100`` ignored, the mean over
counted tokens, or the sum divided by ``num_items_in_batch`` when the caller passes it (as the
``Trainer`` does under gradient accumulation); the final-logit soft-capping of the config
(``final_logit_softcapping``, Gemma-2) and the output embedding's bias, when it has one.

Works with any causal LM whose forward computes ``logits = self.lm_head(hidden_states)`` from the
decoder's last hidden states (Llama, Mistral, Qwen2, Gemma, Gemma-2 and most decoder-only models of
``transformers``). ``transformers`` is an optional dependency (``pip install fused-lce-heads[hf]``).
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

from heads_common import LM_IGNORE_INDEX

_PATCHED = "_fused_lce_original_forward"


class _HiddenStates:
    """Stands in for the output embedding during one forward: records its input and returns an empty
    ``(..., 0)`` tensor in its place, so no logits are formed (soft-capping ops on it are free)."""

    def __init__(self):
        self.hidden = None

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden_states
        return hidden_states.new_empty((*hidden_states.shape[:-1], 0))


@contextlib.contextmanager
def _capturing(module: torch.nn.Module):
    capture = _HiddenStates()
    module.forward = capture  # an instance attribute: shadows the class's forward for this call only
    try:
        yield capture
    finally:
        del module.forward


def _shifted_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``labels[..., t + 1]`` at position ``t``, ``ignore_index`` at the last position.

    No copy of the hidden states is made.
    """
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def patch_causal_lm(model: torch.nn.Module, *, impl: str | None = None, **loss_options) -> torch.nn.Module:
    """Make ``model``'s training loss run on :func:`torch_heads.linear_cross_entropy`.

    Args:
        model: a ``transformers`` causal LM (``...ForCausalLM``) with an output embedding
            (``model.get_output_embeddings()``, a bias-free or biased ``nn.Linear``).
        impl: the implementation (``None``: the best available, as :func:`torch_heads.linear_cross_entropy`).
        **loss_options: further keyword options of :func:`torch_heads.linear_cross_entropy`
            (e.g. ``filter_eps``); the reduction, shift, soft-capping and bias come from the model.

    Returns:
        ``model`` itself, patched (calling it again is a no-op).

    Raises:
        TypeError: ``model`` has no ``nn.Linear`` output embedding, or ``loss_options`` names an
            option the patch sets itself.
    """
    if getattr(model, _PATCHED, None) is not None:
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(model).__name__} has no nn.Linear output embedding (get_output_embeddings()) to patch")
    fixed = {"reduction", "ignore_index", "softcap", "bias", "shift", "return_lse"} & set(loss_options)
    if fixed:
        raise TypeError(f"patch_causal_lm sets {sorted(fixed)} from the model; do not pass them")
    softcap = _config_value(model.config, "final_logit_softcapping")
    original = model.forward

    @functools.wraps(original)
    def forward(self, *args, labels: torch.Tensor | None = None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        from torch_heads import linear_cross_entropy

        shift_labels = kwargs.pop("shift_labels", None)
        num_items = kwargs.get("num_items_in_batch")
        return_dict = kwargs.pop("return_dict", True)
        with _capturing(head) as capture:
            outputs = original(*args, return_dict=True, **kwargs)
        hidden = capture.hidden
        targets = _shifted_labels(labels, LM_IGNORE_INDEX) if shift_labels is None else shift_labels
        options = dict(loss_options)
        if softcap is not None:
            options["softcap"] = float(softcap)
        if head.bias is not None:
            options["bias"] = head.bias
        loss = linear_cross_entropy(
            hidden, head.weight, targets.to(hidden.device), ignore_index=LM_IGNORE_INDEX,
            reduction="mean" if num_items is None else "sum", impl=impl, **options,
        )
        if num_items is not None:
            loss = loss / torch.as_tensor(num_items, device=loss.device)
        outputs.loss = loss
        outputs.logits = None
        return outputs if return_dict else outputs.to_tuple()

    model.forward = types.MethodType(forward, model)
    setattr(model, _PATCHED, original)
    return model


def unpatch_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch_causal_lm` on ``model`` (a no-op on a model that is not patched)."""
    if getattr(model, _PATCHED, None) is not None:
        del model.forward
        delattr(model, _PATCHED)
    return model


def _config_value(config, name: str):
    """``config.<name>``, looking into a composite model's ``text_config`` too."""
    value = getattr(config, name, None)
    if value is None and getattr(config, "text_config", None) is not None:
        value = getattr(config.text_config, name, None)
    return value
