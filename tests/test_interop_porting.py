"""interop.porting: torch_heads <-> jax_heads weight porting.

Round trips give bit-identical weights, ported heads compute the same outputs within
``PARITY_FLOAT32``, and any error (a configuration mismatch, a parameter without values, a
narrowing that would create infinities) raises before anything is copied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_heads
import torch_heads
from heads_common.tolerances import PARITY_FLOAT32, assert_close, rel_err
from interop.porting import port_flax_to_torch, port_torch_to_flax

H = 12
SPLITS = {"text": 61, "special": 3}
ORDER = ["text", "special"]

CONFIGS = {
    "ClassificationHead": (H, 5, 0.1),
    "EmbeddingHead": (H, 7, True),
    "EmbeddingHead-no-projection": (H, None, True),
    "SplitLanguageModellingHead": (SPLITS, ORDER, H),
    "SplitLanguageModellingHead-bias": (SPLITS, ORDER, H),
    "SplitTokenEmbeddings": (SPLITS, ORDER, H),
}
# Keyword arguments of a configuration, both frameworks.
CONFIG_KWARGS = {"SplitLanguageModellingHead-bias": {"bias": True}}

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def make_pair(name: str, dtype: str = "float32", seed: int = 0):
    cls = name.split("-")[0]
    args, kwargs = CONFIGS[name], CONFIG_KWARGS.get(name, {})
    torch.manual_seed(seed)
    torch_head = getattr(torch_heads, cls)(*args, **kwargs).to(TORCH_DTYPES[dtype])
    flax_head = getattr(jax_heads, cls)(*args, **kwargs, rngs=nnx.Rngs(seed + 1), param_dtype=jnp.dtype(dtype))
    return torch_head, flax_head


def torch_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def to_jax(t: torch.Tensor) -> jax.Array:
    return jnp.asarray(t.detach().float().numpy())


def to_torch(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_identical(name, dtype):
    torch_head, flax_head = make_pair(name, dtype)
    before = torch_weights(torch_head)
    assert port_torch_to_flax(torch_head, flax_head) is flax_head
    fresh, _ = make_pair(name, dtype, seed=7)
    if before:
        assert any(not torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    assert port_flax_to_torch(flax_head, fresh) is fresh
    after = torch_weights(fresh)
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype
        assert torch.equal(after[key], value), key
    # The flax side holds the torch values, transposed for nnx.Linear kernels, in its own dtype.
    for leaf in jax.tree.leaves(nnx.state(flax_head, nnx.Param)):
        assert leaf.dtype == jnp.dtype(dtype)


def test_dtype_is_cast_to_the_destination():
    torch_head, _ = make_pair("SplitLanguageModellingHead", "float32")
    _, flax_bf16 = make_pair("SplitLanguageModellingHead", "bfloat16")
    port_torch_to_flax(torch_head, flax_bf16)
    kernel = flax_bf16.lm_head["text"].kernel[...]
    assert kernel.dtype == jnp.bfloat16
    want = torch_head.lm_head["text"].weight.detach().to(torch.bfloat16).float().numpy().T
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), want)
    torch_f32 = port_flax_to_torch(flax_bf16, make_pair("SplitLanguageModellingHead", "float32", seed=3)[0])
    assert torch_f32.lm_head["text"].weight.dtype == torch.float32
    np.testing.assert_array_equal(torch_f32.lm_head["text"].weight.detach().numpy(), want.T)


def test_ported_weights_do_not_share_memory():
    torch_head, flax_head = make_pair("ClassificationHead")
    port_torch_to_flax(torch_head, flax_head)
    kept = np.array(flax_head.score.kernel[...])
    with torch.no_grad():
        torch_head.score.weight.add_(1.0)
    np.testing.assert_array_equal(flax_head.score.kernel[...], kept)


@pytest.mark.parametrize("direction", ["torch_to_flax", "flax_to_torch"])
def test_ported_heads_agree(direction):
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 9, H)).astype(np.float32)
    mask = (rng.random((2, 9)) < 0.5).astype(np.int64)
    labels = rng.integers(0, 64, (2, 9))
    labels[0, :3] = -100
    ids = rng.integers(0, 64, (3, 4))

    def pair(name):
        torch_head, flax_head = make_pair(name)
        if direction == "torch_to_flax":
            port_torch_to_flax(torch_head, flax_head)
        else:
            port_flax_to_torch(flax_head, torch_head)
        return torch_head.eval(), flax_head

    torch_head, flax_head = pair("ClassificationHead")
    flax_head.eval()
    for args in ((hidden,), (hidden, mask)):
        want = torch_head(*map(torch.from_numpy, args)).detach().numpy()
        assert rel_err(flax_head(*map(jnp.asarray, args)), want) <= PARITY_FLOAT32

    for name in ("EmbeddingHead", "EmbeddingHead-no-projection"):
        torch_head, flax_head = pair(name)
        want = torch_head(torch.from_numpy(hidden), torch.from_numpy(mask)).detach().numpy()
        assert rel_err(flax_head(jnp.asarray(hidden), jnp.asarray(mask)), want) <= PARITY_FLOAT32

    torch_head, flax_head = pair("SplitTokenEmbeddings")
    np.testing.assert_array_equal(flax_head(jnp.asarray(ids)), torch_head(torch.from_numpy(ids)).detach().numpy())

    # LM head: the per-token loss and the gradient with respect to the hidden states.
    torch_head, flax_head = pair("SplitLanguageModellingHead")
    torch_hidden = torch.from_numpy(hidden).requires_grad_(True)
    torch_loss = torch_head(torch_hidden, torch.from_numpy(labels))
    torch_loss.sum().backward()
    flax_loss, flax_grad = jax.value_and_grad(lambda h: flax_head(h, jnp.asarray(labels)).sum())(jnp.asarray(hidden))
    assert rel_err(flax_head(jnp.asarray(hidden), jnp.asarray(labels)), torch_loss.detach().numpy()) <= PARITY_FLOAT32
    assert rel_err(flax_loss, torch_loss.sum().item()) <= PARITY_FLOAT32
    assert rel_err(flax_grad, torch_hidden.grad.numpy()) <= PARITY_FLOAT32


def test_ported_bfloat16_lm_heads_agree_with_ground_truth():
    from ground_truth import lce_ground_truth

    torch_head, flax_head = make_pair("SplitLanguageModellingHead", "bfloat16")
    port_torch_to_flax(torch_head, flax_head)
    rng = np.random.default_rng(1)
    hidden = torch.from_numpy(rng.standard_normal((15, H)).astype(np.float32)).to(torch.bfloat16)
    labels = rng.integers(0, 64, 15)
    labels[[2, 9]] = -100
    weight = torch_head.weight().detach()
    want = lce_ground_truth(hidden.float().numpy(), weight.float().numpy(), labels, np.ones(15))[0]
    torch_loss = torch_head(hidden, torch.from_numpy(labels)).detach().numpy()
    flax_loss = flax_head(jnp.asarray(hidden.float().numpy(), jnp.bfloat16), jnp.asarray(labels))
    # Naive baseline: bfloat16 logits.
    logits = (hidden @ weight.T).float()
    naive = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels), reduction="none").numpy()
    assert_close("torch", torch_loss, want, "bfloat16", naive=naive)
    assert_close("flax", flax_loss, want, "bfloat16", naive=naive)


def _mismatch_cases():
    def t(cls, *args):
        return getattr(torch_heads, cls)(*args)

    def f(cls, *args):
        return getattr(jax_heads, cls)(*args, rngs=nnx.Rngs(0))

    return [
        ("head-type", t("ClassificationHead", H, 5, 0.1), f("EmbeddingHead", H, 5, False), "head type mismatch"),
        (
            "hidden-size",
            t("ClassificationHead", H, 5, 0.1),
            f("ClassificationHead", H + 1, 5, 0.1),
            "hidden_size mismatch: torch has 12, flax has 13",
        ),
        (
            "num-labels",
            t("ClassificationHead", H, 5, 0.1),
            f("ClassificationHead", H, 4, 0.1),
            "num_labels mismatch: torch has 5, flax has 4",
        ),
        (
            "embedding-dim-presence",
            t("EmbeddingHead", H, 7, True),
            f("EmbeddingHead", H, None, True),
            "embedding_dim mismatch: torch has 7, flax has None",
        ),
        (
            "embedding-dim",
            t("EmbeddingHead", H, 7, True),
            f("EmbeddingHead", H, 6, True),
            "embedding_dim mismatch: torch has 7, flax has 6",
        ),
        ("normalize", t("EmbeddingHead", H, 7, True), f("EmbeddingHead", H, 7, False), "normalize mismatch"),
        (
            "split-names",
            t("SplitLanguageModellingHead", SPLITS, ORDER, H),
            f("SplitLanguageModellingHead", {"text": 61, "extra": 3}, ["text", "extra"], H),
            "split names mismatch",
        ),
        (
            "split-order",
            t("SplitTokenEmbeddings", SPLITS, ORDER, H),
            f("SplitTokenEmbeddings", SPLITS, ORDER[::-1], H),
            "split_order mismatch",
        ),
        (
            "split-sizes",
            t("SplitTokenEmbeddings", SPLITS, ORDER, H),
            f("SplitTokenEmbeddings", {"text": 61, "special": 4}, ORDER, H),
            r"split sizes mismatch: torch has \{'text': 61, 'special': 3\}, flax has \{'text': 61, 'special': 4\}",
        ),
        (
            "lm-hidden-size",
            t("SplitLanguageModellingHead", SPLITS, ORDER, H),
            f("SplitLanguageModellingHead", SPLITS, ORDER, 2 * H),
            "hidden_size mismatch",
        ),
    ]


@pytest.mark.parametrize("case", _mismatch_cases(), ids=lambda case: case[0])
def test_mismatch_raises_before_copying(case):
    _, torch_head, flax_head, message = case
    torch_before = torch_weights(torch_head)
    flax_before = [np.array(x) for x in jax.tree.leaves(nnx.state(flax_head, nnx.Param))]
    with pytest.raises(ValueError, match=message):
        port_torch_to_flax(torch_head, flax_head)
    with pytest.raises(ValueError, match=message):
        port_flax_to_torch(flax_head, torch_head)
    for key, value in torch_before.items():
        assert torch.equal(torch_head.state_dict()[key], value)
    for old, new in zip(flax_before, jax.tree.leaves(nnx.state(flax_head, nnx.Param))):
        np.testing.assert_array_equal(old, new)


def test_non_heads_are_type_errors():
    torch_head, flax_head = make_pair("ClassificationHead")
    with pytest.raises(TypeError, match="torch_module must be a torch_heads head"):
        port_torch_to_flax(torch.nn.Linear(H, 5), flax_head)
    with pytest.raises(TypeError, match="flax_module must be a jax_heads head .* got Linear"):
        port_flax_to_torch(nnx.Linear(H, 5, rngs=nnx.Rngs(0)), torch_head)


# --- atomic ports: on any error the destination is untouched --------------------------------------


def flax_values(module) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(nnx.state(module, nnx.Param))]


def assert_flax_unchanged(module, before: list[np.ndarray]) -> None:
    after = flax_values(module)
    assert len(after) == len(before)
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old, new)


def assert_torch_unchanged(module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_torch_to_flax_with_a_split_on_the_meta_device_writes_nothing():
    torch_head, flax_head = make_pair("SplitLanguageModellingHead")
    torch_head.lm_head["special"].to("meta")  # the second split: the first would be written first
    before = flax_values(flax_head)
    with pytest.raises(ValueError, match=r"torch lm_head\.special\.weight is on the meta device and holds no values"):
        port_torch_to_flax(torch_head, flax_head)
    assert_flax_unchanged(flax_head, before)


def test_flax_to_torch_with_a_deleted_kernel_writes_nothing():
    torch_head, flax_head = make_pair("SplitLanguageModellingHead")
    flax_head.lm_head["special"].kernel[...].delete()
    before = torch_weights(torch_head)
    with pytest.raises(ValueError, match=r"flax array for lm_head\.special\.weight has been deleted"):
        port_flax_to_torch(flax_head, torch_head)
    assert_torch_unchanged(torch_head, before)


def test_flax_to_torch_into_a_split_on_the_meta_device_writes_nothing():
    torch_head, flax_head = make_pair("SplitTokenEmbeddings")
    torch_head.token_embedding["special"].to("meta")
    text_before = torch_head.token_embedding["text"].weight.detach().clone()
    with pytest.raises(ValueError, match=r"token_embedding\.special\.weight is on the meta device and cannot hold"):
        port_flax_to_torch(flax_head, torch_head)
    assert torch.equal(torch_head.token_embedding["text"].weight, text_before)


def _narrowing_pair(direction: str, wide: str, narrow: str):
    """``(source, destination)`` LM heads: the source ``wide`` with 3 values of 1e5 in its second split."""
    torch_dtypes = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16}
    torch.manual_seed(0)
    torch_dtype = torch_dtypes[wide if direction == "torch_to_flax" else narrow]
    torch_head = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, H).to(torch_dtype)
    flax_dtype = jnp.dtype(narrow if direction == "torch_to_flax" else wide)  # float32 or float16
    flax_head = jax_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, rngs=nnx.Rngs(1), param_dtype=flax_dtype)
    if direction == "torch_to_flax":
        with torch.no_grad():
            torch_head.lm_head["special"].weight[0, :3] = 1e5 if narrow == "float16" else 1e300
        return torch_head, flax_head
    kernel = flax_head.lm_head["special"].kernel
    kernel[...] = kernel[...].at[:3, 0].set(1e5)
    return flax_head, torch_head


@pytest.mark.parametrize("direction", ["torch_to_flax", "flax_to_torch"])
def test_narrowing_into_infinities_is_refused_with_the_count(direction):
    source, destination = _narrowing_pair(direction, "float32", "float16")
    port = port_torch_to_flax if direction == "torch_to_flax" else port_flax_to_torch
    before = flax_values(destination) if direction == "torch_to_flax" else torch_weights(destination)
    with pytest.raises(
        ValueError,
        match=r"lm_head\.special\.weight would hold 3 non-finite value\(s\) that the source does not: "
        r"float16 cannot represent magnitudes up to 100000",
    ):
        port(source, destination)
    if direction == "torch_to_flax":
        assert_flax_unchanged(destination, before)
    else:
        assert_torch_unchanged(destination, before)


def test_float64_to_float32_past_its_range_is_refused():
    source, destination = _narrowing_pair("torch_to_flax", "float64", "float32")
    before = flax_values(destination)
    with pytest.raises(ValueError, match=r"3 non-finite value\(s\) .* float32 cannot represent magnitudes up to 1e\+3"):
        port_torch_to_flax(source, destination)
    assert_flax_unchanged(destination, before)


@pytest.mark.parametrize("direction", ["torch_to_flax", "flax_to_torch"])
def test_non_finite_values_the_source_holds_are_ported_as_they_are(direction):
    torch_head, flax_head = make_pair("SplitLanguageModellingHead")
    special = [np.nan, np.inf, -np.inf]
    if direction == "torch_to_flax":
        with torch.no_grad():
            torch_head.lm_head["special"].weight[:, 0] = torch.tensor(special)
        flax16 = jax_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, rngs=nnx.Rngs(1), param_dtype=jnp.float16)
        port_torch_to_flax(torch_head, flax16)
        ported = np.asarray(flax16.lm_head["special"].kernel[...], np.float64)[0]
    else:
        kernel = flax_head.lm_head["special"].kernel
        kernel[...] = kernel[...].at[0, :].set(jnp.array(special))
        torch16 = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, H).half()
        port_flax_to_torch(flax_head, torch16)
        ported = torch16.lm_head["special"].weight[:, 0].detach().double().numpy()
    np.testing.assert_array_equal(ported, special)


# --- the LM head's per-split biases --------------------------------------------------------------


def test_biases_are_ported_both_ways_in_the_documented_layout():
    torch_head, flax_head = make_pair("SplitLanguageModellingHead-bias")
    assert {k for k in torch_head.state_dict() if k.endswith(".bias")} == {"lm_head.text.bias", "lm_head.special.bias"}
    port_torch_to_flax(torch_head, flax_head)
    for name, size in SPLITS.items():
        bias = flax_head.lm_head[name].bias[...]
        assert bias.shape == (size,)
        np.testing.assert_array_equal(bias, torch_head.lm_head[name].bias.detach().numpy())
    fresh = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, bias=True)
    port_flax_to_torch(flax_head, fresh)
    np.testing.assert_array_equal(fresh.bias().detach().numpy(), torch_head.bias().detach().numpy())


def test_ported_heads_with_bias_and_options_agree():
    """Loss and every gradient (hidden, each split's weight and bias) of ported heads with all the head options."""
    options = dict(bias=True, softcap=3.0, label_smoothing=0.1, lse_square_scale=0.01, impl="reference")
    torch.manual_seed(0)
    torch_head = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, **options)
    flax_head = jax_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, rngs=nnx.Rngs(1), **options)
    port_torch_to_flax(torch_head, flax_head)
    rng = np.random.default_rng(4)
    hidden = rng.standard_normal((2, 9, H)).astype(np.float32) * 2
    labels = rng.integers(0, 64, (2, 9))
    labels[1, :4] = -100
    upstream = rng.standard_normal((2, 9)).astype(np.float32)

    h = torch.from_numpy(hidden).requires_grad_(True)
    torch_loss = torch_head(h, torch.from_numpy(labels))
    torch_loss.backward(torch.from_numpy(upstream))

    def loss_fn(head, x):
        return (head(x, jnp.asarray(labels)) * upstream).sum()

    flax_loss = flax_head(jnp.asarray(hidden), jnp.asarray(labels))
    grads, d_hidden = nnx.grad(loss_fn, argnums=(0, 1))(flax_head, jnp.asarray(hidden))
    assert rel_err(flax_loss, torch_loss.detach().numpy()) <= PARITY_FLOAT32
    assert rel_err(d_hidden, h.grad.numpy()) <= PARITY_FLOAT32
    for name in ORDER:
        torch_layer = torch_head.lm_head[name]
        assert rel_err(grads["lm_head"][name]["kernel"][...].T, torch_layer.weight.grad.numpy()) <= PARITY_FLOAT32
        assert rel_err(grads["lm_head"][name]["bias"][...], torch_layer.bias.grad.numpy()) <= PARITY_FLOAT32


@pytest.mark.parametrize("with_bias", ["torch", "flax"])
def test_bias_on_one_side_only_is_refused_naming_the_split(with_bias):
    torch.manual_seed(0)
    torch_head = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, bias=with_bias == "torch")
    flax_head = jax_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, rngs=nnx.Rngs(1), bias=with_bias == "flax")
    lacks = "flax" if with_bias == "torch" else "torch"
    message = rf"split 'text' has a bias in {with_bias} \(lm_head.text.bias\) but none in {lacks}"
    torch_before, flax_before = torch_weights(torch_head), flax_values(flax_head)
    with pytest.raises(ValueError, match=message):
        port_torch_to_flax(torch_head, flax_head)
    with pytest.raises(ValueError, match=message):
        port_flax_to_torch(flax_head, torch_head)
    assert_torch_unchanged(torch_head, torch_before)
    assert_flax_unchanged(flax_head, flax_before)


@pytest.mark.parametrize("direction", ["torch_to_flax", "flax_to_torch"])
def test_a_bias_that_cannot_convert_writes_nothing(direction):
    """The last parameter read (the last split's bias) fails: no weight or bias before it is written."""
    torch.manual_seed(0)
    torch_head = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, bias=True)
    flax_head = jax_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, rngs=nnx.Rngs(1), bias=True)
    if direction == "torch_to_flax":
        torch_head.lm_head["special"].bias = torch.nn.Parameter(torch.empty(3, device="meta"))
        before = flax_values(flax_head)
        with pytest.raises(ValueError, match=r"torch lm_head\.special\.bias is on the meta device"):
            port_torch_to_flax(torch_head, flax_head)
        assert_flax_unchanged(flax_head, before)
    else:
        flax_head.lm_head["special"].bias[...] = jnp.full((3,), 1e5, jnp.float32)
        torch16 = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, bias=True).half()
        before = torch_weights(torch16)
        with pytest.raises(ValueError, match=r"lm_head\.special\.bias would hold 3 non-finite value\(s\)"):
            port_flax_to_torch(flax_head, torch16)
        assert_torch_unchanged(torch16, before)
