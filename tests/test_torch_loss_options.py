"""The loss options in the torch implementations beyond the shared grid of ``test_loss_options.py``:
bfloat16 ``chunked`` against the naive same-dtype bound, chunk boundaries and ``gradcheck``, the
derivative orders and ``torch.func`` with options, ``cce``'s float32 backward with ``softcap`` (on
CPU, fed the reference's loss in place of CCE's forward), and the vocabulary-parallel op with every
option on a one-process gloo group (``conftest.py::gloo_world``) against the float64 ground truth.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from ground_truth import lce_options_ground_truth

import torch_heads
from heads_common.tolerances import assert_close
from torch_heads import _cce
from torch_heads.chunked import chunked_loss
from torch_heads.parallel import vocab_parallel_linear_cross_entropy
from torch_heads.reference import loss_terms, transform_logits

IGNORE = -100
N, D, V = 29, 20, 157  # ragged
OPTION_SETS = {
    "bias": {"bias": True},
    "softcap": {"softcap": 2.0},
    "smoothing": {"label_smoothing": 0.2},
    "zloss": {"lse_square_scale": 0.03},
    "lse": {"return_lse": True},
    "all": {"bias": True, "softcap": 2.0, "label_smoothing": 0.2, "lse_square_scale": 0.03, "return_lse": True},
}


def problem(name: str, dtype=torch.float32, n=N, d=D, v=V, device="cpu"):
    """Hidden ``(n, d)``, weight ``(v, d)``, bias ``(v,)`` in ``dtype`` (logits of order 1..4, so a soft-cap
    of 2 changes them), labels with ignored tokens, upstream gradients of the loss and of the lse."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    t = lambda x: torch.from_numpy(x).to(device, dtype)  # noqa: E731
    hidden, weight = t(rng.standard_normal((n, d)) * 2.0), t(rng.standard_normal((v, d)) / np.sqrt(d))
    bias = t(rng.standard_normal(v) * 0.5)
    labels = rng.integers(0, v, n)
    labels[rng.permutation(n)[: n // 5]] = IGNORE
    upstream = torch.from_numpy(rng.standard_normal(n)).float().to(device)
    upstream_lse = torch.from_numpy(rng.standard_normal(n)).float().to(device)
    return hidden, weight, bias, torch.from_numpy(labels).to(device), upstream, upstream_lse


def truth(hidden, weight, bias, labels, upstream, upstream_lse, options):
    """Float64 ground truth of the per-token loss, lse, d_hidden, d_weight, d_bias (for the rounded inputs)."""
    f64 = lambda x: x.detach().cpu().double().numpy()  # noqa: E731
    return lce_options_ground_truth(
        f64(hidden), f64(weight), labels.cpu().numpy(), f64(upstream), bias=f64(bias) if options.get("bias") else None,
        softcap=options.get("softcap"), label_smoothing=options.get("label_smoothing", 0.0),
        lse_square_scale=options.get("lse_square_scale", 0.0),
        upstream_lse=f64(upstream_lse) if options.get("return_lse") else None, ignore_index=IGNORE,
    )


def run(fn, hidden, weight, bias, labels, upstream, upstream_lse, options):
    """``fn(h, w, b, labels, **kwargs)``'s per-token loss, lse and the gradients of
    ``sum(upstream · loss) + sum(upstream_lse · lse)``, as float64 NumPy arrays (None where absent)."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if options.get("bias") else None
    kwargs = {k: v for k, v in options.items() if k != "bias"}
    out = fn(h, w, b, labels, **kwargs)
    loss, lse = out if options.get("return_lse") else (out, None)
    total = (loss.float() * upstream).sum() + (0 if lse is None else (lse.float() * upstream_lse).sum())
    total.backward()
    f64 = lambda x: None if x is None else x.detach().cpu().double().numpy()  # noqa: E731
    return f64(loss), f64(lse), f64(h.grad), f64(w.grad), None if b is None else f64(b.grad)


def check(name, got, want, dtype="float32", naive=None):
    for what, g, t, n in zip(("loss", "lse", "d_hidden", "d_weight", "d_bias"), got, want, naive or [None] * 5):
        if g is not None:
            assert_close(f"{name} {what}", g, t, dtype, naive=n)


def single(impl, **fixed):
    def fn(h, w, b, y, **kwargs):
        return torch_heads.linear_cross_entropy(h, w, y, bias=b, impl=impl, **fixed, **kwargs)

    return fn


# --- chunked --------------------------------------------------------------------------------------


def naive_same_dtype(h, w, b, y, softcap=None, label_smoothing=0.0, lse_square_scale=0.0, return_lse=False):
    """The materialised logits and the loss terms in the input dtype (the baseline of a low-precision dtype)."""
    logits = transform_logits(h @ w.T, b, softcap)
    valid = y != IGNORE
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, torch.where(valid, y, 0)[:, None]).squeeze(1)
    row_sum = logits.sum(dim=-1) if label_smoothing else None
    loss = torch.where(valid, loss_terms(lse, target, row_sum, w.shape[0], label_smoothing, lse_square_scale), 0.0)
    return (loss, torch.where(valid, lse, 0.0)) if return_lse else loss


@pytest.mark.parametrize("name", OPTION_SETS)
def test_chunked_bfloat16_within_the_naive_bound(name):
    options = OPTION_SETS[name]
    inputs = problem(f"bf16-{name}", torch.bfloat16)
    want = truth(*inputs, options)
    got = run(single("chunked"), *inputs, options)
    naive = run(naive_same_dtype, *inputs, options)
    check(f"bf16-{name}", got, want, "bfloat16", naive=naive)


@pytest.mark.parametrize("name", OPTION_SETS)
@pytest.mark.parametrize("rows", [1, 3, 8], ids=lambda r: f"{r}rows")
def test_chunked_options_across_chunk_boundaries(name, rows):
    """Chunks of 1, 3 and 8 rows (the soft-cap's backward splits each chunk in quarters) give the truth."""
    options = OPTION_SETS[name]
    inputs = problem(f"chunks-{name}")

    def fn(h, w, b, y, **kwargs):
        return chunked_loss(h, w, y, IGNORE, rows * V * 4, bias=b, **kwargs)

    check(f"{name}-{rows}rows", run(fn, *inputs, options), truth(*inputs, options))


def test_chunked_options_gradcheck():
    """``gradcheck`` (float64 finite differences) of the loss and the returned lse with every option,
    in 2-row chunks, w.r.t. hidden, weight and bias."""
    hidden, weight, bias, labels, *_ = problem("gradcheck", torch.float64, n=6, d=4, v=9)

    def fn(h, w, b):
        return chunked_loss(h, w, labels, IGNORE, 2 * 9 * 8, bias=b, softcap=1.5, label_smoothing=0.2,
                            lse_square_scale=0.1, return_lse=True)

    assert torch.autograd.gradcheck(fn, tuple(x.clone().requires_grad_() for x in (hidden, weight, bias)))


def test_chunked_defaults_take_the_plain_path():
    """Default option values (softcap None, zero smoothing and z-loss) are the plain loss bit for bit,
    and can be differentiated twice."""
    hidden, weight, _, labels, upstream, _ = problem("defaults")
    h = hidden.clone().requires_grad_()
    plain = chunked_loss(h, weight, labels, IGNORE)
    explicit = chunked_loss(h, weight, labels, IGNORE, softcap=None, label_smoothing=0.0, lse_square_scale=0.0)
    assert torch.equal(plain, explicit)
    (g,) = torch.autograd.grad((explicit * upstream).sum(), h, create_graph=True)
    assert torch.isfinite(torch.autograd.grad((g**2).sum(), h)[0]).all()


@pytest.mark.parametrize("name", OPTION_SETS)
def test_chunked_second_order_with_options_is_refused_clearly(name):
    """First gradients with ``create_graph=True`` equal the reference's; differentiating them raises."""
    options = OPTION_SETS[name]
    hidden, weight, bias, labels, upstream, _ = problem(f"second-{name}", torch.float64)
    kwargs = {k: v for k, v in options.items() if k != "bias"}
    firsts = []
    for impl in ("chunked", "reference"):
        h = hidden.clone().requires_grad_()
        out = torch_heads.linear_cross_entropy(h, weight, labels, bias=bias if "bias" in options else None,
                                               impl=impl, **kwargs)
        loss = out[0] + out[1] if options.get("return_lse") else out
        firsts.append((h, torch.autograd.grad((loss * upstream.double()).sum(), h, create_graph=True)[0]))
    (h, g), (_, expected) = firsts
    assert_close(f"{name} d_hidden", g.detach().numpy(), expected.detach().numpy(), "float64")
    with pytest.raises(RuntimeError, match=r"second-order derivatives .* with loss options .* impl='reference'"):
        torch.autograd.grad((g**2).sum(), h)


def test_torch_func_grad_and_vmap_with_options():
    """``torch.func.grad`` over hidden, weight and bias, and ``vmap`` over a batch of hidden states and
    labels, through the chunked options path, equal plain autograd done one by one."""
    hidden, weight, bias, labels, *_ = problem("func", torch.float64, n=12)
    hidden, labels = hidden.reshape(3, 4, D), labels.reshape(3, 4)
    kwargs = {"softcap": 2.0, "label_smoothing": 0.1, "lse_square_scale": 0.02}

    def objective(h, w, b, y):
        loss, lse = torch_heads.linear_cross_entropy(h, w, y, bias=b, impl="chunked", reduction="mean",
                                                     return_lse=True, **kwargs)
        return loss + lse.sum()

    grads = torch.func.grad(objective, argnums=(0, 1, 2))(hidden, weight, bias, labels)
    args = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    expected = torch.autograd.grad(objective(*args, labels), args)
    for g, e in zip(grads, expected, strict=True):
        assert torch.equal(g, e)
    per_sample = torch.func.vmap(torch.func.grad(objective), in_dims=(0, None, None, 0))(hidden, weight, bias, labels)
    one_by_one = torch.stack([torch.func.grad(objective)(hidden[i], weight, bias, labels[i]) for i in range(3)])
    assert torch.equal(per_sample, one_by_one)


# --- cce's float32 backward -------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cce_float32_backward_with_softcap(reduction):
    """``impl="cce"`` with float32 inputs takes CCE's soft-capped loss and computes the gradients itself
    (chunked, from ``lse = loss + capped target``). CCE needs CUDA; here the reference's loss stands in
    for CCE's forward, so the backward's soft-capping is checked against the float64 truth on CPU."""
    options = {"softcap": 2.0}
    hidden, weight, bias, labels, upstream, upstream_lse = problem(f"cce-f32-{reduction}")

    def fn(h, w, b, y, softcap):
        with torch.no_grad():
            loss = torch_heads.linear_cross_entropy(h, w, y, impl="reference", softcap=softcap)
        return _cce._Float32Backward.apply(h, w, y, loss, IGNORE, softcap)

    got = run(fn, hidden, weight, bias, labels, upstream, upstream_lse, options)
    check(f"cce-f32-{reduction}", got, truth(hidden, weight, bias, labels, upstream, upstream_lse, options))


def test_cce_declares_softcap_only():
    """cut-cross-entropy 25.1.1 has soft-capping (and a boolean shift, which the entry point applies to the
    labels for every implementation); everything else is refused by name, and impl=None falls to chunked."""
    registry = torch_heads.functional.REGISTRY
    assert registry["cce"].options == {"softcap"}
    assert registry["chunked"].options == set(torch_heads.functional.LOSS_OPTIONS)
    for option in ("bias", "label_smoothing", "lse_square_scale", "return_lse"):
        assert "cce" not in registry.supporting(option)
    hidden = torch.zeros(2, 3)
    options = torch_heads.functional.loss_options(None, softcap=30.0, label_smoothing=0.1)
    assert registry.reason("cce", hidden, options).startswith("does not support label_smoothing")
    assert registry.choose(None, hidden, options).name == "chunked"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("impl", ["cce", "chunked"])
def test_cuda_softcap_against_truth(impl, dtype):
    """On CUDA: cut-cross-entropy's soft-capping (exact gradients; float32 through our chunked backward)
    and chunked with every option, against the float64 truth (low precision: the naive bound)."""
    options = {"softcap": 2.0} if impl == "cce" else OPTION_SETS["all"]
    inputs = problem(f"cuda-{impl}-{dtype}", getattr(torch, dtype), n=253, d=123, v=1027, device="cuda")
    got = run(single(impl, filter_eps=None) if impl == "cce" else single(impl), *inputs, options)
    tolerance = {"float32": "float32-tf32" if impl == "cce" else "float32"}.get(dtype, dtype)
    if (impl, dtype) == ("cce", "float16"):
        tolerance = "float16-cce-softcap"
    naive = None if dtype == "float32" else run(naive_same_dtype, *inputs, options)
    check(f"cuda-{impl}-{dtype}", got, truth(*inputs, options), tolerance, naive=naive)


# --- the vocabulary-parallel op ---------------------------------------------------------------------


def parallel(group, **fixed):
    def fn(h, w, b, y, **kwargs):
        return vocab_parallel_linear_cross_entropy(
            h, w, y, vocab_start=0, vocab_size=w.shape[0], group=group, bias_shard=b, **fixed, **kwargs
        )

    return fn


@pytest.mark.parametrize("name", OPTION_SETS)
def test_vocab_parallel_options_against_truth(gloo_world, name):
    options = OPTION_SETS[name]
    inputs = problem(f"parallel-{name}")
    check(f"parallel-{name}", run(parallel(gloo_world), *inputs, options), truth(*inputs, options))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_vocab_parallel_options_reduced_and_shifted_equal_linear_cross_entropy(gloo_world, reduction):
    """Every option with a shift of 2 and a reduction: the same loss, lse and gradients as the
    single-device chunked op (the per-token ``"none"`` case is checked against the truth above)."""
    options = dict(OPTION_SETS["all"], shift=2)
    hidden, weight, bias, labels, upstream, upstream_lse = problem(f"parallel-shift-{reduction}")
    hidden, labels = hidden[:28].reshape(4, 7, D), labels[:28].reshape(4, 7)
    upstream, upstream_lse = upstream[:20].reshape(4, 5), upstream_lse[:20].reshape(4, 5)
    args = (hidden, weight, bias, labels, upstream if reduction == "none" else 1.0, upstream_lse, options)
    got = run(parallel(gloo_world, reduction=reduction), *args)
    want = run(single("chunked", reduction=reduction), *args)
    assert got[1].shape == (4, 5)
    check(f"parallel-shift-{reduction}", got, want)


@pytest.mark.parametrize("name", ["all", "bias"])
def test_vocab_parallel_pallas_shards_take_every_option(gloo_world, name):
    """Pallas shards (interpret mode) with the options, against the float64 truth; impl=None on CPU
    picks the chunked shards, which take them too."""
    options = OPTION_SETS[name]
    inputs = problem(f"parallel-pallas-{name}")
    check(f"parallel-pallas-{name}", run(parallel(gloo_world, impl="pallas", interpret=True), *inputs, options),
          truth(*inputs, options))
    from torch_heads.parallel import select_parallel_implementation

    assert select_parallel_implementation(inputs[0], None, loss_options=frozenset({"softcap"})) == "chunked"


@pytest.mark.parametrize(
    "kwargs",
    [{"softcap": 0.0}, {"label_smoothing": 1.0}, {"lse_square_scale": -1.0}, {"shift": N}, {"return_lse": 1},
     {"bias": "wrong-shape"}, {"bias": "wrong-dtype"}],
    ids=["softcap", "smoothing", "zloss", "shift", "return_lse", "bias-shape", "bias-dtype"],
)
def test_vocab_parallel_refuses_bad_options_as_linear_cross_entropy(gloo_world, kwargs):
    hidden, weight, bias, labels, *_ = problem("parallel-bad")
    b = None
    if "bias" in kwargs:
        b, kwargs = (bias[:-1] if kwargs["bias"] == "wrong-shape" else bias.double()), {}
    errors = []
    for fn in (single("chunked"), parallel(gloo_world)):
        with pytest.raises((TypeError, ValueError)) as info:
            fn(hidden, weight, b, labels.reshape(1, N), **kwargs)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


def test_vocab_parallel_options_under_autocast_equal_linear_cross_entropy(gloo_world):
    """Under CPU bfloat16 autocast the bias is cast with hidden and weight (as ``F.linear`` casts its
    operands) in both ops, which then agree."""
    options = dict(OPTION_SETS["all"])
    inputs = problem("parallel-autocast")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(parallel(gloo_world), *inputs, options)
        want = run(single("chunked"), *inputs, options)
    check("parallel-autocast", got, want)
