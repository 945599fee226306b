"""Vocabulary-parallel linear cross-entropy on 2 GPUs: parity with one GPU, and speed, both frameworks.

Usage, from the repository root (a host with 2 CUDA GPUs; cut-cross-entropy importable for its 1-GPU row):

    python -m benchmarks.vocab_parallel_gpu --out results/vocab-parallel/
    python -m benchmarks.vocab_parallel_gpu --cpu-smoke --out /tmp/vp-smoke   # the logic on CPU, tiny shapes

Three problems: ``parity`` (float32, small), ``parity-options`` (the same with a bias, softcap 30,
label smoothing 0.1 and z-loss 1e-4: ``OPTIONS``; ``d_bias`` compared too) and ``main`` (bfloat16,
Gemma-2-2B's head by default: N=8192, D=2304, V=256000); reduction none, 10% ignored labels,
upstream gradient of ones.

(a) torch: 2 processes, one GPU each, NCCL (``NCCL_NVLS_ENABLE=0``). Each rank holds rows
    ``shard_range(V, rank, 2)`` of the weight and runs
    ``torch_heads.parallel.vocab_parallel_linear_cross_entropy`` per-shard impl ``pallas`` and
    ``chunked``; its loss and gradients are compared with the same op unsharded on that rank's GPU
    (the float32 problem must agree within 1e-5 relative; bfloat16 is reported). Then the step
    (forward + backward, ``benchmarks.common.time_ms``) is timed on 2 GPUs
    and, in the parent, on 1 GPU: ``linear_cross_entropy`` with impl ``pallas``, ``cce`` (filtered,
    its default), ``cce`` exact, and ``chunked``.
(b) JAX: one process, a 1 x 2 mesh (``("data", "vocab")``): ``jax_heads.linear_cross_entropy`` with
    ``mesh=..., vocab_axis="vocab"`` (impl ``pallas``) against the same call on one GPU, parity and
    the jitted ``value_and_grad`` step.
(c) the float32 problem: torch-sharded (2 ranks) against JAX-sharded (2 devices).

Each part runs under try/except: a failure is recorded in ``vocab_parallel.json`` (and the
summary ``vocab_parallel.md``), the other parts still run. ``--cpu-smoke`` runs the same code on
tiny shapes with gloo and 2 CPU JAX devices (Pallas in interpret mode).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    IGNORE,
    cuda_sync,
    environment,
    jax_sync,
    make_inputs,
    no_sync,
    rel,
    time_ms,
    torch_extra_memory_mb,
    write_json,
)
from heads_common.tolerances import PARITY_FLOAT32  # noqa: E402

WORLD = 2
PARITY_BOUND = PARITY_FLOAT32  # float32, relative in norm
OPTIONS = {"softcap": 30.0, "label_smoothing": 0.1, "lse_square_scale": 1e-4}  # with a bias: parity-options


@dataclass(frozen=True)
class Problem:
    name: str
    n: int
    d: int
    v: int
    dtype: str  # "float32" or "bfloat16"
    options: bool = False  # a bias and OPTIONS


def problems(args) -> list[Problem]:
    if args.cpu_smoke:
        parity = Problem("parity", 24, 16, 64, "float32")
        main = Problem("main", 40, 16, 96, "bfloat16")
    else:
        parity = Problem("parity", args.parity_n, args.parity_d, args.parity_v, "float32")
        main = Problem("main", args.n, args.d, args.v, args.dtype)
    return [parity, Problem("parity-options", parity.n, parity.d, parity.v, "float32", options=True), main]


def problem_bias(p: Problem) -> torch.Tensor | None:
    """The ``(V,)`` float32 bias of a problem with options (drawn on the CPU: the same values everywhere), else None."""
    return torch.randn(p.v, generator=torch.Generator().manual_seed(17)) if p.options else None


def problem_inputs(p: Problem, device: torch.device, dtype: str | None = None):
    """``(hidden (N, D), weight (V, D), labels (N,))`` of ``p`` on ``device`` in ``dtype`` (default ``p.dtype``):
    drawn in float32 and rounded last, so JAX, rounding the same float32 values, gets the same inputs."""
    inputs = make_inputs(p.n, p.d, p.v, dtype=getattr(torch, dtype or p.dtype), device=device)
    return inputs.hidden, inputs.weight, inputs.labels


def _time_and_memory(step, device: torch.device, warmup: int, iters: int) -> dict:
    """``fwdbwd_ms`` and, on CUDA, ``extra_mb``: the step's peak allocation beyond what existed before it
    (gradients included; torch's allocator only: the Pallas rows' kernel temporaries live in JAX's)."""
    if device.type != "cuda":
        return {"fwdbwd_ms": time_ms(step, sync=no_sync, warmup=warmup, iters=iters).median_ms}
    torch.cuda.empty_cache()
    ms = time_ms(step, sync=cuda_sync, warmup=warmup, iters=iters).median_ms
    return {"fwdbwd_ms": ms, "extra_mb": torch_extra_memory_mb(step, device=device)}


def _fwdbwd(loss_fn, h, w, y, bias=None):
    """``(loss, d_hidden, d_weight)`` of ``loss_fn(h, w, y)``, or with a bias ``loss_fn(h, w, y, bias)`` and
    ``d_bias`` last."""
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    bb = None if bias is None else bias.detach().requires_grad_()
    loss = loss_fn(hh, ww, y) if bb is None else loss_fn(hh, ww, y, bb)
    loss.backward(torch.ones_like(loss))
    return (loss.detach(), hh.grad, ww.grad) + (() if bb is None else (bb.grad,))


def single_device_loss(impl: str, smoke: bool, options: bool = False):
    """The unsharded op on one device for a per-shard ``impl`` (smoke: Pallas in interpret mode); with
    ``options`` it takes a fourth argument, the bias, and applies ``OPTIONS``."""
    import torch_heads

    extra = OPTIONS if options else {}
    if impl == "pallas" and smoke:
        from torch_heads._pallas import pallas_loss

        return lambda h, w, y, b=None: pallas_loss(h, w, y, IGNORE, bias=b, interpret=True, **extra)
    if impl in ("cce", "cce-exact"):
        eps = None if impl == "cce-exact" else "auto"
        return lambda h, w, y, b=None: torch_heads.linear_cross_entropy(h, w, y, bias=b, impl="cce", filter_eps=eps,
                                                                        **extra)
    return lambda h, w, y, b=None: torch_heads.linear_cross_entropy(h, w, y, bias=b, impl=impl, **extra)


# ------------------------------------------------------------------------------------------
# (a) torch: one process per GPU
# ------------------------------------------------------------------------------------------


def _torch_rank(rank: int, args, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "gloo" if args.cpu_smoke else "nccl",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    try:
        for p in problems(args):
            h, w, y = problem_inputs(p, device)
            for t in (h, w, y):  # identical inputs on every rank, whatever the generator does per device
                dist.broadcast(t, 0)
            for impl in ("pallas", "chunked"):
                if impl == "chunked" and args.skip_chunked and p.name == "main":
                    continue
                row = _sharded_row(rank, p, impl, (h, w, y), args, device)
                queue.put(row)
                print(f"[torch rank {rank}] {p.name} {impl}: {_brief(row)}", flush=True)
            del h, w, y
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _sharded_row(rank: int, p: Problem, impl: str, inputs, args, device: torch.device) -> dict:
    """This rank's shard: parity with the unsharded op on this device, and (main problem) the step time."""
    from torch_heads.parallel import shard_range, vocab_parallel_linear_cross_entropy

    h, w, y = inputs
    start, stop = shard_range(p.v, rank, WORLD)
    interpret = args.cpu_smoke and impl == "pallas"
    row = {"part": "torch-2gpu", "problem": p.name, "impl": impl, "rank": rank, "errors": []}
    bias = problem_bias(p)
    bias = None if bias is None else bias.to(device)
    extra = OPTIONS if p.options else {}

    def sharded(a, b, c, d=None):
        return vocab_parallel_linear_cross_entropy(
            a, b, c, vocab_start=start, vocab_size=p.v, bias_shard=d, impl=impl, interpret=interpret, **extra
        )

    try:
        loss, dh, dw, *db = _fwdbwd(sharded, h, w[start:stop], y, None if bias is None else bias[start:stop])
        ref_loss, ref_dh, ref_dw, *ref_db = _fwdbwd(single_device_loss(impl, args.cpu_smoke, p.options), h, w, y, bias)
        row.update(err_loss=rel(loss, ref_loss), err_dh=rel(dh, ref_dh), err_dw=rel(dw, ref_dw[start:stop]))
        if db:
            row["err_db"] = rel(db[0], ref_db[0][start:stop])
        if p.name == "parity" and impl == "pallas":
            _save_parity(args.out, rank, loss, dh, dw, h, w, y)
        del loss, dh, dw, ref_loss, ref_dh, ref_dw, db, ref_db
        if p.name == "main":
            shard = w[start:stop]
            row.update(_time_and_memory(lambda: _fwdbwd(sharded, h, shard, y), device, *_runs(args, impl)))
    except Exception as exc:  # recorded; the other rows still run
        row["errors"].append(f"{type(exc).__name__}: {exc}"[:400])
        traceback.print_exc()
    return row


def _runs(args, impl: str) -> tuple[int, int]:
    """(warm-up, timed) runs: chunked takes seconds per step at the main shape, one warm-up is enough."""
    return (1 if impl == "chunked" else args.warmup), args.iters


def _save_parity(out: str, rank: int, loss, dh, dw, h, w, y) -> None:
    """Rank 0 writes the torch-sharded float32 results for part (c)."""
    import torch.distributed as dist

    shards = [None] * WORLD
    dist.all_gather_object(shards, dw.cpu())
    if rank == 0:
        arrays = {"h": h, "w": w, "y": y, "loss": loss, "d_hidden": dh, "d_weight": torch.cat(shards)}
        np.savez(os.path.join(out, "torch_sharded_parity.npz"), **{k: v.cpu().numpy() for k, v in arrays.items()})


def run_torch_sharded(args, report) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_torch_rank, args=(rank, args, port, queue)) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + args.timeout
    rows = []
    while any(proc.is_alive() for proc in procs) and time.monotonic() < deadline:
        rows += _drain(queue)
        time.sleep(0.2)
    rows += _drain(queue)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
            report["errors"].append(f"torch rank process {proc.pid} still running after {args.timeout} s: terminated")
        proc.join(10)
        if proc.exitcode not in (0, None):
            report["errors"].append(f"torch rank process {proc.pid} exited with {proc.exitcode}")
    rows += _drain(queue)
    report["torch_sharded"] = rows


def _drain(queue) -> list:
    rows = []
    while not queue.empty():
        rows.append(queue.get())
    return rows


def run_torch_single(args, report) -> None:
    """1 GPU, the whole weight: the rows the 2-GPU step is measured against."""
    smoke = args.cpu_smoke
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    p = next(q for q in problems(args) if q.name == "main")
    h, w, y = problem_inputs(p, device)
    impls = ["pallas", "chunked"] if smoke else ["pallas", "cce", "cce-exact", "chunked"]
    for impl in impls:
        if impl == "chunked" and args.skip_chunked:
            continue
        row = {"part": "torch-1gpu", "problem": p.name, "impl": impl, "errors": []}
        try:
            fn = single_device_loss(impl, smoke)
            row.update(_time_and_memory(lambda fn=fn: _fwdbwd(fn, h, w, y), device, *_runs(args, impl)))
        except Exception as exc:
            row["errors"].append(f"{type(exc).__name__}: {exc}"[:400])
            traceback.print_exc()
        report["torch_single"].append(row)
        print(f"[torch 1 device] {p.name} {impl}: {_brief(row)}", flush=True)


# ------------------------------------------------------------------------------------------
# (b) JAX: one process, a 1 x 2 mesh; (c) torch-sharded against JAX-sharded
# ------------------------------------------------------------------------------------------


def run_jax(args, report) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_heads
    from jax_heads.parallel import shard_weight

    smoke = args.cpu_smoke
    devices = jax.devices()[:WORLD]
    if len(devices) < WORLD:
        raise RuntimeError(f"JAX sees {jax.devices()}; {WORLD} devices needed")
    mesh = Mesh(np.array(devices).reshape(1, WORLD), ("data", "vocab"))
    one = devices[0]
    generator_device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    opts = {"impl": "pallas", "interpret": smoke}

    def step(mesh_opts, options=False):
        def objective(a, b, c, d=None):
            extra = {"bias": d, **OPTIONS} if options else {}
            return jnp.sum(jax_heads.linear_cross_entropy(a, b, c, **opts, **mesh_opts, **extra))

        return jax.jit(jax.value_and_grad(objective, (0, 1, 3) if options else (0, 1)))

    vocab_opts = {"mesh": mesh, "vocab_axis": "vocab"}
    steps = {False: (step({}), step(vocab_opts)), True: (step({}, True), step(vocab_opts, True))}
    for p in problems(args):
        single, sharded = steps[p.options]
        row = {"part": "jax-2dev", "problem": p.name, "impl": "pallas", "errors": []}
        single_row = {"part": "jax-1dev", "problem": p.name, "impl": "pallas", "errors": []}
        try:
            # The values torch's rank 0 drew (same generator and device type), rounded to the dtype here.
            h, w, y = (t.cpu().numpy() for t in problem_inputs(p, generator_device, "float32"))
            h1, w1 = (jax.device_put(t, one).astype(jnp.dtype(p.dtype)) for t in (h, w))
            y1 = jax.device_put(y.astype(np.int32), one)
            del h, w, y
            replicated = NamedSharding(mesh, P())
            hs, ys = jax.device_put(h1, replicated), jax.device_put(y1, replicated)
            ws = shard_weight(w1, mesh, "vocab")
            bias = problem_bias(p)
            with_bias = () if bias is None else (jax.device_put(bias.numpy(), one),)
            loss1, (dh1, dw1, *db1) = single(h1, w1, y1, *with_bias)
            loss2, (dh2, dw2, *db2) = sharded(hs, ws, ys, *(jax.device_put(b, NamedSharding(mesh, P("vocab")))
                                                            for b in with_bias))
            to64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
            row.update(
                err_loss=_rel_np(to64(loss2), to64(loss1)),
                err_dh=_rel_np(to64(dh2), to64(dh1)),
                err_dw=_rel_np(to64(dw2), to64(dw1)),
                d_weight_shard_rows=sorted({s.data.shape[0] for s in dw2.addressable_shards}),
            )
            if db1:
                row["err_db"] = _rel_np(to64(db2[0]), to64(db1[0]))
            if p.name == "parity" and "torch" not in args.skip:
                _cross_framework(args, report, loss2, dh2, dw2, to64)
            del dh1, dw1, dh2, dw2
            if p.name == "main":
                single_row["fwdbwd_ms"] = _time_jax(lambda a=(h1, w1, y1), f=single: f(*a), args)
                row["fwdbwd_ms"] = _time_jax(lambda a=(hs, ws, ys), f=sharded: f(*a), args)
        except Exception as exc:
            row["errors"].append(f"{type(exc).__name__}: {exc}"[:400])
            traceback.print_exc()
        report["jax"] += [single_row, row] if p.name == "main" else [row]
        print(f"[jax 2 devices] {p.name}: {_brief(row)}", flush=True)
        if p.name == "main":
            print(f"[jax 1 device] {p.name}: {_brief(single_row)}", flush=True)


def _cross_framework(args, report, loss, dh, dw, to64) -> None:
    path = os.path.join(args.out, "torch_sharded_parity.npz")
    try:
        saved = np.load(path)
        errs = {
            "err_loss": _rel_np(to64(loss), saved["loss"].astype(np.float64).sum()),  # JAX's step returns the sum
            "err_dh": _rel_np(to64(dh), saved["d_hidden"]),
            "err_dw": _rel_np(to64(dw), saved["d_weight"]),
        }
        report["cross"] = {**errs, "ok": max(errs.values()) <= PARITY_BOUND}
    except Exception as exc:
        report["cross"] = {"errors": [f"{type(exc).__name__}: {exc}"[:400]]}
    print(f"[torch-sharded vs JAX-sharded] parity: {report['cross']}", flush=True)


def _rel_np(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _time_jax(fn, args) -> float:
    return time_ms(fn, sync=jax_sync, warmup=args.warmup, iters=args.iters).median_ms


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------


def _brief(row: dict) -> str:
    keys = ("err_loss", "err_dh", "err_dw", "err_db", "fwdbwd_ms", "extra_mb")
    text = " ".join(f"{k} {row[k]:.3g}" for k in keys if row.get(k) is not None)
    return text + (f" ERRORS {row['errors']}" if row.get("errors") else "")


def verdicts(report) -> list[str]:
    """float32 parity lines (the bound is PARITY_BOUND); bfloat16 differences are only reported."""
    lines = []
    rows = [r for r in report["torch_sharded"] + report["jax"] if r["problem"].startswith("parity")]
    for r in rows:
        keys = ("err_loss", "err_dh", "err_dw") + (("err_db",) if r["problem"] == "parity-options" else ())
        errs = [r.get(k) for k in keys]
        ok = not r["errors"] and all(e is not None and e <= PARITY_BOUND for e in errs)
        who = f"{r['part']} {r['impl']}" + (f" rank {r['rank']}" if "rank" in r else "")
        what = "with bias and options " if r["problem"] == "parity-options" else ""
        lines.append(f"{'ok  ' if ok else 'FAIL'} float32 sharded vs 1 device, {what}{who}")
    if {"torch", "jax"} & set(report["args"]["skip"]):
        lines.append("skip float32 torch-sharded vs JAX-sharded (a framework was left out)")
    else:
        cross = report.get("cross") or {}
        lines.append(f"{'ok  ' if cross.get('ok') else 'FAIL'} float32 torch-sharded vs JAX-sharded")
    return lines


def _main_rows(report) -> list[dict]:
    """The main problem's rows; the 2-GPU torch rows merged over ranks (slowest time, largest errors)."""
    rows = [r for r in report["torch_single"] if r["problem"] == "main"]
    sharded = [r for r in report["torch_sharded"] if r["problem"] == "main"]
    for impl in dict.fromkeys(r["impl"] for r in sharded):
        ranks = [r for r in sharded if r["impl"] == impl]
        errors = sum((r["errors"] for r in ranks), [])
        merged = {"part": "torch-2gpu", "problem": "main", "impl": impl, "errors": errors}
        for key in ("fwdbwd_ms", "extra_mb", "err_loss", "err_dh", "err_dw"):
            values = [r[key] for r in ranks if r.get(key) is not None]
            merged[key] = max(values) if len(values) == WORLD else None
        rows.append(merged)
    return rows + [r for r in report["jax"] if r["problem"] == "main"]


def markdown(report) -> str:
    p = {q["name"]: q for q in report["problems"]}
    main = p["main"]
    flops = 8 * main["n"] * main["d"] * main["v"]
    lines = [
        "# Vocabulary-parallel linear cross-entropy, 2 devices",
        "",
        f"{report['env']['device']}, {report['env']['date']}. Main problem N={main['n']} D={main['d']} "
        f"V={main['v']} {main['dtype']}; parity problem N={p['parity']['n']} D={p['parity']['d']} "
        f"V={p['parity']['v']} float32. Forward+backward step, reduction none, median of {report['args']['iters']} "
        "(2-GPU torch rows: the slower rank). Speed-up: against the same framework's 1-device pallas row. "
        "Extra MB: torch's allocator peak during the step beyond what existed before it (gradients included; "
        "the Pallas kernels' temporaries live in JAX's allocator and are not counted).",
        "",
        "| part | impl | devices | fwd+bwd ms | speed-up | TFLOP/s (all devices) | extra MB/device (torch) "
        "| err loss | err dh | err dw |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = _main_rows(report)
    for r in rows:
        ms = r.get("fwdbwd_ms")
        single = r["part"].endswith(("1gpu", "1dev"))
        framework = r["part"].split("-")[0]
        base = next(
            (b.get("fwdbwd_ms") for b in rows
             if b["part"].startswith(framework) and b["part"].endswith(("1gpu", "1dev")) and b["impl"] == "pallas"),
            None,
        )
        err = f" ({'; '.join(r['errors'])[:80]})" if r["errors"] else ""
        lines.append(
            f"| {r['part']} | {r['impl']}{err} | {1 if single else WORLD} | {_fmt(ms)} | "
            f"{_fmt(base / ms if base and ms else None, 'x')} | {_fmt(ms and flops / ms / 1e9)} | "
            f"{_fmt(r.get('extra_mb'))} | {_fmt(r.get('err_loss'), 'e')} | {_fmt(r.get('err_dh'), 'e')} | "
            f"{_fmt(r.get('err_dw'), 'e')} |"
        )
    lines += [
        "",
        "Errors of the 2-device rows: relative in norm against the same op on one device (d_weight: each rank's "
        "shard against its rows).",
        "",
    ]
    lines += ["```", *verdicts(report), "```", ""]
    if report["errors"]:
        lines += ["Failures:", "", *[f"- {e[:300]}" for e in report["errors"]], ""]
    return "\n".join(lines)


def _fmt(x, kind="f") -> str:
    if x is None:
        return "-"
    return {"e": f"{x:.2e}", "x": f"{x:.2f}x"}.get(kind, f"{x:.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="vocab-parallel-out", help="folder for vocab_parallel.json and .md")
    ap.add_argument("--n", type=int, default=8192, help="tokens of the main problem")
    ap.add_argument("--d", type=int, default=2304, help="hidden size of the main problem")
    ap.add_argument("--v", type=int, default=256_000, help="vocabulary of the main problem (even)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--parity-n", type=int, default=2048)
    ap.add_argument("--parity-d", type=int, default=512)
    ap.add_argument("--parity-v", type=int, default=32_768)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skip-chunked", action="store_true", help="no chunked rows at the main shape (seconds per step)")
    ap.add_argument("--skip", nargs="*", default=[], choices=("torch", "jax"), help="parts to leave out")
    ap.add_argument("--timeout", type=int, default=300, help="seconds before the torch ranks are given up")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, gloo and 2 CPU JAX devices, interpret mode")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={WORLD}"
        args.warmup, args.iters = 1, 2
    elif torch.cuda.device_count() < WORLD:
        ap.error(f"needs {WORLD} CUDA GPUs (found {torch.cuda.device_count()}); --cpu-smoke runs on CPU")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    report = {
        "args": vars(args),
        "env": environment(device="CPU (smoke)" if args.cpu_smoke else f"{WORLD} x {torch.cuda.get_device_name(0)}"),
        "problems": [asdict(p) for p in problems(args)],
        "torch_sharded": [],
        "torch_single": [],
        "jax": [],
        "cross": None,
        "errors": [],
    }
    parts = []
    if "torch" not in args.skip:
        parts += [("torch 2 devices", run_torch_sharded), ("torch 1 device", run_torch_single)]
    if "jax" not in args.skip:
        parts.append(("jax", run_jax))
    for name, part in parts:
        print(f"== {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
        try:
            part(args, report)
        except Exception as exc:
            report["errors"].append(f"{name}: {type(exc).__name__}: {exc}"[:400])
            traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next part (JAX) allocates outside torch's cache
    report["seconds"] = time.perf_counter() - t0
    report["verdicts"] = verdicts(report)
    write_json(os.path.join(args.out, "vocab_parallel.json"), report)
    with open(os.path.join(args.out, "vocab_parallel.md"), "w") as f:
        f.write(markdown(report))
    print("\n".join(report["verdicts"]), flush=True)
    print(f"wrote {args.out}/vocab_parallel.json and .md in {report['seconds']:.0f} s", flush=True)
    return 1 if any(line.startswith("FAIL") for line in report["verdicts"]) or report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
