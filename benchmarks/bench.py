"""GPU benchmark: every linear cross-entropy implementation of both frameworks, one process, the same inputs.

Usage, from the repository root on a CUDA machine (peers importable where wanted; a peer that is not
is recorded as a skipped row with the reason):

    python -m benchmarks.bench --out docs/bench-h200.json                        # both workloads and regimes
    python -m benchmarks.bench --quick --out /tmp/quick.json                     # headline rows, Gemma-2, ~1 min
    python -m benchmarks.bench --workloads none --sweep --out docs/bench-h200-sweep.json
    python -m benchmarks.bench --workloads none --compare-tree ../before --out /tmp/compare.json
    python -m benchmarks.bench --merge gemma.json llama.json --out docs/bench-h200.json     # one file from parts
    python -m benchmarks.report                                                  # docs/benchmarks.md from the JSON

Per workload and data regime, each row gives the forward and forward+backward time (``common.time_ms``:
median of ``--iters`` after ``--warmup``), the extra memory (torch rows: the allocator's peak during the
call beyond what existed before it and beyond the gradients; JAX rows: the compiled program's temporary
buffers), and the relative error of the loss and both gradients against a float32 reference. The rows
of a regime are preceded by a throwaway warm-up row (the first case timed once more, kept in the JSON
with kind ``warmup``). The ``floor`` row times the bf16 products that the algorithm cannot avoid with
torch's matmul on preallocated outputs: one ``N×D·D×V`` product for the forward, the four products of a
recomputing kernel (8·N·D·V) for forward+backward.

``--compare-tree PATH`` times the headline rows (``jax-pallas``, ``torch_heads-pallas``, both workloads
and regimes) of this checkout and of the one at PATH in the same run (``benchmarks/compare.py``) and
stores them under the key ``compare``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time
import traceback
from collections.abc import Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    IGNORE,
    IGNORED_FRACTION,
    PEAKED_TOP_PROB,
    REGIMES,
    SLOW_ITERS,
    SLOW_MS,
    WORKLOADS,
    Inputs,
    cuda_sync,
    environment,
    jax_sync,
    jax_temp_mb,
    make_inputs,
    mean_top_prob,
    merge_results,
    read_json,
    rel,
    time_ms,
    torch_extra_memory_mb,
    write_json,
)
from benchmarks.compare import compare_trees  # noqa: E402

FORMAT = 2  # of the JSON written here (benchmarks/report.py reads it)
SWEEP_VOCABS = (32_768, 65_536, 131_072, 262_144)
FILTER_EPS = 2.0**-12  # cut-cross-entropy's "auto" for bfloat16: finfo(bfloat16).eps / 32
QUICK = ("floor", "torch_heads-pallas", "torch_heads-pallas-mean", "cce", "cce-exact", "liger-cute-sm90-mean",
         "quack-mean", "jax-pallas", "jax-pallas-mean", "jax-pallas-filtered", "jax-fused-sum", "jax-pallas-softcap",
         "jax-pallas-options", "torch_heads-pallas-options")
# The loss options of the option rows: Gemma-2's final-logit soft-capping, and every option together
# (return_lse aside: it changes what the call returns).
SOFTCAP = 30.0
ALL_OPTIONS = {"softcap": SOFTCAP, "label_smoothing": 0.1, "lse_square_scale": 1e-4}
SWEEP = ("floor", "torch-materialised", "cce", "cce-exact", "liger-none", "liger-sum", "liger-cute-sm90-mean",
         "quack-mean", "jax-pallas", "jax-pallas-mean", "jax-fused-sum")


class Skipped(Exception):
    """A case that cannot run here (its package is not importable, or the card is not the one it needs)."""


# ------------------------------------------------------------------------------------------
# the cases: name -> how to build its loss function
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of each regime.

    ``build(inputs)`` returns the loss function (torch: ``(hidden, weight, labels) -> loss``; JAX:
    ``(hidden, weight) -> loss`` over ``inputs.jax()``'s labels) or raises :class:`Skipped`. ``kind``:
    ``ours``, ``peer``, ``baseline`` or ``floor``. ``data_independent`` cases (exact fallbacks whose
    time does not depend on the data) run in the first regime of a workload only. ``options`` rows
    time the loss options and are not compared with the option-free reference.
    """

    name: str
    framework: str
    kind: str
    reduction: str
    build: Callable
    data_independent: bool = False
    options: bool = False  # a loss-option row: no error against the option-free reference (tests check it)


def _peer(module: str, name: str):
    """``module.name`` of a peer package, or :class:`Skipped` with the reason it cannot be imported."""
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as exc:  # ImportError, or a CUDA / DSL mismatch raised while importing
        raise Skipped(f"{module}.{name} not importable: {type(exc).__name__}: {exc}"[:300]) from None


def _materialised(h, w, y):
    return torch.nn.functional.cross_entropy((h @ w.T).float(), y, ignore_index=IGNORE, reduction="none")


def _torch_heads(**options):
    import torch_heads

    return lambda h, w, y: torch_heads.linear_cross_entropy(h, w, y, **options)


def _torch_heads_with_bias(**options):
    """Every loss option at once (:data:`ALL_OPTIONS` and a random ``(V,)`` bias, made on first call)."""
    import torch_heads

    bias = {}

    def loss(h, w, y):
        if "b" not in bias:
            bias["b"] = (torch.randn(w.shape[0], device=w.device, generator=torch.Generator(w.device).manual_seed(0))
                         * 0.1).to(w.dtype)
        return torch_heads.linear_cross_entropy(h, w, y, bias=bias["b"], **ALL_OPTIONS, **options)

    return loss


def _cce(**options):
    cce = _peer("cut_cross_entropy", "linear_cross_entropy")
    return lambda h, w, y: cce(h, w, y, **options)


def _liger(reduction):
    liger = _peer("liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy")
    return lambda h, w, y: liger(h, w, y, reduction=reduction)


def _liger_cute_sm90():
    if torch.cuda.get_device_capability() != (9, 0):
        capability = torch.cuda.get_device_capability()
        raise Skipped(f"Liger's CuTe SM90 kernel needs compute capability 9.0, not {capability}")
    fn = _peer("liger_kernel.ops.cutedsl.ops.fused_linear_cross_entropy_sm90", "liger_fused_linear_cross_entropy_sm90")
    return lambda h, w, y: fn(h, w, y, ignore_index=IGNORE, reduction="mean")


# QuACK's default token chunk; 0.6.5 fails where a chunk's rows equal D (its epilogue cannot tell a row
# vector from a column vector when m == n), so there the chunk is doubled.
QUACK_CHUNK = 4096


def _quack():
    fn = _peer("quack.linear_cross_entropy", "chunked_linear_cross_entropy")

    def call(h, w, y):
        chunk = QUACK_CHUNK if h.shape[-1] != QUACK_CHUNK else 2 * QUACK_CHUNK
        return fn(h, w, y, chunk_size=chunk, ignore_index=IGNORE, reduction="mean")

    return call


def _jax_heads(inputs, **options):
    import jax_heads

    jy = inputs.jax()[2]
    return lambda a, b: jax_heads.linear_cross_entropy(a, b, jy, **options)


def _jax_heads_with_bias(inputs, **options):
    """Every loss option at once (:data:`ALL_OPTIONS` and a random ``(V,)`` bias)."""
    import jax

    import jax_heads

    h, w, jy = inputs.jax()
    bias = (jax.random.normal(jax.random.key(0), (w.shape[0],)) * 0.1).astype(w.dtype)
    return lambda a, b: jax_heads.linear_cross_entropy(a, b, jy, bias=bias, **ALL_OPTIONS, **options)


def _jax_pallas(inputs, *, forward_kernel="auto", backward_kernel="auto", **options):
    from jax_heads.pallas import BlockSizes, pallas_loss

    jy, config = inputs.jax()[2], BlockSizes(forward_kernel=forward_kernel, backward_kernel=backward_kernel)
    return lambda a, b: pallas_loss(a, b, jy, IGNORE, config=config, **options)


def _jax_pallas_mean_exact(inputs):
    """``jax-pallas-mean`` on the exact recomputing kernels (per-token loss, then the mean)."""
    import jax.numpy as jnp

    from jax_heads.pallas import pallas_loss

    jy = inputs.jax()[2]
    count = jnp.maximum(jnp.sum(jy != IGNORE), 1)
    return lambda a, b: jnp.sum(pallas_loss(a, b, jy, IGNORE)) / count


def _jax_pallas_mean_mosaic_logits(inputs):
    """``jax-pallas-mean`` with the chunk logits stored by the Mosaic forward, which also forms their statistics."""
    from jax_heads.pallas import BlockSizes, GradientInForwardConfig, gradient_in_forward_loss

    jy = inputs.jax()[2]
    config = BlockSizes(gradient_in_forward=GradientInForwardConfig(logits_kernel="mosaic"))
    return lambda a, b: gradient_in_forward_loss(a, b, jy, IGNORE, "mean", config=config)


def _jax_materialised(inputs):
    """What a plain JAX user writes: bf16 logits at default precision, log-softmax in float32."""
    import jax
    import jax.numpy as jnp

    jy = inputs.jax()[2]

    def loss(a, b):
        logits = (a @ b.T).astype(jnp.float32)
        valid = jy != IGNORE
        target = jnp.take_along_axis(logits, jnp.where(valid, jy, 0)[:, None], axis=1)[:, 0]
        return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - target, 0.0)

    return loss


CASES = [
    Case("floor", "floor", "floor", "none", lambda inputs: None),
    Case("torch-materialised", "torch", "baseline", "none", lambda _: _materialised, data_independent=True),
    Case("torch-chunked", "torch", "baseline", "none", lambda _: _torch_heads(impl="chunked"), data_independent=True),
    # Our kernels called from torch through DLPack; their temporaries live in JAX's allocator, so the
    # memory column counts torch's allocations only.
    Case("torch_heads-pallas", "torch", "ours", "none", lambda _: _torch_heads(impl="pallas")),
    Case("torch_heads-pallas-mean", "torch", "ours", "mean", lambda _: _torch_heads(impl="pallas", reduction="mean")),
    Case("torch_heads-pallas-options", "torch", "ours", "none", lambda _: _torch_heads_with_bias(impl="pallas"),
         options=True),
    Case("torch_heads-cce", "torch", "ours", "none", lambda _: _torch_heads(impl="cce")),
    Case("torch_heads-cce-exact", "torch", "ours", "none", lambda _: _torch_heads(impl="cce", filter_eps=None)),
    Case("cce", "torch", "peer", "none", lambda _: _cce(reduction="none")),
    Case("cce-exact", "torch", "peer", "none", lambda _: _cce(reduction="none", filter_eps=None)),
    Case("cce-torch_compile", "torch", "peer", "none", lambda _: _cce(reduction="none", impl="torch_compile")),
    Case("cce-torch_compile-mean", "torch", "peer", "mean", lambda _: _cce(reduction="mean", impl="torch_compile")),
    Case("liger-none", "torch", "peer", "none", lambda _: _liger("none")),
    Case("liger-sum", "torch", "peer", "sum", lambda _: _liger("sum")),
    Case("liger-cute-sm90-mean", "torch", "peer", "mean", lambda _: _liger_cute_sm90()),
    Case("quack-mean", "torch", "peer", "mean", lambda _: _quack()),
    Case("jax-materialised", "jax", "baseline", "none", _jax_materialised, data_independent=True),
    Case("jax-reference", "jax", "baseline", "none", lambda i: _jax_heads(i, impl="reference"), data_independent=True),
    Case("jax-chunked", "jax", "baseline", "none", lambda i: _jax_heads(i, impl="chunked"), data_independent=True),
    Case("jax-pallas", "jax", "ours", "none", lambda i: _jax_heads(i, impl="pallas")),
    # sum/mean: the gradient-in-forward path (6·N·D·V); -exact keeps the recomputing kernels (8·N·D·V).
    Case("jax-pallas-mean", "jax", "ours", "mean", lambda i: _jax_heads(i, impl="pallas", reduction="mean")),
    Case("jax-pallas-mean-exact", "jax", "ours", "mean", _jax_pallas_mean_exact),
    Case("jax-pallas-mean-mosaic-logits", "jax", "ours", "mean", _jax_pallas_mean_mosaic_logits),
    Case("jax-pallas-softcap", "jax", "ours", "none", lambda i: _jax_heads(i, impl="pallas", softcap=SOFTCAP),
         options=True),
    Case("jax-pallas-options", "jax", "ours", "none", lambda i: _jax_heads_with_bias(i, impl="pallas"),
         options=True),
    # The default forward is Mosaic GPU on a Hopper card; this row keeps the Triton forward, for the ratio.
    Case("jax-pallas-triton-fwd", "jax", "ours", "none", lambda i: _jax_pallas(i, forward_kernel="triton")),
    # The default gradient-logits kernel is Mosaic GPU on a Hopper card too; this row keeps the Triton one.
    Case("jax-pallas-triton-bwd", "jax", "ours", "none", lambda i: _jax_pallas(i, backward_kernel="triton")),
    # Gradient filtering at CCE's default threshold: our rule (targets outside the tiles) and CCE's own
    # (a tile holding a target is kept).
    Case("jax-pallas-filtered", "jax", "ours", "none", lambda i: _jax_pallas(i, filter_eps=FILTER_EPS)),
    Case("jax-pallas-filtered-in-tiles", "jax", "ours", "none",
         lambda i: _jax_pallas(i, filter_eps=FILTER_EPS, filter_separate_targets=False)),
    # Gradients formed in the forward (6·N·D·V) in XLA products, Liger's schedule.
    Case("jax-fused-sum", "jax", "ours", "sum", lambda i: _jax_heads(i, impl="fused", reduction="sum")),
]
CASE_NAMES = [c.name for c in CASES]


# ------------------------------------------------------------------------------------------
# runners: how each framework's case is called, synchronised, measured and checked
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
    fwd: Callable
    fwdbwd: Callable
    sync: Callable
    memory_mb: Callable[[], float | None]
    outputs: Callable[[], tuple] | None  # -> (loss, d_hidden, d_weight) as torch tensors


def torch_runner(loss_fn, inputs: Inputs, reduction: str) -> Runner:
    h, w, y = inputs.hidden, inputs.weight, inputs.labels

    def fwd():
        with torch.no_grad():
            return loss_fn(h, w, y)

    def fwdbwd():
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        loss = loss_fn(hh, ww, y)
        loss.backward(torch.ones_like(loss) if reduction == "none" else None)
        return loss.detach(), hh.grad, ww.grad

    grads_bytes = h.numel() * h.element_size() + w.numel() * w.element_size()
    return Runner(fwd, fwdbwd, cuda_sync, lambda: torch_extra_memory_mb(fwdbwd, exclude_bytes=grads_bytes), fwdbwd)


def jax_runner(loss_fn, inputs: Inputs, reduction: str) -> Runner:
    del reduction  # the sum of a reduced loss is the loss itself
    import jax
    import jax.numpy as jnp

    jh, jw, _ = inputs.jax()
    fwd_j = jax.jit(loss_fn)
    fwdbwd_j = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(loss_fn(a, b)), (0, 1)))

    def outputs():
        loss = torch.from_dlpack(fwd_j(jh, jw))
        dh, dw = (torch.from_dlpack(t) for t in fwdbwd_j(jh, jw)[1])
        return loss, dh, dw

    return Runner(lambda: fwd_j(jh, jw), lambda: fwdbwd_j(jh, jw), jax_sync, lambda: jax_temp_mb(fwdbwd_j, jh, jw),
                  outputs)


def floor_runner(inputs: Inputs) -> Runner:
    """The unavoidable bf16 products, torch matmul (cuBLAS) into preallocated outputs."""
    h, w = inputs.hidden, inputs.weight
    logits = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
    dh, dw = torch.empty_like(h), torch.empty_like(w)

    def fwd():
        return torch.mm(h, w.T, out=logits)

    def fwdbwd():
        torch.mm(h, w.T, out=logits)  # the forward's logits
        torch.mm(h, w.T, out=logits)  # recomputed in the backward (the buffer stands in for the gradient logits G)
        torch.mm(logits, w, out=dh)  # d_hidden = G W
        torch.mm(logits.T, h, out=dw)  # d_weight = Gᵀ H
        return dw

    return Runner(fwd, fwdbwd, cuda_sync, lambda: None, None)


def make_runner(case: Case, inputs: Inputs) -> Runner:
    if case.framework == "floor":
        return floor_runner(inputs)
    loss_fn = case.build(inputs)
    return (torch_runner if case.framework == "torch" else jax_runner)(loss_fn, inputs, case.reduction)


# ------------------------------------------------------------------------------------------
# one regime of one workload
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    workload: str
    regime: str
    impl: str
    kind: str
    framework: str
    reduction: str
    n: int
    d: int
    v: int
    dtype: str = "bfloat16"
    top_prob: float | None = None
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_tflops: float | None = None  # on 2·N·D·V
    fwdbwd_tflops: float | None = None  # on 8·N·D·V, whatever the algorithm does
    extra_mem_mb: float | None = None  # MiB
    err_loss: float | None = None
    err_dh: float | None = None
    err_dw: float | None = None
    skipped: str | None = None
    errors: list = dataclasses.field(default_factory=list)


def float32_reference(inputs: Inputs):
    """Exact float32 per-token loss and gradients of the sum (tf32 off), through the chunked path, and
    the number of counted tokens."""
    import torch_heads

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        hf = inputs.hidden.float().requires_grad_()
        wf = inputs.weight.float().requires_grad_()
        loss = torch_heads.linear_cross_entropy(hf, wf, inputs.labels, impl="chunked")
        loss.backward(torch.ones_like(loss))
        return loss.detach(), hf.grad, wf.grad, int((inputs.labels != IGNORE).sum())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def check_errors(row: Row, outputs: tuple, ref: tuple) -> None:
    """Relative errors against the reference; a ``mean`` row's loss and gradients are scaled by the
    number of counted tokens, a ``sum`` row's loss compared with the reference's sum."""
    loss, dh, dw = outputs
    ref_loss, ref_dh, ref_dw, counted = ref
    scale = counted if row.reduction == "mean" else 1
    if row.reduction == "none":
        row.err_loss = rel(loss, ref_loss)
    else:
        row.err_loss = rel(loss.float().reshape(1) * scale, ref_loss.sum().reshape(1))
    row.err_dh = rel(dh.float() * scale, ref_dh)
    row.err_dw = rel(dw.float() * scale, ref_dw)


def time_case(case: Case, inputs: Inputs, row: Row, ref, args) -> Row:
    runner = None
    try:
        runner = make_runner(case, inputs)
        timing = dict(warmup=args.warmup, iters=args.iters, slow_ms=SLOW_MS)
        row.fwd_ms = time_ms(runner.fwd, sync=runner.sync, **timing).median_ms
        row.fwdbwd_ms = time_ms(runner.fwdbwd, sync=runner.sync, **timing).median_ms
        row.extra_mem_mb = runner.memory_mb()
        if ref is not None and runner.outputs is not None:
            check_errors(row, runner.outputs(), ref)
    except Skipped as why:
        row.skipped = str(why)
    except Exception as exc:  # a failing case must not hide the others' figures
        row.errors.append(f"{type(exc).__name__}: {exc}"[:300])
        traceback.print_exc()
    del runner
    torch.cuda.empty_cache()
    flops = 2 * row.n * row.d * row.v
    row.fwd_tflops = flops / row.fwd_ms / 1e9 if row.fwd_ms else None
    row.fwdbwd_tflops = 4 * flops / row.fwdbwd_ms / 1e9 if row.fwdbwd_ms else None
    return _report(row)


def _report(row: Row) -> Row:
    def f(x, kind="f"):
        return "-" if x is None else (f"{x:.2e}" if kind == "e" else f"{x:.1f}")

    note = row.skipped or " ".join(row.errors)
    print(f"  {row.impl:28s} fwd {f(row.fwd_ms)} ms  fwd+bwd {f(row.fwdbwd_ms)} ms  mem {f(row.extra_mem_mb)} MiB  "
          f"err loss {f(row.err_loss, 'e')} dh {f(row.err_dh, 'e')} dw {f(row.err_dw, 'e')}  {note[:120]}", flush=True)
    return row


def bench_regime(workload: str, n: int, d: int, v: int, regime: str, cases: list[Case], args,
                 first_regime: bool) -> list[Row]:
    cases = [c for c in cases if first_regime or not c.data_independent]
    if not cases:
        return []
    inputs = make_inputs(n, d, v, regime)
    top = mean_top_prob(inputs.hidden, inputs.weight)
    print(f"\n== {workload} N={n} D={d} V={v} {regime} (hidden x{inputs.scale:.2f}, mean top prob {top:.3f})",
          flush=True)
    ref = float32_reference(inputs) if args.errors else None

    def row(case: Case, **changes) -> Row:
        fields = dict(impl=case.name, kind=case.kind, framework=case.framework, reduction=case.reduction)
        return Row(workload, regime, **{**fields, **changes}, n=n, d=d, v=v, top_prob=top)

    warm = cases[0]  # the first row of a regime read high in round one: time it once, throw it away
    rows = [time_case(warm, inputs, row(warm, impl=f"warmup:{warm.name}", kind="warmup"), None, args)]
    rows += [time_case(case, inputs, row(case), None if case.options else ref, args) for case in cases]
    del inputs, ref
    torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def _names(text: str, allowed) -> list[str]:
    names = [s for s in text.split(",") if s]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise SystemExit(f"unknown names {unknown}; known: {', '.join(allowed)}")
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the JSON result file (rewritten after every regime)")
    p.add_argument("--quick", action="store_true", help="headline rows at the Gemma-2 shape, near-uniform regime")
    p.add_argument("--iters", type=int, default=10, help="timed calls per measurement (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls after the compiling one")
    p.add_argument("--no-errors", dest="errors", action="store_false", help="skip the float32 reference")
    p.add_argument("--impls", default="", help="comma-separated subset of: " + ",".join(CASE_NAMES))
    p.add_argument("--workloads", help="comma-separated subset of " + ",".join(WORKLOADS) + ", or none (default: all;"
                   " --quick: gemma2-2b)")
    p.add_argument("--regimes", default=",".join(REGIMES))
    p.add_argument("--sweep", action="store_true", help="also the vocabulary sweep (N=8192, D=2304, near-uniform)")
    p.add_argument("--compare-tree", metavar="PATH", help="also time the headline rows of the checkout at PATH")
    p.add_argument("--compare-rounds", type=int, default=2, help="alternating rounds of --compare-tree (default 2)")
    p.add_argument("--compare-only", default="", metavar="WORKLOAD:REGIME:IMPL,...",
                   help="with --compare-tree: time only these headline rows (default: all of them)")
    p.add_argument("--compare-timeout", type=int, default=400, help="seconds per --compare-tree child")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="no timing: merge result files of one session (e.g. "
                   "one workload per GPU) into --out")
    args = p.parse_args(argv)
    if args.merge:
        write_json(args.out, merge_results([read_json(path) for path in args.merge]))
        return 0
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    if args.iters < 10:
        p.error("--iters must be at least 10 (the median of fewer is too noisy for the 3 % comparisons)")
    if args.quick:
        args.regimes, args.warmup = "uniform", min(args.warmup, 2)
        args.workloads = args.workloads or "gemma2-2b"
        args.impls = args.impls or ",".join(QUICK)
    names = set(_names(args.impls, CASE_NAMES))
    workloads = [] if args.workloads == "none" else _names(args.workloads or ",".join(WORKLOADS), WORKLOADS)
    regimes = _names(args.regimes, REGIMES)

    method = {"iters": args.iters, "warmup": args.warmup, "slow_ms": SLOW_MS, "slow_iters": SLOW_ITERS,
              "ignored_fraction": IGNORED_FRACTION, "peaked_top_prob": PEAKED_TOP_PROB, "errors": args.errors,
              "quick": args.quick, "workloads": workloads + (["sweep"] if args.sweep else []), "regimes": regimes}
    record = {"format": FORMAT, "env": environment(method=method), "rows": []}
    print(record["env"], flush=True)
    t0 = time.perf_counter()
    if args.compare_tree:  # first, while this process holds little GPU memory
        record["compare"] = compare_trees(args.compare_tree, args)
        write_json(args.out, record)
    runs = [(wl, *WORKLOADS[wl], regime, names, i == 0) for wl in workloads for i, regime in enumerate(regimes)]
    if args.sweep:
        runs += [("sweep", 8192, 2304, v, "uniform", names or set(SWEEP), True) for v in SWEEP_VOCABS]
    for workload, n, d, v, regime, run_names, first in runs:
        cases = [c for c in CASES if not run_names or c.name in run_names]
        record["rows"] += [dataclasses.asdict(r) for r in bench_regime(workload, n, d, v, regime, cases, args, first)]
        record["env"]["elapsed_s"] = round(time.perf_counter() - t0, 1)
        write_json(args.out, record)  # after every regime, so a run cut off keeps what it measured
    record["env"]["elapsed_s"] = round(time.perf_counter() - t0, 1)
    write_json(args.out, record)
    print(f"wrote {args.out}; the benchmark took {record['env']['elapsed_s']} s after imports", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
