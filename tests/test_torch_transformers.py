"""The Hugging Face integration: a patched causal LM's loss and every parameter's gradient against
the unpatched model's, on tiny randomly initialised models built from a config (no download)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from heads_common.tolerances import TOLERANCES, rel_err  # noqa: E402
from torch_heads.integrations.transformers import patch_causal_lm, unpatch_causal_lm  # noqa: E402

VOCAB = 301  # not a multiple of any tile


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def _tied_llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )
    return transformers.LlamaForCausalLM(config)


def _gemma2():
    """Gemma-2's head: tied embeddings and final-logit soft-capping (30 by default; 0.05 here, where the
    tiny random logits feel it)."""
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, final_logit_softcapping=0.05,
        attn_implementation="eager",
    )
    return transformers.Gemma2ForCausalLM(config)


MODELS = {"llama": _llama, "llama-tied": _tied_llama, "gemma2": _gemma2}


def _pair(name):
    torch.manual_seed(0)
    model = MODELS[name]().float()
    return patch_causal_lm(copy.deepcopy(model)), model


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 19), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, -3:] = -100
    return ids, labels


def _compare(patched, plain, **kwargs):
    ids, labels = _batch()
    out = patched(input_ids=ids, labels=labels, **kwargs)
    ref = plain(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    ref.loss.backward()
    bound = TOLERANCES["float32"].bound
    assert out.logits is None
    assert rel_err(out.loss.detach().double(), ref.loss.detach().double()) <= bound
    for (name, p), q in zip(patched.named_parameters(), plain.parameters()):
        assert rel_err(p.grad.double(), q.grad.double()) <= bound, name


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patched_loss_and_every_gradient_match_the_model(name):
    _compare(*_pair(name))


def test_gemma2_softcap_is_read_from_the_config_and_matters():
    """The soft-capping comes from the config: without it the patched loss would differ."""
    patched, plain = _pair("gemma2")
    ids, labels = _batch()
    capped = patched(input_ids=ids, labels=labels).loss
    plain.config.final_logit_softcapping = None
    assert abs(float(capped) - float(plain(input_ids=ids, labels=labels).loss)) > 1e-3


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_num_items_in_batch_divides_the_sum(name):
    _compare(*_pair(name), num_items_in_batch=torch.tensor(23))


def test_without_labels_the_model_is_unchanged_and_unpatch_restores_it():
    patched, plain = _pair("llama")
    ids, labels = _batch()
    torch.testing.assert_close(patched(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
    assert isinstance(patched(input_ids=ids, labels=labels, return_dict=False), tuple)
    unpatch_causal_lm(patched)
    assert patched(input_ids=ids, labels=labels).logits.shape == (2, 19, VOCAB)


def test_refuses_options_it_sets_and_models_without_a_linear_head():
    with pytest.raises(TypeError, match="sets \\['reduction'\\]"):
        patch_causal_lm(_llama(), reduction="sum")
    with pytest.raises(TypeError, match="no nn.Linear output embedding"):
        patch_causal_lm(torch.nn.Linear(2, 2))
