"""The four torch heads: d9d ``state_dict`` layout, d9d forward semantics, config and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ground_truth import lce_ground_truth
from torch import nn

from heads_common.tolerances import assert_close
from torch_heads import (
    LM_IGNORE_INDEX,
    ClassificationHead,
    EmbeddingHead,
    SplitLanguageModellingHead,
    SplitTokenEmbeddings,
)

# The GPT-2 vocabulary plus one special token. The dict's order differs from split_order on purpose:
# global ids must follow split_order.
SPLIT_VOCAB = {"special": 1, "text": 50257}
SPLIT_ORDER = ["text", "special"]
VOCAB = 50258
HIDDEN = 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- d9d-layout modules, written as d9d writes them ---------------------------------------------


class D9dClassificationHead(nn.Module):
    def __init__(self, hidden_size, num_labels, dropout):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(hidden_size, num_labels, bias=False)

    def forward(self, hidden_states, pooling_mask):
        if pooling_mask is not None:
            hidden_states = hidden_states[pooling_mask == 1]
        return self.score(self.dropout(hidden_states)).float()


class D9dEmbeddingHead(nn.Module):
    def __init__(self, hidden_size, embedding_dim, normalize):
        super().__init__()
        self.normalize = normalize
        self.projection = None if embedding_dim is None else nn.Linear(hidden_size, embedding_dim, bias=False)

    def forward(self, hidden_states, pooling_mask):
        if pooling_mask is not None:
            hidden_states = hidden_states[pooling_mask == 1]
        if self.projection is not None:
            hidden_states = self.projection(hidden_states)
        hidden_states = hidden_states.float()
        return F.normalize(hidden_states, p=2, dim=-1) if self.normalize else hidden_states


class D9dSplitLanguageModellingHead(nn.Module):
    def __init__(self, split_vocab_size, split_order, hidden_size):
        super().__init__()
        self.split_order = list(split_order)
        self.lm_head = nn.ModuleDict({n: nn.Linear(hidden_size, s, bias=False) for n, s in split_vocab_size.items()})

    def forward(self, hidden_states, labels):
        weight = torch.cat([self.lm_head[n].weight for n in self.split_order], dim=0)
        logits = hidden_states.flatten(0, -2) @ weight.T
        loss = F.cross_entropy(logits, labels.flatten(), ignore_index=LM_IGNORE_INDEX, reduction="none")
        return loss.reshape(labels.shape)


class D9dSplitTokenEmbeddings(nn.Module):
    def __init__(self, split_vocab_size, split_order, hidden_size):
        super().__init__()
        self.split_order = list(split_order)
        self.token_embedding = nn.ModuleDict({n: nn.Embedding(s, hidden_size) for n, s in split_vocab_size.items()})

    def forward(self, input_ids):
        out, start = 0, 0
        for name in self.split_order:
            table = self.token_embedding[name]
            in_split = (input_ids >= start) & (input_ids < start + table.num_embeddings)
            local = torch.where(in_split, input_ids - start, 0)
            out = out + table(local) * in_split[..., None]
            start += table.num_embeddings
        return out


def _load_from(ours: nn.Module, theirs: nn.Module) -> None:
    """Save ``theirs``'s ``state_dict`` and load it into ``ours`` strictly."""
    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    ours.load_state_dict(state, strict=True)


# --- state_dict layout -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: ClassificationHead(16, 3, 0.1), {"score.weight": (3, 16)}),
        (
            lambda: SplitLanguageModellingHead(SPLIT_VOCAB, SPLIT_ORDER, HIDDEN),
            {"lm_head.text.weight": (50257, HIDDEN), "lm_head.special.weight": (1, HIDDEN)},
        ),
        (lambda: EmbeddingHead(16, 4, normalize=True), {"projection.weight": (4, 16)}),
        (lambda: EmbeddingHead(16, None, normalize=True), {}),
        (
            lambda: SplitTokenEmbeddings(SPLIT_VOCAB, SPLIT_ORDER, HIDDEN),
            {"token_embedding.text.weight": (50257, HIDDEN), "token_embedding.special.weight": (1, HIDDEN)},
        ),
    ],
    ids=["classification", "lm", "embedding", "embedding-no-projection", "token-embeddings"],
)
def test_state_dict_keys_are_d9d(make, expected):
    assert {k: tuple(v.shape) for k, v in make().state_dict().items()} == expected


# --- d9d round trips -----------------------------------------------------------------------------


def test_lm_head_d9d_round_trip():
    theirs = D9dSplitLanguageModellingHead(SPLIT_VOCAB, SPLIT_ORDER, HIDDEN)
    ours = SplitLanguageModellingHead(SPLIT_VOCAB, SPLIT_ORDER, HIDDEN)
    _load_from(ours, theirs)
    hidden = torch.randn(3, 7, HIDDEN) * 4
    labels = torch.randint(0, VOCAB, (3, 7))
    labels[0, :3] = VOCAB - 1  # the special token
    labels[1, 2] = LM_IGNORE_INDEX
    loss = ours(hidden, labels)
    assert loss.shape == (3, 7) and loss.dtype == torch.float32
    # The d9d forward on the same values in float64 is the ground truth.
    expected = theirs.double()(hidden.double(), labels)
    assert_close("loss", loss.detach().double().numpy(), expected.detach().numpy(), "float32")


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_lm_head_special_split_loss_and_gradient(impl):
    """Labels in the 1-token special split (global id 50257) give the right loss and split gradients."""
    head = SplitLanguageModellingHead(SPLIT_VOCAB, SPLIT_ORDER, HIDDEN, impl=impl)
    hidden = (torch.randn(2, 9, HIDDEN) * 4).requires_grad_(True)
    labels = torch.randint(0, 50257, (2, 9))
    labels[:, ::3] = VOCAB - 1
    labels[1, 1] = LM_IGNORE_INDEX
    upstream = torch.randn(2, 9)
    loss = head(hidden, labels)
    loss.backward(upstream)

    weight = torch.cat([head.lm_head["text"].weight, head.lm_head["special"].weight]).detach().double().numpy()
    truth_loss, truth_dh, truth_dw = lce_ground_truth(
        hidden.detach().double().reshape(-1, HIDDEN).numpy(),
        weight,
        labels.reshape(-1).numpy(),
        upstream.double().reshape(-1).numpy(),
    )
    assert_close("loss", loss.detach().double().reshape(-1).numpy(), truth_loss, "float32")
    assert_close("d_hidden", hidden.grad.double().reshape(-1, HIDDEN).numpy(), truth_dh, "float32")
    assert_close("d_special", head.lm_head["special"].weight.grad.double().numpy(), truth_dw[50257:], "float32")
    assert_close("d_text", head.lm_head["text"].weight.grad.double().numpy(), truth_dw[:50257], "float32")


def test_lm_head_bf16_returns_float32():
    head = SplitLanguageModellingHead({"a": 37, "b": 5}, ["a", "b"], HIDDEN).to(torch.bfloat16)
    hidden = torch.randn(2, 3, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
    loss = head(hidden, torch.randint(0, 42, (2, 3)))
    loss.sum().backward()
    assert loss.dtype == torch.float32
    assert hidden.grad.dtype == head.lm_head["a"].weight.grad.dtype == torch.bfloat16


def test_lm_head_auto_impl_on_cpu():
    head = SplitLanguageModellingHead({"a": 3}, ["a"], HIDDEN)
    assert head.implementation_for(torch.randn(1, 2, HIDDEN)) == "chunked"
    assert head.vocab_size == 3


def test_lm_head_state_dict_helpers_without_a_group():
    """Unsharded: all rows held, shard_state_dict passes a model's state dict through, full_state_dict is the
    state dict.

    The vocabulary-parallel cases run on gloo ranks (tests/multidevice/torch_vocab_parallel.py).
    """
    head = SplitLanguageModellingHead({"a": 5, "b": 3}, ["b", "a"], HIDDEN)
    assert head.vocab_range == (0, 8) and head.vocab_parallel_group is None
    model_sd = {f"model.head.{k}": v for k, v in head.state_dict().items()} | {"model.other": torch.ones(2)}
    local = head.shard_state_dict(model_sd, prefix="model.head.")
    assert local.keys() == model_sd.keys() and all(torch.equal(local[k], model_sd[k]) for k in model_sd)
    assert all(torch.equal(v, head.state_dict()[k]) for k, v in head.full_state_dict().items())
    with pytest.raises(KeyError, match="lm_head.a.weight"):
        head.shard_state_dict({"lm_head.b.weight": torch.zeros(3, HIDDEN)})
    with pytest.raises(ValueError, match=r"must be the unsharded \(3, 8\) weight, got \(2, 8\)"):
        head.shard_state_dict({"lm_head.b.weight": torch.zeros(2, HIDDEN), "lm_head.a.weight": torch.zeros(5, HIDDEN)})


def test_lm_head_vocab_parallel_group_must_be_a_process_group():
    with pytest.raises(TypeError, match="vocab_parallel_group must be a torch.distributed ProcessGroup"):
        SplitLanguageModellingHead({"a": 3}, ["a"], HIDDEN, vocab_parallel_group="world")
    # On a rank outside the group, torch.distributed.new_group returns this marker, not a group.
    with pytest.raises(ValueError, match="not a member of vocab_parallel_group"):
        SplitLanguageModellingHead(
            {"a": 3}, ["a"], HIDDEN, vocab_parallel_group=torch.distributed.GroupMember.NON_GROUP_MEMBER
        )


def test_token_embeddings_d9d_round_trip():
    theirs = D9dSplitTokenEmbeddings(SPLIT_VOCAB, SPLIT_ORDER, HIDDEN)
    ours = SplitTokenEmbeddings(SPLIT_VOCAB, SPLIT_ORDER, HIDDEN)
    _load_from(ours, theirs)
    ids = torch.randint(0, VOCAB, (3, 11))
    ids[0, :4] = VOCAB - 1
    ids[1, 0] = 0
    ids[1, 1] = 50256
    out = ours(ids)
    assert out.shape == (3, 11, HIDDEN)
    assert torch.equal(out, theirs(ids))
    assert torch.equal(out[0, 0], theirs.token_embedding["special"].weight[0])


@pytest.mark.parametrize("mask", [None, "bool", "int"])
def test_classification_head_d9d_round_trip(mask):
    theirs = D9dClassificationHead(16, 3, 0.3).eval()
    ours = ClassificationHead(16, 3, 0.3).eval()
    _load_from(ours, theirs)
    hidden = torch.randn(2, 5, 16)
    pooling_mask = None if mask is None else (torch.rand(2, 5) < 0.5).to(torch.bool if mask == "bool" else torch.long)
    out = ours(hidden, pooling_mask)
    assert torch.equal(out, theirs(hidden, pooling_mask))
    assert out.shape == ((2, 5, 3) if mask is None else (int(pooling_mask.sum()), 3))


@pytest.mark.parametrize("embedding_dim", [None, 6])
@pytest.mark.parametrize("normalize", [True, False])
def test_embedding_head_d9d_round_trip(embedding_dim, normalize):
    theirs = D9dEmbeddingHead(16, embedding_dim, normalize)
    ours = EmbeddingHead(16, embedding_dim, normalize)
    _load_from(ours, theirs)
    hidden = torch.randn(2, 5, 16)
    pooling_mask = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
    out = ours(hidden, pooling_mask)
    assert torch.equal(out, theirs(hidden, pooling_mask))
    assert out.shape == (3, embedding_dim or 16) and out.dtype == torch.float32
    if normalize:
        assert_close("norm", out.detach().double().norm(dim=-1).numpy(), np.ones(3), "float32")


# --- pooling, dtypes, dropout, reset -------------------------------------------------------------


@pytest.mark.parametrize(
    "head", [ClassificationHead(16, 3, 0.0), EmbeddingHead(16, 4, normalize=False)], ids=["classification", "embedding"]
)
def test_pooling_mask_semantics(head):
    hidden = torch.randn(2, 4, 16)
    int_mask = torch.tensor([[1, 0, 2, 1], [0, 1, 0, 0]])  # d9d selects where mask == 1: the 2 is not selected
    bool_mask = int_mask == 1
    expected = head(hidden[bool_mask])
    assert torch.equal(head(hidden, int_mask), expected)
    assert torch.equal(head(hidden, bool_mask), expected)
    assert torch.equal(expected, head(torch.stack([hidden[0, 0], hidden[0, 3], hidden[1, 1]])))

    empty = head(hidden, torch.zeros(2, 4, dtype=torch.bool))
    assert empty.shape == (0, expected.shape[-1]) and empty.dtype == torch.float32


@pytest.mark.parametrize(
    "make",
    [
        lambda: ClassificationHead(16, 3, 0.0),
        lambda: EmbeddingHead(16, 4, normalize=True),
        lambda: EmbeddingHead(16, None, normalize=False),
    ],
    ids=["classification", "embedding", "embedding-no-projection"],
)
def test_bf16_inputs_give_float32(make):
    head = make().to(torch.bfloat16)
    hidden = torch.randn(2, 4, 16, dtype=torch.bfloat16)
    assert head(hidden).dtype == torch.float32
    assert head(hidden, torch.ones(2, 4, dtype=torch.long)).dtype == torch.float32


def test_classification_dropout_train_and_eval():
    """With an identity ``score``, train() zeroes about half the inputs and scales the rest by 2; eval() is exact."""
    head = ClassificationHead(64, 64, 0.5)
    with torch.no_grad():
        head.score.weight.copy_(torch.eye(64))
    hidden = torch.randn(32, 64)
    head.train()
    out = head(hidden).detach()
    dropped = out == 0
    assert 0.4 < dropped.float().mean() < 0.6
    assert torch.equal(out[~dropped], 2 * hidden[~dropped])
    head.eval()
    assert torch.equal(head(hidden), hidden)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ClassificationHead(16, 3, 0.1),
        lambda: EmbeddingHead(16, 4, normalize=True),
        lambda: SplitLanguageModellingHead({"a": 5, "b": 3}, ["b", "a"], 16),
        lambda: SplitTokenEmbeddings({"a": 5, "b": 3}, ["b", "a"], 16),
    ],
    ids=["classification", "embedding", "lm", "token-embeddings"],
)
def test_reset_parameters_changes_every_weight(make):
    head = make()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    assert before
    head.reset_parameters()
    for name, value in head.state_dict().items():
        assert not torch.equal(value, before[name]), name


# --- validation -----------------------------------------------------------------------------------

SPLIT_HEADS = [SplitLanguageModellingHead, SplitTokenEmbeddings]


@pytest.mark.parametrize("cls", SPLIT_HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "vocab, order, error, match",
    [
        pytest.param(
            {"text": 5},
            ["text", "special"],
            ValueError,
            r"missing from split_vocab_size: \['special'\]",
            id="order-not-in-sizes",
        ),
        pytest.param(
            {"text": 5, "special": 1},
            ["text"],
            ValueError,
            r"not named in split_order: \['special'\]",
            id="size-not-in-order",
        ),
        pytest.param({"text": 5}, ["text", "text"], ValueError, r"duplicate split names: \['text'\]", id="duplicate"),
        pytest.param({}, [], ValueError, "at least one split", id="no-splits"),
        pytest.param(
            {"text": 0}, ["text"], ValueError, r"split_vocab_size\['text'\] must be positive, got 0", id="size-zero"
        ),
        pytest.param(
            {"text": -3}, ["text"], ValueError, r"split_vocab_size\['text'\] must be positive", id="size-negative"
        ),
        pytest.param({"text": 5.0}, ["text"], TypeError, r"split_vocab_size\['text'\] must be an int", id="size-float"),
        pytest.param({"text": True}, ["text"], TypeError, r"split_vocab_size\['text'\] must be an int", id="size-bool"),
        pytest.param({"text": 5}, "text", TypeError, "split_order", id="order-str"),
        pytest.param([("text", 5)], ["text"], TypeError, "split_vocab_size", id="sizes-not-mapping"),
    ],
)
def test_bad_split_config(cls, vocab, order, error, match):
    with pytest.raises(error, match=match):
        cls(vocab, order, HIDDEN)


BAD_SPLIT_NAMES = {
    "dotted": ("a.b", "contains '.'"),
    "empty": ("", "is empty"),
    "training": ("training", "is an attribute of the containers"),  # nn.ModuleDict: "already exists"
    "method": ("keys", "is an attribute of the containers"),  # nnx.Dict: would shadow keys()
    "flax-only": ("sow", "is an attribute of the containers"),
    "private": ("_modules", "starts with '_'"),
}


@pytest.mark.parametrize("cls", SPLIT_HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name, why", BAD_SPLIT_NAMES.values(), ids=BAD_SPLIT_NAMES.keys())
def test_bad_split_name_is_a_value_error_naming_it(cls, name, why):
    """One check (``heads_common.check_split_name``), never nn.ModuleDict's ``KeyError``."""
    with pytest.raises(ValueError, match=rf"^split name {name!r} cannot be used: it {why}"):
        cls({"text": 5, name: 2}, ["text", name], HIDDEN)


def test_unusual_split_names_that_both_frameworks_hold_are_accepted():
    names = ["a-b", "1x", "é", "with space", "Training"]
    head = SplitLanguageModellingHead(dict.fromkeys(names, 2), names, HIDDEN)
    assert [key.split(".")[1] for key in head.state_dict()] == names


def test_reserved_split_names_cover_every_module_dict_attribute():
    from heads_common import RESERVED_SPLIT_NAMES

    public = {name for name in dir(nn.ModuleDict()) if not name.startswith("_")}
    assert public <= RESERVED_SPLIT_NAMES, sorted(public - RESERVED_SPLIT_NAMES)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        pytest.param({"impl": "bogus"}, ValueError, r"impl must be None or one of \('cce', 'chunked'", id="impl-bogus"),
        pytest.param({"impl": 3}, ValueError, "impl must be None or one of", id="impl-int"),
        pytest.param({"filter_eps": 5.0}, ValueError, r"filter_eps must be in \(0, 1\), got 5.0", id="eps-5"),
        pytest.param({"filter_eps": 0.0}, ValueError, r"filter_eps must be in \(0, 1\)", id="eps-0"),
        pytest.param({"filter_eps": "none"}, TypeError, "filter_eps must be 'auto', None or a float", id="eps-str"),
    ],
)
def test_lm_head_checks_impl_and_filter_eps_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        SplitLanguageModellingHead({"a": 3}, ["a"], HIDDEN, **kwargs)


@pytest.mark.parametrize("impl", [None, "chunked", "reference", "cce", "pallas"])
def test_lm_head_accepts_every_registered_impl_at_construction(impl):
    # cce and pallas need CUDA: construction accepts them, the first forward says why they cannot run.
    head = SplitLanguageModellingHead({"a": 3}, ["a"], HIDDEN, impl=impl, filter_eps=None)
    assert head.impl == impl


@pytest.mark.parametrize(
    "make, error, match",
    [
        pytest.param(
            lambda: SplitLanguageModellingHead({"a": 3}, ["a"], 0),
            ValueError,
            "hidden_size must be positive",
            id="lm-hidden-0",
        ),
        pytest.param(
            lambda: SplitTokenEmbeddings({"a": 3}, ["a"], -1),
            ValueError,
            "hidden_size must be positive",
            id="emb-hidden-neg",
        ),
        pytest.param(
            lambda: ClassificationHead(0, 3, 0.1), ValueError, "hidden_size must be positive", id="cls-hidden-0"
        ),
        pytest.param(
            lambda: ClassificationHead(8.0, 3, 0.1), TypeError, "hidden_size must be an int", id="cls-hidden-float"
        ),
        pytest.param(
            lambda: ClassificationHead(8, 0, 0.1), ValueError, "num_labels must be positive", id="cls-labels-0"
        ),
        pytest.param(
            lambda: ClassificationHead(8, 3, 1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0", id="dropout-1"
        ),
        pytest.param(
            lambda: ClassificationHead(8, 3, -0.1),
            ValueError,
            r"dropout must be in \[0, 1\), got -0.1",
            id="dropout-neg",
        ),
        pytest.param(
            lambda: ClassificationHead(8, 3, float("nan")),
            ValueError,
            r"dropout must be in \[0, 1\), got nan",
            id="dropout-nan",
        ),
        pytest.param(lambda: ClassificationHead(8, 3, "0.1"), TypeError, "dropout must be a float", id="dropout-str"),
        pytest.param(
            lambda: EmbeddingHead(0, 4, True), ValueError, "hidden_size must be positive", id="embhead-hidden-0"
        ),
        pytest.param(
            lambda: EmbeddingHead(8, 0, True), ValueError, "embedding_dim must be positive", id="embhead-dim-0"
        ),
        pytest.param(lambda: EmbeddingHead(8, 4, 1), TypeError, "normalize must be a bool", id="embhead-normalize-int"),
    ],
)
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "head", [ClassificationHead(16, 3, 0.0), EmbeddingHead(16, 4, normalize=True)], ids=["classification", "embedding"]
)
@pytest.mark.parametrize(
    "mask, error, match",
    [
        pytest.param(
            torch.ones(2, 5, dtype=torch.long), ValueError, r"pooling_mask must have shape .*\(2, 4\)", id="wrong-shape"
        ),
        pytest.param(torch.ones(2, 4, 1, dtype=torch.bool), ValueError, "pooling_mask must have shape", id="extra-dim"),
        pytest.param(torch.ones(2, 4), TypeError, "pooling_mask must be a bool or integer tensor", id="float"),
        pytest.param([[1, 0, 0, 0]] * 2, TypeError, "pooling_mask must be a torch.Tensor", id="list"),
    ],
)
def test_bad_pooling_mask(head, mask, error, match):
    with pytest.raises(error, match=match):
        head(torch.randn(2, 4, 16), mask)


@pytest.mark.parametrize(
    "call",
    [
        lambda: ClassificationHead(16, 3, 0.0)(torch.randn(2, 4, 15)),
        lambda: EmbeddingHead(16, 4, normalize=True)(torch.randn(2, 4, 17)),
        lambda: SplitLanguageModellingHead({"a": 5}, ["a"], 16)(
            torch.randn(2, 4, 8), torch.zeros(2, 4, dtype=torch.long)
        ),
    ],
    ids=["classification", "embedding", "lm"],
)
def test_hidden_size_mismatch_in_forward(call):
    with pytest.raises(ValueError, match="hidden size mismatch"):
        call()


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 7, -1, LM_IGNORE_INDEX])
def test_token_ids_out_of_range(bad):
    embeddings = SplitTokenEmbeddings(SPLIT_VOCAB, SPLIT_ORDER, HIDDEN)
    ids = torch.zeros(2, 3, dtype=torch.long)
    assert embeddings(ids).shape == (2, 3, HIDDEN)
    ids[1, 2] = bad
    with pytest.raises(ValueError, match=rf"input_ids must be in \[0, {VOCAB}\); found {bad} at index \(1, 2\)"):
        embeddings(ids)


@pytest.mark.parametrize(
    "ids, error",
    [(torch.zeros(2, 3), TypeError), (torch.zeros(2, 3, dtype=torch.bool), TypeError)],
    ids=["float", "bool"],
)
def test_token_ids_bad_dtype(ids, error):
    with pytest.raises(error, match="input_ids must be an integer tensor"):
        SplitTokenEmbeddings(SPLIT_VOCAB, SPLIT_ORDER, HIDDEN)(ids)


@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_lm_head_labels_out_of_range(bad):
    head = SplitLanguageModellingHead(SPLIT_VOCAB, SPLIT_ORDER, HIDDEN)
    labels = torch.zeros(2, 3, dtype=torch.long)
    labels[0, 1] = bad
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {VOCAB}\).*found {bad} at index \(0, 1\)"):
        head(torch.randn(2, 3, HIDDEN), labels)
