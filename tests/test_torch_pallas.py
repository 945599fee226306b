"""``torch_heads`` ``impl="pallas"``: our JAX Pallas kernels called from PyTorch through ``interop``.

On CPU the internal function (``torch_heads._pallas.pallas_loss``) runs the kernels in Pallas
interpret mode with tiny tiles, against the float64 ground truth and bit for bit against the JAX op;
the public ``impl="pallas"`` refuses CPU tensors without importing JAX. The ``gpu`` tests run the
public path on CUDA: ground truth, bit-for-bit parity with ``jax-pallas``, stream ordering under
load, and one optimiser step of the split head. Run them on the GPU machine with
``python -m pytest -m gpu tests/test_torch_pallas.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.monitoring
import pytest
import torch
from helpers import (
    TINY,
    check_against_truth,
    make_inputs,
    naive,
    rng_for,
    to_np,
    truth_for,
)

import interop.dlpack
from heads_common.tolerances import assert_close
from interop.dlpack import to_jax, to_torch
from jax_heads.pallas import pallas_loss as jax_pallas_loss
from torch_heads import (
    SplitLanguageModellingHead,
    linear_cross_entropy,
    select_implementation,
)
from torch_heads._pallas import pallas_loss
from torch_heads.functional import IMPLEMENTATIONS, REGISTRY, reduce_loss

IGNORE = -100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (leading shape, D, V): ragged against the 16-wide TINY tiles everywhere. Most CPU tests share
# the first one so that they share its two compiled programs (interpret mode compiles slowly).
CPU_SHAPES = {"3x13x24x101": ((3, 13), 24, 101), "5x3x7": ((5,), 3, 7)}

# One vocabulary split per token block: the forward's combine of split partials is then the
# identity, so a jitted program (the torch path) and JAX's op-by-op evaluation give the same bits
# whatever the combine does. (It now sums in a fixed order, which the GPU bit-for-bit test checks
# with several splits.)
ONE_SPLIT = dataclasses.replace(TINY, triton=dataclasses.replace(TINY.triton, min_programs=1), sm_count=1)


def interpret_lce(reduction: str = "none", ignore_index: int = IGNORE):
    """The public path (flatten, kernel, reduce, reshape) with the kernel in interpret mode."""

    def fn(h, w, y):
        flat = y.reshape(-1)
        loss = pallas_loss(h.reshape(-1, h.shape[-1]), w, flat, ignore_index, interpret=True, config=TINY)
        loss = reduce_loss(loss, flat != ignore_index, reduction)
        return loss.reshape(y.shape) if reduction == "none" else loss

    return fn


class TraceCounter:
    """Counts JAX traces (``jit`` cache misses) while active."""

    EVENT = "/jax/core/compile/jaxpr_trace_duration"

    def __init__(self):
        self.count = 0

    def _listen(self, event, duration, **kwargs):
        if event == self.EVENT:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


# --- CPU: interpret mode -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dtype, reduction",
    [
        ("3x13x24x101", "float32", "none"),
        ("3x13x24x101", "float32", "sum"),
        ("3x13x24x101", "float32", "mean"),
        ("3x13x24x101", "bfloat16", "none"),
        ("3x13x24x101", "bfloat16", "mean"),
        ("5x3x7", "float32", "none"),
    ],
    ids=lambda v: v,
)
def test_interpret_matches_ground_truth(request, shape, dtype, reduction):
    lead, d, v = CPU_SHAPES[shape]
    rng = rng_for(request.node.callspec.id)
    hidden, weight, labels = make_inputs(rng, lead, d, v, DTYPES[dtype])
    loss, d_hidden, d_weight = check_against_truth(
        interpret_lce(reduction), hidden, weight, labels, reduction, dtype, rng
    )
    assert loss.dtype == torch.float32 and d_hidden.dtype == d_weight.dtype == DTYPES[dtype]
    if reduction == "none":
        assert torch.all(loss[labels == IGNORE] == 0) and torch.all(d_hidden[labels == IGNORE] == 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_interpret_equals_jax_pallas_bit_for_bit(dtype):
    """Same inputs, same kernels: the torch path adds no arithmetic of its own."""
    (n, m), d, v = CPU_SHAPES["3x13x24x101"]
    hidden, weight, labels = make_inputs(rng_for(f"bitwise-{dtype}"), (n * m,), d, v, DTYPES[dtype])
    upstream = torch.randn(n * m, generator=torch.Generator().manual_seed(0))

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = pallas_loss(h, w, labels, IGNORE, interpret=True, config=ONE_SPLIT)
    loss.backward(upstream)

    y = to_jax(labels)

    def f(a, b):
        return jax_pallas_loss(a, b, y, IGNORE, interpret=True, config=ONE_SPLIT)

    j_loss, vjp = jax.vjp(f, to_jax(hidden), to_jax(weight))
    j_dh, j_dw = vjp(to_jax(upstream))
    for name, mine, theirs in (("loss", loss.detach(), j_loss), ("d_hidden", h.grad, j_dh), ("d_weight", w.grad, j_dw)):
        assert torch.equal(mine, to_torch(theirs)), name


def test_interpret_filter_eps_reaches_the_kernel_bit_for_bit():
    """A float ``filter_eps`` runs the kernel's filtered backward: the same bits as JAX's."""
    (n, m), d, v = CPU_SHAPES["3x13x24x101"]
    hidden, weight, labels = make_inputs(rng_for("filtered"), (n * m,), d, v, torch.float32)
    eps = 1e-2
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    pallas_loss(h, w, labels, IGNORE, interpret=True, config=ONE_SPLIT, filter_eps=eps).sum().backward()
    _, vjp = jax.vjp(
        lambda a, b: jax_pallas_loss(a, b, to_jax(labels), IGNORE, interpret=True, config=ONE_SPLIT, filter_eps=eps),
        to_jax(hidden), to_jax(weight),
    )
    j_dh, j_dw = vjp(jax.numpy.ones(n * m, jax.numpy.float32))
    assert torch.equal(h.grad, to_torch(j_dh)) and torch.equal(w.grad, to_torch(j_dw))
    exact = jax.vjp(lambda a, b: jax_pallas_loss(a, b, to_jax(labels), IGNORE, interpret=True, config=ONE_SPLIT),
                    to_jax(hidden), to_jax(weight))[1](jax.numpy.ones(n * m, jax.numpy.float32))
    assert not torch.equal(w.grad, to_torch(exact[1]))  # the filter did skip something


@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_interpret_non_contiguous_upstream_gradient(layout):
    """The (B, S) loss used through ``.t()`` times a random tensor, or through ``.sum()`` (stride 0)."""
    lead, d, v = CPU_SHAPES["3x13x24x101"]
    rng = rng_for(f"upstream-{layout}")
    hidden, weight, labels = make_inputs(rng, lead, d, v, torch.float32)
    scale = torch.from_numpy(rng.standard_normal(lead[::-1])).float()
    upstream = scale.t() if layout == "transposed" else torch.ones(lead)
    truth = truth_for(hidden, weight, labels, upstream.double().reshape(-1).numpy(), "none")

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = interpret_lce()(h, w, labels)
    (loss.t() * scale).sum().backward() if layout == "transposed" else loss.sum().backward()
    for name, value, expected in zip(("loss", "d_hidden", "d_weight"), (loss.detach(), h.grad, w.grad), truth):
        assert_close(name, to_np(value), expected, "float32")


def test_interpret_hands_inputs_over_zero_copy(monkeypatch):
    """Contiguous, aligned hidden and weight reach JAX at their own address (no copy on the way)."""
    lead, d, v = CPU_SHAPES["3x13x24x101"]
    hidden, weight, labels = make_inputs(rng_for("zero-copy"), (lead[0] * lead[1],), d, v, torch.float32)
    seen = {}

    def spy(tensor, **kwargs):
        array = to_jax(tensor, **kwargs)
        seen[tensor.data_ptr()] = array.unsafe_buffer_pointer()
        return array

    monkeypatch.setattr(interop.dlpack, "to_jax", spy)
    pallas_loss(hidden, weight, labels, IGNORE, interpret=True, config=TINY)
    assert seen[hidden.data_ptr()] == hidden.data_ptr()
    assert seen[weight.data_ptr()] == weight.data_ptr()


def test_interpret_all_ignored_and_empty():
    lead, d, v = CPU_SHAPES["3x13x24x101"]
    hidden, weight, labels = make_inputs(rng_for("all-ignored"), lead, d, v, torch.float32, ignored_fraction=1.0)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = interpret_lce("mean")(h, w, labels)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not w.grad.any()

    empty = torch.zeros(0, d, requires_grad=True)
    loss = pallas_loss(empty, w, torch.zeros(0, dtype=torch.long), IGNORE, interpret=True, config=TINY)
    loss.sum().backward()
    assert loss.shape == (0,) and loss.dtype == torch.float32 and empty.grad.shape == (0, d)


def test_interpret_ignore_index_beyond_int32():
    """int64 labels with an ignore index that int32 cannot hold: those positions are still ignored."""
    lead, d, v = CPU_SHAPES["3x13x24x101"]
    hidden, weight, labels = make_inputs(rng_for("wide-ignore"), lead, d, v, torch.float32)

    def fn(h, w, y):
        return interpret_lce("mean", ignore_index=2**40)(h, w, torch.where(y == IGNORE, 2**40, y))

    loss = check_against_truth(fn, hidden, weight, labels, "mean", "float32", rng_for("wide-ignore-upstream"))[0]
    assert torch.equal(loss, interpret_lce("mean")(hidden, weight, labels))


def test_second_call_at_a_shape_does_not_retrace():
    """The jitted programs are cached: only the first call at a new shape traces (and compiles)."""
    hidden, weight, labels = make_inputs(rng_for("retrace"), (11,), 8, 19, torch.float32)

    def step(h):
        h = h.clone().requires_grad_(True)
        pallas_loss(h, weight, labels, IGNORE, interpret=True, config=TINY).sum().backward()

    with TraceCounter() as first:
        step(hidden)
    with TraceCounter() as second:
        step(hidden * 2)  # new values, same shape and dtype
    assert first.count >= 2, "the first call at a new shape traces the forward and the backward"
    assert second.count == 0, f"{second.count} traces on the second call"


# --- CPU: the public path ----------------------------------------------------------------------


def test_registry_and_auto_order():
    assert "pallas" in IMPLEMENTATIONS
    assert REGISTRY.auto_order == ("cce", "chunked")  # impl=None never picks pallas: the benchmark decides


_CPU_SCRIPT = """
import sys, torch, torch_heads
assert "jax" not in sys.modules, "import torch_heads imported jax"
h, w, y = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
for kwargs in ({}, {"reduction": "mean"}):
    try:
        torch_heads.linear_cross_entropy(h, w, y, impl="pallas", **kwargs)
    except ValueError as exc:
        assert "impl='pallas' cannot run" in str(exc) and "needs CUDA" in str(exc), exc
    else:
        raise AssertionError("impl='pallas' ran on CPU tensors")
assert torch_heads.select_implementation(h, None) == "chunked"
assert "jax" not in sys.modules, "refusing CPU tensors imported jax"
"""


def test_cpu_tensors_are_refused_without_importing_jax():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", _CPU_SCRIPT], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# --- GPU ---------------------------------------------------------------------------------------

GPU_SHAPES = {"252x123x507": ((252,), 123, 507), "4x63x123x1027": ((4, 63), 123, 1027)}


def _gpu_cases():
    return [
        pytest.param(shape, dtype, reduction, id=f"{shape}-{dtype}-pallas-{reduction}")
        for shape in GPU_SHAPES
        for dtype in DTYPES
        for reduction in ("none", "sum", "mean")
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("shape, dtype, reduction", _gpu_cases())
def test_gpu_matches_ground_truth(request, shape, dtype, reduction):
    lead, d, v = GPU_SHAPES[shape]
    rng = rng_for(request.node.callspec.id)
    hidden, weight, labels = make_inputs(rng, lead, d, v, DTYPES[dtype], device="cuda")

    def fn(h, w, y):
        return linear_cross_entropy(h, w, y, reduction=reduction, impl="pallas")

    loss, d_hidden, d_weight = check_against_truth(fn, hidden, weight, labels, reduction, dtype, rng)
    assert loss.dtype == torch.float32 and d_hidden.dtype == d_weight.dtype == DTYPES[dtype]


@pytest.mark.gpu
def test_gpu_unsupported_reasons():
    x = torch.zeros(3, 8, device="cuda")
    assert select_implementation(x, "pallas") == "pallas"
    assert select_implementation(x.bfloat16(), "pallas", filter_eps=None) == "pallas"
    with pytest.raises(ValueError, match=r"impl='pallas' cannot run.*float64"):
        select_implementation(x.double(), "pallas")
    assert select_implementation(x, "pallas", filter_eps=1e-3) == "pallas"  # gradient filtering


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n, d, v", [(1000, 256, 32_007), (2048, 512, 8192)], ids=["ragged", "aligned"])
def test_gpu_equals_jax_pallas_bit_for_bit(dtype, n, d, v):
    """``torch_heads`` pallas and ``jax_heads`` pallas (each jitted) give the same bits."""
    import jax_heads

    hidden, weight, labels = make_inputs(rng_for(f"gpu-bitwise-{dtype}-{n}"), (n,), d, v, DTYPES[dtype], device="cuda")
    upstream = torch.randn(n, device="cuda")
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = linear_cross_entropy(h, w, labels, impl="pallas")
    loss.backward(upstream)

    y = to_jax(labels)

    def f(a, b):
        return jax_heads.linear_cross_entropy(a, b, y, impl="pallas")

    j_loss = jax.jit(f)(to_jax(hidden), to_jax(weight))
    j_dh, j_dw = jax.jit(lambda a, b, g: jax.vjp(f, a, b)[1](g))(to_jax(hidden), to_jax(weight), to_jax(upstream))
    for name, mine, theirs in (("loss", loss.detach(), j_loss), ("d_hidden", h.grad, j_dh), ("d_weight", w.grad, j_dw)):
        theirs = to_torch(theirs)
        assert torch.equal(mine, theirs), f"{name}: max |diff| {(mine.float() - theirs.float()).abs().max().item()}"


@pytest.mark.gpu
def test_gpu_misaligned_and_strided_inputs_and_upstream():
    """hidden 2 bytes off 16-byte alignment, weight a transposed view, a transposed upstream gradient."""
    rng = rng_for("gpu-layouts")
    hidden, weight, labels = make_inputs(rng, (5, 61), 64, 509, torch.bfloat16, device="cuda")
    scale = torch.from_numpy(rng.standard_normal((61, 5))).float().cuda()
    upstream = scale.t()

    def run(fn):
        storage = torch.empty(hidden.numel() + 1, dtype=hidden.dtype, device="cuda")
        h = storage[1:].view(hidden.shape).copy_(hidden)  # data_ptr % 16 == 2
        assert h.data_ptr() % 16 != 0
        h.requires_grad_(True)
        w = weight.t().contiguous().requires_grad_(True)
        loss = fn(h, w.t(), labels)
        (loss.t() * scale).sum().backward()
        return loss.detach(), h.grad, w.grad.t()

    results = run(lambda h, w, y: linear_cross_entropy(h, w, y, impl="pallas"))
    baseline = run(lambda h, w, y: naive(h, w, y, "none"))
    truths = truth_for(hidden, weight, labels, to_np(upstream).reshape(-1), "none")
    for name, value, truth, base in zip(("loss", "d_hidden", "d_weight"), results, truths, baseline):
        assert_close(name, to_np(value), truth, "bfloat16", naive=to_np(base))


# ~10 ms of GPU time at 1-2 GHz: long enough that a kernel not waiting for it would run first.
SLEEP_CYCLES = 20_000_000


def _check_equal(name, value, expected, iteration):
    if not torch.equal(value, expected):
        diff = (value.float() - expected.float()).abs()
        raise AssertionError(
            f"iteration {iteration}, {name}: differs from the synchronised run "
            f"(NaN: {bool(diff.isnan().any())}, max |diff| {diff.nan_to_num(float('inf')).max().item()})"
        )


@pytest.mark.gpu
def test_gpu_stream_ordering_around_the_call():
    """Torch writes the inputs just before the call (behind a long kernel) and reads and overwrites
    them just after, many times; every result must equal a fully synchronised run.

    Without torch → JAX ordering the kernels read ``hidden`` (or the upstream gradient) before the
    write lands (they get the previous iteration's NaNs); without JAX → torch ordering torch reads
    the loss before it is written; without the inputs kept alive, torch's NaN overwrite lands while
    JAX still reads them.
    """
    base, weight, labels = make_inputs(rng_for("stream-ordering"), (4096,), 1024, 16384, torch.bfloat16, device="cuda")
    upstream = torch.randn(4096, device="cuda")
    scales = (1.0, 2.0, 0.5)

    def forward(scale, sleep):
        with torch.no_grad():
            h = torch.empty_like(base)
            if sleep:
                torch.cuda._sleep(SLEEP_CYCLES)
            torch.mul(base, scale, out=h)
            loss = linear_cross_entropy(h, weight, labels, impl="pallas")
            h.fill_(float("nan"))  # overwrite the input right after the call
            return loss.clone()  # read the result right after the call

    def forward_backward(scale, sleep):
        h = torch.empty_like(base)
        if sleep:
            torch.cuda._sleep(SLEEP_CYCLES)
        torch.mul(base, scale, out=h)
        h.requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss = linear_cross_entropy(h, w, labels, impl="pallas")
        g = torch.empty_like(upstream)
        if sleep:
            torch.cuda._sleep(SLEEP_CYCLES)
        torch.mul(upstream, scale, out=g)
        loss.backward(g)
        g.fill_(float("nan"))  # overwrite the upstream gradient right after the backward
        return loss.detach().clone(), h.grad.clone(), w.grad.clone()

    expected = {}
    for scale in scales:
        torch.cuda.synchronize()
        expected[scale] = (forward(scale, sleep=False), *forward_backward(scale, sleep=False))
        torch.cuda.synchronize()
    assert all(torch.isfinite(t.float()).all() for results in expected.values() for t in results)

    for i in range(24):
        scale = scales[i % len(scales)]
        _check_equal("forward loss", forward(scale, sleep=True), expected[scale][0], i)
        results = forward_backward(scale, sleep=True)
        for name, value, want in zip(("loss", "d_hidden", "d_weight"), results, expected[scale][1:]):
            _check_equal(name, value, want, i)


@pytest.mark.gpu
def test_gpu_split_head_trains_one_step():
    """One SGD step of the split head on ``impl="pallas"`` equals the same step on ``"reference"``."""
    torch.manual_seed(0)
    head = SplitLanguageModellingHead({"text": 1000, "special": 7}, ["text", "special"], 64, impl="pallas").cuda()
    reference = copy.deepcopy(head)
    reference.impl = "reference"
    assert head.implementation_for(torch.zeros(1, 64, device="cuda")) == "pallas"
    hidden = torch.randn(2, 33, 64, device="cuda") * 2
    labels = torch.randint(0, 1007, (2, 33), device="cuda")
    labels[:, ::5] = IGNORE

    def step(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        h = hidden.clone().requires_grad_(True)
        loss = model(h, labels).sum() / (labels != IGNORE).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            after = model(hidden, labels).sum() / (labels != IGNORE).sum()
        return loss.detach(), after, h.grad, {k: v.detach() for k, v in model.state_dict().items()}

    loss, after, d_hidden, state = step(head)
    ref_loss, ref_after, ref_d_hidden, ref_state = step(reference)
    assert after < loss
    assert state.keys() == ref_state.keys() == {"lm_head.text.weight", "lm_head.special.weight"}
    assert_close("loss", to_np(loss), to_np(ref_loss), "float32")
    assert_close("loss after the step", to_np(after), to_np(ref_after), "float32")
    assert_close("d_hidden", to_np(d_hidden), to_np(ref_d_hidden), "float32")
    for key in state:
        assert_close(key, to_np(state[key]), to_np(ref_state[key]), "float32")


# --- the loss options through torch's pallas path (interpret mode) -----------------------------

ALL_OPTIONS = {"softcap": 2.5, "label_smoothing": 0.15, "lse_square_scale": 0.05, "return_lse": True}


@pytest.mark.parametrize("filter_eps", [None, 1e-2], ids=["exact", "filtered"])
def test_interpret_options_equal_jax_pallas_bit_for_bit_and_the_truth(filter_eps):
    """Bias (over DLPack), softcap, smoothing, z-loss and the returned lse: torch's programs give the
    bits of JAX's ``pallas_loss`` (filtered: every option but smoothing, which filtering refuses), and
    the exact ones match the float64 ground truth."""
    from ground_truth import lce_options_ground_truth

    (n, m), d, v = CPU_SHAPES["3x13x24x101"]
    hidden, weight, labels = make_inputs(rng_for(f"options-{filter_eps}"), (n * m,), d, v, torch.float32)
    gen = torch.Generator().manual_seed(1)
    bias, upstream, upstream_lse = torch.randn(v, generator=gen), torch.randn(n * m, generator=gen), torch.randn(
        n * m, generator=gen)
    options = dict(ALL_OPTIONS, label_smoothing=0.0) if filter_eps else ALL_OPTIONS
    h, w, b = (x.clone().requires_grad_(True) for x in (hidden, weight, bias))
    loss, lse = pallas_loss(h, w, labels, IGNORE, bias=b, interpret=True, config=ONE_SPLIT, filter_eps=filter_eps,
                            **options)
    ((loss * upstream).sum() + (lse * upstream_lse).sum()).backward()

    y = to_jax(labels)

    def f(a, c, e):
        return jax_pallas_loss(a, c, y, IGNORE, bias=e, interpret=True, config=ONE_SPLIT, filter_eps=filter_eps,
                               **options)

    # Each side jitted (the options' arithmetic may be contracted differently op by op).
    inputs, cotangent = (to_jax(hidden), to_jax(weight), to_jax(bias)), (to_jax(upstream), to_jax(upstream_lse))
    j_loss, j_lse = jax.jit(f)(*inputs)
    grads = jax.jit(lambda *args: jax.vjp(f, *args)[1](cotangent))(*inputs)
    mine = (loss.detach(), lse.detach(), h.grad, w.grad, b.grad)
    for name, got, theirs in zip(("loss", "lse", "d_hidden", "d_weight", "d_bias"), mine, (j_loss, j_lse, *grads)):
        assert torch.equal(got, to_torch(theirs)), name
    if filter_eps is None:
        want = lce_options_ground_truth(to_np(hidden), to_np(weight), to_np(labels), to_np(upstream), bias=to_np(bias),
                                        upstream_lse=to_np(upstream_lse), ignore_index=IGNORE, **{
                                            k: val for k, val in options.items() if k != "return_lse"})
        for name, got, truth in zip(("loss", "lse", "d_hidden", "d_weight", "d_bias"), mine, want):
            assert_close(f"torch-pallas options {name}", to_np(got), truth, "float32")


def test_filter_eps_with_label_smoothing_is_refused_by_name():
    hidden, weight, labels = make_inputs(rng_for("refuse"), (6,), 8, 11, torch.float32)
    with pytest.raises(ValueError, match="filter_eps=0.01 cannot be combined with label_smoothing"):
        pallas_loss(hidden, weight, labels, IGNORE, interpret=True, config=TINY, filter_eps=1e-2, label_smoothing=0.1)
    options = dict(filter_eps=1e-2, label_smoothing=0.1)
    reason = REGISTRY.reason("pallas", hidden, __import__("torch_heads").functional.loss_options("pallas", **options))
    assert "cannot be combined with label_smoothing" in reason
