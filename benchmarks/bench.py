"""GPU benchmark: every linear cross-entropy implementation of both frameworks, one process, same inputs.

Usage (on a CUDA machine; cut-cross-entropy and, optionally, liger-kernel importable):

    python benchmarks/bench.py --quick --out results/          # Gemma-2 shape, one regime, < 2 min
    python benchmarks/bench.py --out results/                  # both workloads, both regimes, sweep

For each workload and data regime it reports forward and forward+backward time (median of
``--iters`` after ``--warmup``; host clock around a device-synchronised call, for both frameworks), TFLOP/s on the
2·N·D·V (forward) and 8·N·D·V (forward+backward) convention, peak extra memory, and the relative
error (in norm) of the loss and both gradients against a float32 reference. Writes ``bench.json``,
``benchmarks.md`` and (with matplotlib) ``sweep.png`` under ``--out``.

Memory: torch rows give ``max_memory_allocated`` during the call minus what was allocated before it
and minus the gradients' own size; JAX rows give the compiled program's temporary buffer size
(``memory_analysis().temp_size_in_bytes``), which is what the call needs beyond inputs and outputs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax_heads.functional as jax_lce  # noqa: E402
from jax_heads import pallas_lce  # noqa: E402
import torch_heads  # noqa: E402

IGNORE = -100
WORKLOADS = {
    "gemma2-2b": (8192, 2304, 256_000),
    "llama3-8b": (8192, 4096, 128_256),
}
SWEEP_VOCABS = (32_768, 65_536, 131_072, 262_144)
# --quick: the headline rows only (our kernels from both frameworks and the peers).
QUICK_IMPLS = ("cce", "cce-exact", "torch_heads-cce", "torch_heads-pallas", "liger-none", "liger-sum", "jax-pallas",
               "jax-pallas-triton-fwd",
               "jax-pallas-filtered", "jax-pallas-filtered-in-tiles", "jax-fused-sum")
# Exact fallbacks whose time does not depend on the data: timed in the first regime of a workload only.
DATA_INDEPENDENT = {"torch-chunked", "jax-chunked", "jax-reference", "torch-materialised", "jax-materialised"}
FILTER_EPS = 2.0**-12  # cut-cross-entropy's "auto" for bfloat16: finfo(bfloat16).eps / 32


@dataclass
class Row:
    workload: str
    regime: str
    impl: str
    n: int
    d: int
    v: int
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    fwd_tflops: float | None = None
    fwdbwd_tflops: float | None = None
    extra_mem_mb: float | None = None
    err_loss: float | None = None
    err_dh: float | None = None
    err_dw: float | None = None
    note: str = ""
    errors: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------


def make_inputs(n, d, v, regime, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(n, d, device="cuda", generator=g)
    w = torch.randn(v, d, device="cuda", generator=g) * (d**-0.5) * 0.5
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[torch.rand(n, device="cuda", generator=g) < 0.1] = IGNORE
    scale = 1.0
    if regime == "peaked":
        scale = _scale_for_top_prob(h[:256], w, target=0.15)
    h = (h * scale).bfloat16()
    return h.contiguous(), w.bfloat16().contiguous(), y, scale


def _top_prob(h, w, scale):
    return torch.softmax((h * scale) @ w.T, dim=-1).max(dim=-1).values.mean().item()


def _scale_for_top_prob(h, w, target):
    lo, hi = 1.0, 256.0
    for _ in range(30):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if _top_prob(h, w, mid) < target else (lo, mid)
    return (lo * hi) ** 0.5


def mean_top_prob(h, w):
    return _top_prob(h[:512].float(), w.float(), 1.0)


def float32_reference(h, w, y):
    """Exact float32 loss and gradients (tf32 off), through our chunked path (bounded memory)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        hf = h.float().requires_grad_()
        wf = w.float().requires_grad_()
        loss = torch_heads.linear_cross_entropy(hf, wf, y, impl="chunked")
        loss.backward(torch.ones_like(loss))
        return loss.detach(), hf.grad, wf.grad
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def rel(a, b):
    a = a.float()
    b = b.float()
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------
# implementations: each returns (fwd() -> loss, fwdbwd() -> (loss, dh, dw)) over torch inputs
# ------------------------------------------------------------------------------------------


def torch_impls(h, w, y):
    def lce(fn, reduction="none"):
        def fwd():
            with torch.no_grad():
                return fn(h, w, y)

        def fwdbwd():
            hh = h.detach().requires_grad_()
            ww = w.detach().requires_grad_()
            loss = fn(hh, ww, y)
            if reduction == "none":
                loss.backward(torch.ones_like(loss))
            else:
                loss.backward()
            return loss.detach(), hh.grad, ww.grad

        return fwd, fwdbwd

    impls = {}

    def materialised(hh, ww, yy):
        return torch.nn.functional.cross_entropy((hh @ ww.T).float(), yy, ignore_index=IGNORE, reduction="none")

    impls["torch-materialised"] = lce(materialised)
    impls["torch-chunked"] = lce(lambda a, b, c: torch_heads.linear_cross_entropy(a, b, c, impl="chunked"))
    # Our Pallas kernels called from torch through interop (zero-copy DLPack): its overhead against
    # "jax-pallas" is the ≤5% target. Its extra-memory figure counts torch allocations only; the
    # kernels' temporaries live in JAX's allocator (about those of the "jax-pallas" row).
    impls["torch_heads-pallas"] = lce(lambda a, b, c: torch_heads.linear_cross_entropy(a, b, c, impl="pallas"))
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        impls["cce"] = lce(lambda a, b, c: cce(a, b, c, reduction="none"))
        impls["cce-exact"] = lce(lambda a, b, c: cce(a, b, c, reduction="none", filter_eps=None))
        impls["cce-torch_compile"] = lce(lambda a, b, c: cce(a, b, c, reduction="none", impl="torch_compile"))
        impls["torch_heads-cce"] = lce(lambda a, b, c: torch_heads.linear_cross_entropy(a, b, c, impl="cce"))
        impls["torch_heads-cce-exact"] = lce(
            lambda a, b, c: torch_heads.linear_cross_entropy(a, b, c, impl="cce", filter_eps=None)
        )
    except ImportError as exc:
        print(f"cut_cross_entropy not importable: {exc}")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger

        impls["liger-none"] = lce(lambda a, b, c: liger(a, b, c, reduction="none"))
        impls["liger-sum"] = lce(lambda a, b, c: liger(a, b, c, reduction="sum"), reduction="sum")
    except ImportError as exc:
        print(f"liger_kernel not importable: {exc}")
    return impls


def jax_impls(h, w, y):
    jh, jw, jy = (jax.dlpack.from_dlpack(t.detach()) for t in (h, w, y.int()))
    impls = {"jax-materialised": _jax_impl(_jax_materialised(jy), jh, jw)}
    for name in ("reference", "chunked", "pallas"):
        impls[f"jax-{name}"] = _jax_impl(lambda a, b, name=name: jax_lce.linear_cross_entropy(a, b, jy, impl=name), jh, jw)
    # "jax-pallas" takes the Mosaic GPU forward on a Hopper card (forward_kernel="auto"); this row
    # keeps the Triton forward, for the ratio between the two in the same run.
    triton_fwd = pallas_lce.BlockSizes(forward_kernel="triton")
    impls["jax-pallas-triton-fwd"] = _jax_impl(
        lambda a, b: pallas_lce.pallas_loss(a, b, jy, IGNORE, block_sizes=triton_fwd), jh, jw
    )
    # Gradient filtering at cut-cross-entropy's default threshold for bf16 (its "cce" row): our rule
    # (targets outside the tiles, the default), and CCE's own rule (a tile with a target is kept).
    impls["jax-pallas-filtered"] = _jax_impl(
        lambda a, b: pallas_lce.pallas_loss(a, b, jy, IGNORE, filter_eps=FILTER_EPS), jh, jw
    )
    impls["jax-pallas-filtered-in-tiles"] = _jax_impl(
        lambda a, b: pallas_lce.pallas_loss(a, b, jy, IGNORE, filter_eps=FILTER_EPS, filter_separate_targets=False),
        jh, jw,
    )
    # Gradients formed in the forward (6·N·D·V, reduction sum), Liger's schedule in XLA: the
    # like-for-like peer of "liger-sum"; its memory is a 512 MiB logits chunk + a float32 V×D accumulator.
    impls["jax-fused-sum"] = _jax_impl(
        lambda a, b: jax_lce.linear_cross_entropy(a, b, jy, impl="fused", reduction="sum"), jh, jw
    )
    return impls


def _jax_materialised(jy):
    """What a plain JAX user writes: bf16 logits at default precision, log-softmax in float32."""

    def loss_fn(a, b):
        logits = (a @ b.T).astype(jnp.float32)
        valid = jy != IGNORE
        target = jnp.take_along_axis(logits, jnp.where(valid, jy, 0)[:, None], axis=1)[:, 0]
        return jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - target, 0.0)

    return loss_fn


def _jax_impl(loss_fn, jh, jw):
    fwd_j = jax.jit(loss_fn)
    fwdbwd_j = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(loss_fn(a, b)), (0, 1)))

    def fwd():
        return fwd_j(jh, jw).block_until_ready()

    def fwdbwd():
        _, (dh, dw) = fwdbwd_j(jh, jw)
        dw.block_until_ready()
        return dh, dw

    return fwd, fwdbwd, fwdbwd_j, (jh, jw)


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------


SLOW_MS = 500.0  # a row slower than this (a fallback) is timed SLOW_ITERS times after one warm-up
SLOW_ITERS = 3


def time_torch(fn, warmup, iters):
    fn()  # compiles (Triton autotuning, our JAX programs), so the slow-row probe sees a steady call
    return _time(fn, torch.cuda.synchronize, warmup, iters)


def time_jax(fn, warmup, iters):
    fn()  # compiles
    return _time(fn, lambda: None, warmup, iters)  # fn() blocks until its results are ready


def _time(fn, sync, warmup, iters):
    """Median wall time of ``fn(); sync()``, from an idle device: the same clock for both frameworks.

    CUDA events would time only torch's stream, while JAX runs on its own streams; a host clock
    around a synchronised call measures both the same way (launch latency included, ~0.1 ms).
    """
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    if (time.perf_counter() - t0) * 1e3 > SLOW_MS:
        warmup, iters = 0, min(iters, SLOW_ITERS)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def torch_extra_memory_mb(fn, grads_bytes):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return max(0, peak - grads_bytes) / 2**20


def _skip(name, names, regime, first_regime):
    """Not asked for, or an exact fallback already timed in the workload's first regime."""
    return bool(names) and name not in names or (name in DATA_INDEPENDENT and regime != first_regime)


def loss_err(loss, ref_loss):
    """Relative error of a per-token loss, or of a summed one (the ``*-sum`` rows) against the sum."""
    if loss.ndim == 0:
        return rel(loss.reshape(1), ref_loss.sum().reshape(1))
    return rel(loss, ref_loss)


def bench_workload(workload, n, d, v, regime, args, names=None, first_regime="uniform"):
    rows = []
    h, w, y, scale = make_inputs(n, d, v, regime)
    top = mean_top_prob(h, w)
    print(f"\n== {workload} N={n} D={d} V={v} regime={regime} (hidden x{scale:.2f}, mean top prob {top:.3f})", flush=True)
    ref = float32_reference(h, w, y) if args.errors else None
    grads_bytes = h.numel() * h.element_size() + w.numel() * w.element_size()
    flops_f, flops_fb = 2 * n * d * v, 8 * n * d * v

    for name, (fwd, fwdbwd) in torch_impls(h, w, y).items():
        if _skip(name, names, regime, first_regime) or (name == "cce-torch_compile" and args.quick):
            continue
        row = Row(workload, regime, name, n, d, v)
        try:
            row.fwd_ms = time_torch(fwd, args.warmup, args.iters)
            row.fwdbwd_ms = time_torch(fwdbwd, args.warmup, args.iters)
            row.extra_mem_mb = torch_extra_memory_mb(fwdbwd, grads_bytes)
            if ref is not None:
                loss, dh, dw = fwdbwd()
                row.err_loss, row.err_dh, row.err_dw = loss_err(loss, ref[0]), rel(dh, ref[1]), rel(dw, ref[2])
                del loss, dh, dw
        except Exception as exc:  # a failing peer must not hide the others' figures
            row.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            traceback.print_exc()
        torch.cuda.empty_cache()
        rows.append(_finish(row, flops_f, flops_fb))

    for name, (fwd, fwdbwd, fwdbwd_j, jargs) in jax_impls(h, w, y).items():
        if _skip(name, names, regime, first_regime) or (name == "jax-chunked" and n * v > 2**31 // 2 and args.quick):
            continue
        row = Row(workload, regime, name, n, d, v)
        try:
            row.fwd_ms = time_jax(fwd, args.warmup, args.iters)
            row.fwdbwd_ms = time_jax(fwdbwd, args.warmup, args.iters)
            row.extra_mem_mb = fwdbwd_j.lower(*jargs).compile().memory_analysis().temp_size_in_bytes / 2**20
            if ref is not None:
                loss = torch.from_dlpack(fwd())
                dh, dw = (torch.from_dlpack(t) for t in fwdbwd())
                row.err_loss, row.err_dh, row.err_dw = loss_err(loss, ref[0]), rel(dh, ref[1]), rel(dw, ref[2])
                del loss, dh, dw
        except Exception as exc:
            row.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            traceback.print_exc()
        rows.append(_finish(row, flops_f, flops_fb))
    for r in rows:
        r.note = f"top prob {top:.3f}"
    del h, w, y, ref
    torch.cuda.empty_cache()
    return rows


def _finish(row, flops_f, flops_fb):
    if row.fwd_ms:
        row.fwd_tflops = flops_f / row.fwd_ms / 1e9
    if row.fwdbwd_ms:
        row.fwdbwd_tflops = flops_fb / row.fwdbwd_ms / 1e9
    print(
        f"  {row.impl:24s} fwd {_fmt(row.fwd_ms)} ms  fwd+bwd {_fmt(row.fwdbwd_ms)} ms  "
        f"mem {_fmt(row.extra_mem_mb)} MB  err loss {_fmt(row.err_loss, 'e')} dh {_fmt(row.err_dh, 'e')} "
        f"dw {_fmt(row.err_dw, 'e')} {' '.join(row.errors)[:120]}",
        flush=True,
    )
    return row


def _fmt(x, kind="f"):
    if x is None:
        return "-"
    return f"{x:.2e}" if kind == "e" else f"{x:.1f}"


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def environment():
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "jax", "jaxlib", "triton", "cut-cross-entropy", "liger-kernel", "flax"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "card": torch.cuda.get_device_name(),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "date": datetime.date.today().isoformat(),
        "versions": versions,
    }


def markdown(env, rows):
    lines = [
        "# Benchmarks",
        "",
        f"Card: **{env['card']}**, date {env['date']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
        + ".",
        "",
        "bf16 inputs, reduction none (rows `*-sum`: reduction sum), 10% ignored labels, upstream gradient of "
        "ones. Median of the timed runs after warm-up (a row slower than 500 ms, a fallback, is timed 3 "
        "times; the exact fallbacks, whose time does not depend on the data, run in the first regime "
        "only); TFLOP/s on the 2·N·D·V (forward) / 8·N·D·V (forward+backward) convention; "
        "extra memory beyond inputs and gradients (torch: allocator peak; JAX: compiled temp buffers); "
        "errors are relative (in norm) against the float32 reference. Only ratios within this run count.",
        "",
    ]
    key = lambda r: (r.workload, r.regime)  # noqa: E731
    for group in sorted({key(r) for r in rows}):
        sub = [r for r in rows if key(r) == group]
        lines += [
            f"## {group[0]} (N={sub[0].n}, D={sub[0].d}, V={sub[0].v}), {group[1]} softmax ({sub[0].note})",
            "",
            "| impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | extra MiB | err loss | err dh | err dw |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sub:
            err = f" ({'; '.join(r.errors)[:80]})" if r.errors else ""
            lines.append(
                f"| {r.impl}{err} | {_fmt(r.fwd_ms)} | {_fmt(r.fwdbwd_ms)} | {_fmt(r.fwd_tflops)} | "
                f"{_fmt(r.fwdbwd_tflops)} | {_fmt(r.extra_mem_mb)} | {_fmt(r.err_loss, 'e')} | "
                f"{_fmt(r.err_dh, 'e')} | {_fmt(r.err_dw, 'e')} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sweep = [r for r in rows if r.workload == "sweep" and r.fwdbwd_ms]
    if not sweep:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for impl in sorted({r.impl for r in sweep}):
        pts = sorted((r.v, r.fwdbwd_ms, r.extra_mem_mb or 0) for r in sweep if r.impl == impl)
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax_m.plot([p[0] for p in pts], [max(p[2], 1e-1) for p in pts], marker="o", label=impl)
    ax_t.set(xscale="log", xlabel="vocabulary size", ylabel="forward+backward ms", title="time (N=8192, D=2304, bf16)")
    ax_m.set(xscale="log", yscale="log", xlabel="vocabulary size", ylabel="extra MiB", title="extra memory")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Gemma-2 shape, near-uniform regime, fewer runs")
    p.add_argument("--out", default="bench-out", help="folder for bench.json, benchmarks.md, sweep.png")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-errors", dest="errors", action="store_false", help="skip the float32 reference")
    p.add_argument("--impls", default="", help="comma-separated subset of implementation names")
    p.add_argument("--workloads", default="", help="comma-separated subset of " + ",".join(WORKLOADS) + ", or none")
    p.add_argument("--regimes", default="uniform,peaked")
    p.add_argument("--sweep", action="store_true", help="also run the vocabulary sweep")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    if args.quick:
        args.iters, args.warmup, args.regimes = min(args.iters, 5), min(args.warmup, 2), "uniform"
        args.workloads = args.workloads or "gemma2-2b"
        args.impls = args.impls or ",".join(QUICK_IMPLS)
    names = set(filter(None, args.impls.split(",")))
    workloads = [w for w in (args.workloads.split(",") if args.workloads else WORKLOADS) if w != "none"]
    os.makedirs(args.out, exist_ok=True)
    env = environment()
    print(env, flush=True)
    runs = [(wl, *WORKLOADS[wl], regime, names) for wl in workloads for regime in args.regimes.split(",")]
    if args.sweep:
        sweep_names = names or {"cce", "cce-exact", "liger-none", "liger-sum", "jax-pallas", "jax-fused-sum",
                                "torch-materialised"}
        runs += [("sweep", 8192, 2304, v, "uniform", sweep_names) for v in SWEEP_VOCABS]
    rows = []
    t0 = time.perf_counter()
    first_regime = args.regimes.split(",")[0]
    for wl, n, d, v, regime, run_names in runs:
        rows += bench_workload(wl, n, d, v, regime, args, run_names, first_regime if wl != "sweep" else regime)
        env["elapsed_s"] = round(time.perf_counter() - t0, 1)
        write_report(env, rows, args.out)  # after every workload, so a cut-off run keeps its figures
    print(markdown(env, rows))
    print(f"benchmark took {env['elapsed_s']} s (after imports)")


def write_report(env, rows, out):
    with open(os.path.join(out, "bench.json"), "w") as f:
        json.dump({"env": env, "rows": [asdict(r) for r in rows]}, f, indent=1)
    md = markdown(env, rows)
    if plot(rows, os.path.join(out, "sweep.png")):
        md += "\n![time and memory against vocabulary size](sweep.png)\n"
    with open(os.path.join(out, "benchmarks.md"), "w") as f:
        f.write(md)


if __name__ == "__main__":
    main()
