"""The language-modelling heads' loss configuration in both frameworks: per-split ``bias``, ``softcap``,
``label_smoothing``, ``lse_square_scale`` and ``reduction``.

Each head (torch and Flax, every implementation that runs on a CPU) is run with each option alone and
all together, in all three reductions, on a ragged shape with ignored labels, and its loss and every
gradient — hidden states, each split's weight and bias — are compared with the float64 ground truth
written out by hand (``ground_truth.lce_options_ground_truth``) on the head's concatenated parameters.
An implementation that does not support an option (``REGISTRY[impl].options``) must refuse it by name.
The defaults are d9d's head, unchanged, on every implementation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from ground_truth import lce_options_ground_truth, upstream_for
from helpers import CPU_IMPLS

import jax_heads
import torch_heads
from heads_common import LM_IGNORE_INDEX
from heads_common.registry import LOSS_OPTIONS
from heads_common.tolerances import assert_close

SPLITS = {"text": 97, "special": 4}
ORDER = ["special", "text"]  # not the dict's order: global ids follow split_order
V = 101
H = 12
B, S = 2, 7  # ragged: no dimension a multiple of a tile
OPTION_SETS = {
    "defaults": {},
    "bias": {"bias": True},
    "softcap": {"softcap": 2.0},
    "smoothing": {"label_smoothing": 0.2},
    "zloss": {"lse_square_scale": 0.05},
    "all": {"bias": True, "softcap": 2.0, "label_smoothing": 0.2, "lse_square_scale": 0.05},
}
REDUCTIONS = ("none", "sum", "mean")


def supported(framework: str, impl: str, options: dict) -> bool:
    lib = torch_heads if framework == "torch" else jax_heads
    names = {name for name in LOSS_OPTIONS if options.get(name) not in (None, False, 0.0)}
    return names <= lib.functional.REGISTRY[impl].options


def make_head(framework: str, impl: str | None, extra: dict, options: dict, reduction: str, seed: int = 0):
    if framework == "torch":
        torch.manual_seed(seed)
        return torch_heads.SplitLanguageModellingHead(
            SPLITS, ORDER, H, impl=impl, reduction=reduction, **options, **extra
        )
    return jax_heads.SplitLanguageModellingHead(
        SPLITS, ORDER, H, rngs=nnx.Rngs(seed), impl=impl, reduction=reduction, **options, **extra
    )


def make_inputs(seed: int):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((B, S, H)) * 3.0  # logits of a few units: a softcap of 2 changes them
    labels = rng.integers(0, V, (B, S))
    labels[0, :2] = V - 1  # the last row of "text", the end of the concatenation
    labels[1, 3] = 0  # the first row of "special"
    labels[0, 4] = labels[1, 6] = LM_IGNORE_INDEX
    return hidden, labels, rng.standard_normal((B, S))


def run(framework: str, head, hidden, labels, upstream, reduction: str):
    """(loss, d_hidden, d_weight (V, H), d_bias (V,) or None, weight, bias or None), float64 NumPy,
    the parameters and their gradients concatenated in ``split_order``."""
    if framework == "torch":
        h = torch.tensor(hidden, dtype=torch.float32, requires_grad=True)
        loss = head(h, torch.tensor(labels))
        loss.backward(torch.tensor(upstream, dtype=torch.float32) if reduction == "none" else None)
        layers = [head.lm_head[name] for name in ORDER]
        cat = lambda xs: torch.cat(xs).detach().double().numpy()  # noqa: E731
        d_bias = cat([layer.bias.grad for layer in layers]) if head.has_bias else None
        bias = None if head.bias() is None else head.bias().detach().double().numpy()
        return (loss.detach().double().numpy(), h.grad.double().numpy(), cat([layer.weight.grad for layer in layers]),
                d_bias, head.weight().detach().double().numpy(), bias)

    y = jnp.asarray(labels, jnp.int32)

    def objective(module, h):
        loss = module(h, y)
        return (jnp.sum(loss * jnp.asarray(upstream, jnp.float32)) if reduction == "none" else loss), loss

    (_, loss), (grads, d_hidden) = nnx.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        head, jnp.asarray(hidden, jnp.float32)
    )
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    d_weight = np.concatenate([f64(grads["lm_head"][name]["kernel"][...]).T for name in ORDER])
    d_bias = np.concatenate([f64(grads["lm_head"][name]["bias"][...]) for name in ORDER]) if head.has_bias else None
    bias = None if head.bias() is None else f64(head.bias())
    return f64(loss), f64(d_hidden), d_weight, d_bias, f64(head.weight()), bias


def truth(hidden, labels, upstream, weight, bias, options, reduction):
    per_token = upstream_for((B, S), reduction, labels, None, LM_IGNORE_INDEX) if reduction != "none" else upstream
    loss, _, d_hidden, d_weight, d_bias = lce_options_ground_truth(
        hidden.reshape(-1, H), weight, labels.reshape(-1), np.reshape(per_token, -1), bias=bias,
        softcap=options.get("softcap"), label_smoothing=options.get("label_smoothing", 0.0),
        lse_square_scale=options.get("lse_square_scale", 0.0), ignore_index=LM_IGNORE_INDEX,
    )
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / max(int((labels != LM_IGNORE_INDEX).sum()), 1)
    else:
        loss = loss.reshape(B, S)
    return loss, d_hidden.reshape(B, S, H), d_weight, d_bias if bias is not None else None


CASES = [
    pytest.param(fw, impl, extra, name, reduction, id=f"{fw}-{impl}-{name}-{reduction}")
    for fw, impl, extra in CPU_IMPLS
    for name in OPTION_SETS
    for reduction in REDUCTIONS
    if not (impl == "fused" and reduction == "none")  # refused at construction (test_fused_head_needs_sum_or_mean)
]


@pytest.mark.parametrize("framework, impl, extra, name, reduction", CASES)
def test_head_options_against_float64_truth(framework, impl, extra, name, reduction):
    options = OPTION_SETS[name]
    head = make_head(framework, impl, extra, options, reduction, seed=len(name))
    hidden, labels, upstream = make_inputs(seed=len(name) + 10 * REDUCTIONS.index(reduction))
    if not supported(framework, impl, options):
        with pytest.raises(ValueError, match="does not support"):
            run(framework, head, hidden, labels, upstream, reduction)
        return
    loss, d_hidden, d_weight, d_bias, weight, bias = run(framework, head, hidden, labels, upstream, reduction)
    assert (bias is not None) == bool(options.get("bias"))
    want = truth(hidden, labels, upstream, weight, bias, options, reduction)
    for what, got, expected in zip(("loss", "d_hidden", "d_weight", "d_bias"), (loss, d_hidden, d_weight, d_bias),
                                   want, strict=True):
        if expected is None:
            assert got is None
            continue
        assert_close(f"{framework}-{impl}-{name}-{reduction} {what}", got, expected, "float32")


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_softcap_at_gemma_scale_changes_the_head_loss(framework):
    """Soft-capping at 30 on logits of tens changes the loss by more than 1e-3, and the head follows the truth."""
    hidden, labels, _ = make_inputs(seed=5)
    hidden = hidden * 60.0
    losses = []
    for options in ({"softcap": 30.0}, {}):
        head = make_head(framework, "reference", {}, options, "mean")
        loss, *_, weight, bias = run(framework, head, hidden, labels, None, "mean")
        assert_close(f"{framework} {options}", loss, truth(hidden, labels, None, weight, bias, options, "mean")[0],
                     "float32")
        losses.append(float(loss))
    assert abs(losses[0] - losses[1]) > 1e-3


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_bias_parameters_layout_and_initialisation(framework):
    """One ``(V_split,)`` bias per split, drawn as torch's ``nn.Linear`` draws it (uniform in ±1/sqrt(H)),
    redrawn by ``reset_parameters``; none without ``bias=True``."""
    head = make_head(framework, None, {}, {"bias": True}, "none")
    plain = make_head(framework, None, {}, {}, "none")
    assert head.has_bias and not plain.has_bias and plain.bias() is None
    if framework == "torch":
        biases = {name: head.lm_head[name].bias.detach().numpy().copy() for name in SPLITS}
        assert all(plain.lm_head[name].bias is None for name in SPLITS)
    else:
        biases = {name: np.array(head.lm_head[name].bias[...]) for name in SPLITS}
        assert all(plain.lm_head[name].bias is None for name in SPLITS)
    assert {name: b.shape for name, b in biases.items()} == {name: (size,) for name, size in SPLITS.items()}
    values = np.concatenate(list(biases.values()))
    assert np.all(np.abs(values) <= 1 / np.sqrt(H)) and np.std(values) > 0.1 / np.sqrt(H)
    np.testing.assert_array_equal(np.asarray(head.bias(), np.float32) if framework == "jax"
                                  else head.bias().detach().numpy(), np.concatenate([biases[n] for n in ORDER]))
    head.reset_parameters()
    after = head.bias().detach().numpy() if framework == "torch" else np.asarray(head.bias())
    assert not np.any(after == np.concatenate([biases[n] for n in ORDER]))


BAD_OPTIONS = [
    pytest.param({"bias": 1}, TypeError, "bias must be a bool", id="bias-int"),
    pytest.param({"bias": None}, TypeError, "bias must be a bool", id="bias-none"),
    pytest.param({"softcap": 0.0}, ValueError, r"softcap must be > 0 \(or None\), got 0.0", id="softcap-0"),
    pytest.param({"softcap": -30.0}, ValueError, "softcap must be > 0", id="softcap-negative"),
    pytest.param({"softcap": float("nan")}, ValueError, "softcap must be finite, got nan", id="softcap-nan"),
    pytest.param({"softcap": True}, TypeError, "softcap must be a float", id="softcap-bool"),
    pytest.param({"softcap": "30"}, TypeError, "softcap must be a float", id="softcap-str"),
    pytest.param({"label_smoothing": 1.0}, ValueError, r"label_smoothing must be in \[0, 1\), got 1.0",
                 id="smoothing-1"),
    pytest.param({"label_smoothing": -0.1}, ValueError, r"label_smoothing must be in \[0, 1\)", id="smoothing-neg"),
    pytest.param({"lse_square_scale": -1e-4}, ValueError, "lse_square_scale must be >= 0", id="zloss-negative"),
    pytest.param({"lse_square_scale": float("inf")}, ValueError, "lse_square_scale must be finite", id="zloss-inf"),
    pytest.param({"reduction": "avg"}, ValueError, r"reduction must be one of \('none', 'sum', 'mean'\)",
                 id="reduction-avg"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_OPTIONS)
def test_bad_options_are_refused_at_construction_with_the_same_text(kwargs, error, match):
    errors = []
    for make in (lambda: torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, **kwargs),
                 lambda: jax_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, rngs=nnx.Rngs(0), **kwargs)):
        with pytest.raises(error, match=match) as info:
            make()
        errors.append(str(info.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_implementation_for_honours_the_options(framework):
    """``implementation_for`` answers for the head's options: a named implementation that lacks one is
    refused by name, as the forward refuses it."""
    hidden = torch.zeros(1, H) if framework == "torch" else jnp.zeros((1, H))
    for impl in ("reference", "chunked"):
        head = make_head(framework, impl, {}, {"softcap": 30.0}, "none")
        if supported(framework, impl, {"softcap": 30.0}):
            assert head.implementation_for(hidden) == impl
        else:
            with pytest.raises(ValueError, match="does not support softcap"):
                head.implementation_for(hidden)


def test_fused_head_needs_sum_or_mean():
    with pytest.raises(ValueError, match="impl='fused' cannot run in the head: .* reduction 'sum' or 'mean'"):
        jax_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, rngs=nnx.Rngs(0), impl="fused")
    for reduction in ("sum", "mean"):
        head = jax_heads.SplitLanguageModellingHead(
            SPLITS, ORDER, H, rngs=nnx.Rngs(0), impl="fused", reduction=reduction
        )
        assert head.implementation_for(jnp.zeros((1, H))) == "fused"


def test_flax_head_with_bias_and_options_trains_under_nnx_jit():
    import optax

    head = make_head("jax", "reference", {}, OPTION_SETS["all"], "mean")
    optimizer = nnx.Optimizer(head, optax.adam(0.05), wrt=nnx.Param)
    hidden, labels, _ = make_inputs(seed=2)
    hidden, labels = jnp.asarray(hidden, jnp.float32), jnp.asarray(labels)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: m(hidden, labels))(model)
        opt.update(model, grads)
        return loss, grads

    first, grads = step(head, optimizer)
    assert all(np.any(np.asarray(grads["lm_head"][name]["bias"][...]) != 0) for name in SPLITS)
    for _ in range(4):
        loss, _ = step(head, optimizer)
    assert float(loss) < float(first)


# --- d9d checkpoints and the torch state dict ----------------------------------------------------


def d9d_state_dict() -> dict[str, torch.Tensor]:
    """A d9d checkpoint of the head: split weights only (d9d's head is bias-free)."""
    torch.manual_seed(3)
    return {f"lm_head.{name}.weight": torch.randn(size, H) for name, size in SPLITS.items()}


def test_d9d_checkpoint_loads_strictly_into_the_default_head():
    head = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, H)
    state = d9d_state_dict()
    head.load_state_dict(state, strict=True)
    assert all(torch.equal(head.state_dict()[key], value) for key, value in state.items())


def test_head_with_bias_refuses_a_bias_free_checkpoint_under_strict():
    head = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, bias=True)
    assert {key: tuple(v.shape) for key, v in head.state_dict().items() if key.endswith("bias")} == {
        "lm_head.text.bias": (97,), "lm_head.special.bias": (4,)
    }
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: .*lm_head\.text\.bias"):
        head.load_state_dict(d9d_state_dict(), strict=True)
    biases = head.bias().detach().clone()
    result = head.load_state_dict(d9d_state_dict(), strict=False)  # the weights load, the biases stay
    assert sorted(result.missing_keys) == ["lm_head.special.bias", "lm_head.text.bias"]
    assert torch.equal(head.bias(), biases)


def test_state_dict_helpers_carry_the_biases_without_a_group():
    head = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, bias=True)
    full = head.full_state_dict()
    assert list(full) == list(head.state_dict())
    local = head.shard_state_dict({f"m.{k}": v for k, v in full.items()}, prefix="m.")
    assert all(torch.equal(local[f"m.{k}"], v) for k, v in full.items())
    with pytest.raises(KeyError, match="lm_head.special.bias"):
        head.shard_state_dict(d9d_state_dict())
    wrong = dict(full, **{"lm_head.text.bias": torch.zeros(96)})
    with pytest.raises(ValueError, match=r"lm_head.text.bias must be the unsharded \(97,\) bias, got \(96,\)"):
        head.shard_state_dict(wrong)


def test_vocab_parallel_head_shards_and_gathers_the_biases(gloo_world):
    """On a one-rank group the shard is the whole vocabulary: shard_state_dict and full_state_dict
    (through the all_gather) carry ``lm_head.<split>.bias``; a head at the defaults still runs. The
    2- and 3-rank cases run in ``multidevice/torch_vocab_parallel.py``."""
    source = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, bias=True)
    head = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, bias=True, vocab_parallel_group=gloo_world)
    head.load_state_dict(head.shard_state_dict(source.state_dict()), strict=True)
    gathered = head.full_state_dict()
    assert list(gathered) == list(source.state_dict())
    assert all(torch.equal(gathered[key], value) for key, value in source.state_dict().items())

    plain = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, vocab_parallel_group=gloo_world, reduction="sum")
    plain.load_state_dict(d9d_state_dict(), strict=True)
    single = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, H, reduction="sum")
    single.load_state_dict(d9d_state_dict(), strict=True)
    hidden, labels, _ = make_inputs(seed=1)
    hidden, labels = torch.tensor(hidden, dtype=torch.float32), torch.tensor(labels)
    assert_close("parallel sum", plain(hidden, labels).detach().double().numpy(),
                 single(hidden, labels).detach().double().numpy(), "float32")


def test_flax_shard_kernels_places_the_biases_with_the_kernels():
    """The biases follow their kernels over ``vocab_axis`` (the 4-device case of the kernels runs in
    ``multidevice/jax_vocab_parallel.py``); on one device the placement is the vocabulary split."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("vocab",))
    head = jax_heads.SplitLanguageModellingHead(
        SPLITS, ORDER, H, rngs=nnx.Rngs(0), bias=True, mesh=mesh, vocab_axis="vocab"
    )
    before = np.asarray(head.bias())
    head.shard_kernels()
    for name in SPLITS:
        assert head.lm_head[name].bias[...].sharding.spec == jax.sharding.PartitionSpec("vocab")
    np.testing.assert_array_equal(np.asarray(head.bias()), before)
