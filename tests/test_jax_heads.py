"""jax_heads NNX modules: layout, initialisation, forward semantics, transformations, training, errors.

Validation errors are compared side by side with torch_heads: the same bad input must give the
same exception type and, where no framework type name is involved, the same message.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jax_heads
from heads_common import LM_IGNORE_INDEX, token_id_range_message
from heads_common.tolerances import PARITY_FLOAT32, rel_err
from jax_heads import ClassificationHead, EmbeddingHead, SplitLanguageModellingHead, SplitTokenEmbeddings

SPLITS = {"text": 37, "special": 5}
ORDER = ["special", "text"]
H = 8


def rand(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def params(module) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def all_heads():
    rngs = nnx.Rngs(0)
    return {
        "classification": ClassificationHead(H, 3, 0.1, rngs=rngs),
        "embedding": EmbeddingHead(H, 6, True, rngs=rngs),
        "lm": SplitLanguageModellingHead(SPLITS, ORDER, H, rngs=rngs),
        "token_embeddings": SplitTokenEmbeddings(SPLITS, ORDER, H, rngs=rngs),
    }


def test_parameter_layout():
    heads = all_heads()
    assert heads["classification"].score.kernel[...].shape == (H, 3)
    assert isinstance(heads["classification"].dropout, nnx.Dropout)
    assert heads["embedding"].projection.kernel[...].shape == (H, 6)
    assert EmbeddingHead(H, None, False, rngs=nnx.Rngs(0)).projection is None
    assert {k: v.kernel[...].shape for k, v in heads["lm"].lm_head.items()} == {"text": (H, 37), "special": (H, 5)}
    embeds = heads["token_embeddings"].token_embedding
    assert {k: v.embedding[...].shape for k, v in embeds.items()} == {"text": (37, H), "special": (5, H)}
    assert heads["lm"].vocab_size == heads["token_embeddings"].vocab_size == 42
    for module in heads.values():
        assert all(leaf.dtype == np.float32 for leaf in params(module))
    head = SplitLanguageModellingHead(SPLITS, ORDER, H, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in params(head))


def test_initialisation_matches_torch_distributions():
    # nn.Linear: uniform(-1/sqrt(in), 1/sqrt(in)) -> std = bound / sqrt(3); nn.Embedding: N(0, 1).
    hidden = 64
    kernel = np.array(ClassificationHead(hidden, 500, 0.0, rngs=nnx.Rngs(1)).score.kernel[...])
    bound = 1 / np.sqrt(hidden)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound
    assert abs(kernel.std() - bound / np.sqrt(3)) < 0.02 * bound
    assert abs(kernel.mean()) < 0.01 * bound
    table = np.array(
        SplitTokenEmbeddings({"a": 500}, ["a"], hidden, rngs=nnx.Rngs(1)).token_embedding["a"].embedding[...]
    )
    assert abs(table.std() - 1) < 0.02 and abs(table.mean()) < 0.02


@pytest.mark.parametrize("name", ["classification", "embedding", "lm", "token_embeddings"])
def test_reset_parameters_changes_weights(name):
    module = all_heads()[name]
    before = params(module)
    module.reset_parameters()
    after = params(module)
    assert len(before) == len(after) > 0
    for old, new in zip(before, after):
        assert old.shape == new.shape and old.dtype == new.dtype
        assert not np.allclose(old, new)
    module.reset_parameters()
    assert not any(np.allclose(a, b) for a, b in zip(after, params(module)))


def test_classification_forward_and_pooling():
    head = ClassificationHead(H, 3, 0.5, rngs=nnx.Rngs(0))
    head.eval()
    hidden = rand((2, 5, H))
    kernel = head.score.kernel[...]
    logits = head(hidden)
    assert logits.shape == (2, 5, 3) and logits.dtype == jnp.float32
    # Against NumPy: a jnp matmul at default precision would round to tf32 on a GPU; the head does not.
    np.testing.assert_allclose(logits, np.asarray(hidden) @ np.asarray(kernel), rtol=1e-6)

    mask = jnp.asarray([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], jnp.int32)
    pooled = head(hidden, mask)
    want = np.asarray(hidden)[np.asarray(mask) == 1] @ np.asarray(kernel)
    np.testing.assert_allclose(pooled, want, rtol=1e-6)
    assert head(hidden, mask == 1).shape == (5, 3)
    assert head(hidden, jnp.zeros((2, 5), jnp.int32)).shape == (0, 3)
    # Values other than 1 are not selected (torch semantics: pooling_mask == 1).
    assert head(hidden, mask * 2).shape == (0, 3)

    jitted = nnx.jit(lambda m, h, k: m(h, k, num_selected=5))
    np.testing.assert_allclose(jitted(head, hidden, mask), want, rtol=1e-6)
    first3 = nnx.jit(lambda m, h, k: m(h, k, num_selected=3))(head, hidden, mask)
    np.testing.assert_allclose(first3, want[:3], rtol=1e-6)
    padded = np.asarray(nnx.jit(lambda m, h, k: m(h, k, num_selected=7))(head, hidden, mask))
    np.testing.assert_allclose(padded[:5], want, rtol=1e-6)
    assert np.all(np.isnan(padded[5:]))
    with pytest.raises(ValueError, match="pooling_mask is traced .* pass num_selected=K"):
        nnx.jit(lambda m, h, k: m(h, k))(head, hidden, mask)
    with pytest.raises(ValueError, match="needs a pooling_mask"):
        head(hidden, num_selected=2)


def test_dropout_modes():
    hidden = jnp.ones((4, 16, H))
    head = ClassificationHead(H, 3, 0.5, rngs=nnx.Rngs(0))  # training mode by default, as in torch
    clean = head(hidden, deterministic=True)
    first, second = head(hidden), head(hidden)
    assert not np.allclose(first, clean) and not np.allclose(first, second)
    key = jax.random.key(3)
    np.testing.assert_array_equal(head(hidden, rngs=key), head(hidden, rngs=key))
    head.eval()
    np.testing.assert_array_equal(head(hidden), clean)
    assert not np.allclose(head(hidden, deterministic=False), clean)  # the call argument wins
    head.train()
    assert not np.allclose(head(hidden), clean)

    undecided = ClassificationHead(H, 3, 0.5, rngs=nnx.Rngs(0), deterministic=None)
    with pytest.raises(
        ValueError, match=r"no dropout mode: pass deterministic=True/False .* head.train\(\) / head.eval\(\)"
    ):
        undecided(hidden)
    np.testing.assert_array_equal(undecided(hidden, deterministic=True), clean)


def test_embedding_head():
    hidden = rand((2, 3, H)).astype(jnp.bfloat16)
    head = EmbeddingHead(H, 6, True, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    out = head(hidden)
    assert out.shape == (2, 3, 6) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=-1), 1.0, rtol=1e-6)
    plain = EmbeddingHead(H, None, False, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(plain(hidden), hidden.astype(jnp.float32))
    mask = jnp.asarray([[1, 1, 0], [0, 0, 1]])
    assert head(hidden, mask).shape == (3, 6)
    # torch's F.normalize clamps the norm at 1e-12: a zero row stays zero, with a finite gradient.
    unit = EmbeddingHead(H, None, True, rngs=nnx.Rngs(0))
    zeros = jnp.zeros((2, H))
    np.testing.assert_array_equal(unit(zeros), zeros)
    grad = jax.grad(lambda h: unit(h).sum())(zeros)
    assert np.all(np.isfinite(grad))


def test_lm_head_loss_matches_functional_and_split_layout():
    head = SplitLanguageModellingHead(SPLITS, ORDER, H, rngs=nnx.Rngs(0))
    assert head.implementation_for(rand((2, H))) == ("pallas" if jax.default_backend() == "gpu" else "chunked")
    weight = head.weight()
    assert weight.shape == (42, H)
    # split_order puts "special" (5 rows) first: global id 5 + j is text row j.
    np.testing.assert_array_equal(weight[:5], head.lm_head["special"].kernel[...].T)
    np.testing.assert_array_equal(weight[5 + 7], head.lm_head["text"].kernel[...][:, 7])
    hidden = rand((2, 4, H))
    labels = jnp.asarray([[0, 4, 5, 41], [LM_IGNORE_INDEX, 12, 3, LM_IGNORE_INDEX]])
    loss = head(hidden, labels)
    assert loss.shape == (2, 4) and loss.dtype == jnp.float32
    want = jax_heads.linear_cross_entropy(hidden, weight, labels, impl="reference")
    assert rel_err(loss, want) <= PARITY_FLOAT32
    row = np.asarray(hidden[0, 2], np.float64)
    logits = row @ np.asarray(weight, np.float64).T
    manual = np.log(np.exp(logits).sum()) - logits[5]
    np.testing.assert_allclose(loss[0, 2], manual, rtol=1e-5)
    assert float(loss[1, 0]) == 0.0


def test_lm_head_trains_under_nnx_jit():
    head = SplitLanguageModellingHead(SPLITS, ORDER, H, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(head, optax.adam(0.05), wrt=nnx.Param)
    hidden = rand((4, 6, H))
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 42, (4, 6)))

    @nnx.jit
    def step(model, opt, h, y):
        loss, grads = nnx.value_and_grad(lambda m: m(h, y).mean())(model)
        opt.update(model, grads)
        return loss, grads

    first, grads = step(head, optimizer, hidden, labels)
    assert set(grads["lm_head"].keys()) == set(SPLITS)
    for _ in range(4):
        loss, _ = step(head, optimizer, hidden, labels)
    assert float(loss) < float(first) - 0.1
    np.testing.assert_allclose(
        float(head(hidden, labels).mean()), float(step(head, optimizer, hidden, labels)[0]), rtol=1e-5
    )


def test_classification_and_embedding_train_under_nnx_jit():
    hidden = rand((16, H))
    targets = jnp.asarray(np.random.default_rng(2).integers(0, 3, 16))
    head = ClassificationHead(H, 3, 0.1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(head, optax.sgd(0.5), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):  # dropout on: the rng state advances inside jit
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(hidden), targets).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(head, optimizer)) for _ in range(10)]
    assert losses[-1] < losses[0]

    embed = EmbeddingHead(H, 4, True, rngs=nnx.Rngs(0))
    _, grads = nnx.jit(nnx.value_and_grad(lambda m: m(hidden)[:, 0].sum()))(embed)
    assert np.all(np.isfinite(grads["projection"]["kernel"][...]))


def test_token_embeddings():
    module = SplitTokenEmbeddings(SPLITS, ORDER, H, rngs=nnx.Rngs(0))
    ids = jnp.asarray([[0, 4, 5], [41, 6, 0]])
    out = module(ids)
    assert out.shape == (2, 3, H) and out.dtype == jnp.float32
    special, text = module.token_embedding["special"].embedding[...], module.token_embedding["text"].embedding[...]
    np.testing.assert_array_equal(out[0, 1], special[4])
    np.testing.assert_array_equal(out[0, 2], text[0])
    np.testing.assert_array_equal(out[1, 0], text[36])
    with pytest.raises(ValueError) as error:
        module(ids.at[1, 2].set(42))
    assert str(error.value) == token_id_range_message(42, (1, 2), 42)
    jitted = np.asarray(nnx.jit(lambda m, i: m(i))(module, ids.at[1, 2].set(-1)))
    assert np.all(np.isnan(jitted[1, 2]))
    np.testing.assert_array_equal(jitted[:1], out[:1])
    np.testing.assert_array_equal(jitted[1, :2], out[1, :2])
    with pytest.raises(TypeError, match="input_ids must be an integer array"):
        module(ids.astype(jnp.float32))


def test_lm_head_out_of_range_labels():
    head = SplitLanguageModellingHead(SPLITS, ORDER, H, rngs=nnx.Rngs(0))
    hidden, labels = rand((3, H)), jnp.asarray([1, 2, 42])
    with pytest.raises(
        ValueError, match=r"labels must be in \[0, 42\) or equal ignore_index=-100; found 42 at index \(2,\)"
    ):
        head(hidden, labels)
    loss = np.asarray(nnx.jit(lambda m, h, y: m(h, y))(head, hidden, labels))
    assert np.all(np.isfinite(loss[:2])) and np.isnan(loss[2])


# --- validation errors, side by side with torch_heads -----------------------------------------

BAD_CONFIGS = [
    ("ClassificationHead", (0, 3, 0.1)),
    ("ClassificationHead", (H, 0, 0.1)),
    ("ClassificationHead", (H, 3, 1.0)),
    ("ClassificationHead", (H, 3, "0.1")),
    ("ClassificationHead", (8.0, 3, 0.1)),
    ("EmbeddingHead", (H, 0, True)),
    ("EmbeddingHead", (H, None, 1)),
    ("SplitLanguageModellingHead", ({"a": 3}, ["a", "a"], H)),
    ("SplitLanguageModellingHead", ({"a": 3}, ["a", "b"], H)),
    ("SplitLanguageModellingHead", ({"a": 3, "b": 2}, ["a"], H)),
    ("SplitLanguageModellingHead", ({"a": 0}, ["a"], H)),
    ("SplitLanguageModellingHead", ({"a": 3}, "a", H)),
    ("SplitLanguageModellingHead", ({}, [], H)),
    ("SplitLanguageModellingHead", ({"a": 3}, ["a"], -1)),
    ("SplitTokenEmbeddings", ([("a", 3)], ["a"], H)),
    ("SplitTokenEmbeddings", ({"a": True}, ["a"], H)),
    # split names neither framework may hold: one check (heads_common.check_split_name), one message
    *(
        (name, ({"a": 3, split: 2}, ["a", split], H))
        for name in ("SplitLanguageModellingHead", "SplitTokenEmbeddings")
        for split in ("a.b", "", "training", "keys", "sow", "_x", 7)
    ),
]


@pytest.mark.parametrize("name, args", BAD_CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_CONFIGS)])
def test_config_errors_mirror_torch(name, args):
    torch_heads = pytest.importorskip("torch_heads")
    with pytest.raises((TypeError, ValueError)) as torch_error:
        getattr(torch_heads, name)(*args)
    with pytest.raises((TypeError, ValueError)) as jax_error:
        getattr(jax_heads, name)(*args, rngs=nnx.Rngs(0))
    assert type(jax_error.value) is type(torch_error.value)
    assert str(jax_error.value) == str(torch_error.value)


def test_reserved_split_names_cover_every_nnx_dict_attribute():
    from heads_common import RESERVED_SPLIT_NAMES

    public = {name for name in dir(nnx.Dict()) if not name.startswith("_")}
    assert public <= RESERVED_SPLIT_NAMES, sorted(public - RESERVED_SPLIT_NAMES)


def test_unusual_split_names_that_both_frameworks_hold_are_accepted():
    names = ["a-b", "1x", "é", "with space", "Training"]
    head = SplitLanguageModellingHead(dict.fromkeys(names, 2), names, H, rngs=nnx.Rngs(0))
    assert list(head.lm_head) == names and head.weight().shape == (10, H)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"impl": "bogus"}, r"impl must be None or one of \('pallas', 'chunked', 'reference', 'fused'\)",
                     id="impl-bogus"),
        pytest.param({"impl": "cce"}, r"impl must be None or one of .*, got 'cce'", id="impl-torch-only"),
        pytest.param({"impl": "fused"}, "impl='fused' cannot run in the head: .* reduction 'sum' or 'mean'",
                     id="impl-fused"),
        pytest.param({"interpret": True}, "interpret=True applies to impl='pallas' only, got impl=None",
                     id="interpret-without-pallas"),
    ],
)
def test_lm_head_checks_impl_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SplitLanguageModellingHead({"a": 3}, ["a"], H, rngs=nnx.Rngs(0), **kwargs)


def test_vocab_parallel_lm_head_checks_impl_against_the_per_shard_ones():
    parallel = dict(rngs=nnx.Rngs(0), mesh=jax.make_mesh((1,), ("vocab",)), vocab_axis="vocab")
    with pytest.raises(ValueError, match=r"one of \('pallas', 'chunked', 'reference'\), got 'fused'"):
        SplitLanguageModellingHead({"a": 3}, ["a"], H, impl="fused", **parallel)
    assert SplitLanguageModellingHead({"a": 3}, ["a"], H, impl="chunked", **parallel).impl == "chunked"


def test_unknown_impl_message_is_the_same_text_in_both_frameworks():
    import torch_heads

    with pytest.raises(ValueError) as torch_error:
        torch_heads.SplitLanguageModellingHead({"a": 3}, ["a"], H, impl="bogus")
    with pytest.raises(ValueError) as jax_error:
        SplitLanguageModellingHead({"a": 3}, ["a"], H, rngs=nnx.Rngs(0), impl="bogus")
    # Each lists its own registry; the sentence around the list is the same.
    assert [str(e.value).split("(")[0] for e in (torch_error, jax_error)] == ["impl must be None or one of "] * 2


def test_forward_errors_mirror_torch():
    torch = pytest.importorskip("torch")
    import torch_heads

    def both(name, args, call):
        with pytest.raises((TypeError, ValueError)) as torch_error:
            call(getattr(torch_heads, name)(*args), torch)
        with pytest.raises((TypeError, ValueError)) as jax_error:
            call(getattr(jax_heads, name)(*args, rngs=nnx.Rngs(0)), jnp)
        assert type(jax_error.value) is type(torch_error.value)
        return str(torch_error.value), str(jax_error.value)

    def hidden(xp, shape, dtype="float32"):
        return xp.zeros(shape, dtype=getattr(xp, dtype))

    same = [
        both("ClassificationHead", (H, 3, 0.0), lambda m, xp: m(hidden(xp, (2, 5)))),
        both("ClassificationHead", (H, 3, 0.0), lambda m, xp: m(hidden(xp, (2, H)), hidden(xp, (3,), "int32"))),
        both("EmbeddingHead", (H, 4, False), lambda m, xp: m(hidden(xp, (2, 3, 7)))),
        both(
            "SplitLanguageModellingHead",
            (SPLITS, ORDER, H),
            lambda m, xp: m(hidden(xp, (2, 9)), hidden(xp, (2,), "int32")),
        ),
        both(
            "SplitLanguageModellingHead",
            (SPLITS, ORDER, H),
            lambda m, xp: m(hidden(xp, (2, H)), hidden(xp, (3,), "int32")),
        ),
        both("SplitTokenEmbeddings", (SPLITS, ORDER, H), lambda m, xp: m(xp.asarray([[0, 3], [-2, 1]]))),
    ]
    for torch_message, jax_message in same:
        assert jax_message == torch_message
    # Messages that name the framework's array type differ only in that name.
    torch_message, jax_message = both(
        "ClassificationHead", (H, 3, 0.0), lambda m, xp: m(hidden(xp, (2, H)), hidden(xp, (2,)))
    )
    assert (
        "pooling_mask must be a bool or integer" in torch_message
        and "pooling_mask must be a bool or integer" in jax_message
    )
    torch_message, jax_message = both("ClassificationHead", (H, 3, 0.0), lambda m, xp: m([[0.0] * H]))
    assert torch_message == "hidden_states must be a torch.Tensor, got list"
    assert jax_message == "hidden_states must be a jax.Array, got list"
