"""Check and time the Mosaic GPU forward partials (jax_heads/mgpu_lce.py) against the Triton forward.

GPU only. One run reports as much as it can: every configuration runs in its own try/except (the
traceback is printed and recorded, the script goes on), and the whole run stops starting new
configurations after ``--budget-s`` seconds (default 240, so it ends within 5 minutes).

Per shape (Gemma-2: N=8192, D=2304, V=256000; a ragged check: N=1024, D=256, V=5003 padded):
  - a float32 reference of the per-token log-sum-exp and target logit, chunked over the vocabulary
    (never N × V at once);
  - the Triton ``lce_forward`` of jax_heads/pallas_lce.py (checked and timed);
  - each Mosaic configuration: max |Δ| of lse and target against the reference and against Triton,
    then (Gemma-2 only unless --time-ragged) the median of --iters timed calls after warm-up,
    with TFLOP/s at 2·N·D·V and the ratio to Triton.

    PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/tune_mgpu.py --out /tmp/mgpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp

from jax_heads.mgpu_lce import MgpuConfig, choose_grid
from jax_heads.pallas_lce import BlockSizes, _sm_count, lce_forward, pad_inputs, plan_for
from tune_pallas import time_samples

SHAPES = {"ragged": (1024, 256, 5003), "gemma2": (8192, 2304, 256_000), "llama3": (8192, 4096, 128_256)}


def _first(**changes) -> MgpuConfig:
    """The configuration of the first GPU run with ``changes``: the names below (and in
    docs/tune-mgpu-*.log) are relative to it (4 slots, splits until 528 CTAs), not to today's default."""
    return MgpuConfig(**{"max_concurrent_steps": 4, "min_programs": 528, **changes})


CONFIGS = {
    "default": _first(),
    "lane": _first(lowering="lane"),
    "wait0": _first(wgmma_in_flight=0),
    "stages3": _first(max_concurrent_steps=3),
    "n256_v128": _first(block_n=256, block_v=128),
    "k128_s2": _first(block_k=128, max_concurrent_steps=2),
    "splits_132": _first(min_programs=132),
    "splits_1056": _first(min_programs=1056),
    "splits_64": _first(min_programs=64),
    "splits_132_s3": _first(min_programs=132, max_concurrent_steps=3),  # today's default (MgpuConfig())
    "n256_v128_splits_64": _first(block_n=256, block_v=128, min_programs=64),
    "n256_v128_splits_132": _first(block_n=256, block_v=128, min_programs=132),
    "n256_v128_splits_132_s3": _first(block_n=256, block_v=128, min_programs=132, max_concurrent_steps=3),
    "splits_132_exact_exp": _first(min_programs=132, approx_math=False),
}


def _forward(h, w, y, bs: BlockSizes):
    """The jitted ``lce_forward`` with block sizes ``bs``, its padded inputs and plan."""
    n, d = h.shape
    plan = plan_for(n, w.shape[0], d, bs)
    fn = jax.jit(lambda a, b, c: lce_forward(a, b, c, block_sizes=bs, plan=plan, interpret=False))
    return fn, pad_inputs(h, w, y, plan), plan


def make_inputs(n, d, v, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    h = jax.random.normal(k1, (n, d), jnp.float32).astype(jnp.bfloat16)
    w = (0.02 * jax.random.normal(k2, (v, d), jnp.float32)).astype(jnp.bfloat16)
    y = jax.random.randint(k3, (n,), 0, v, jnp.int32)
    y = jnp.where(jnp.arange(n) % 13 == 0, -1, y)  # some ignored tokens
    return h, w, y


@jax.jit
def _ref_chunk(carry, hf, wc, y, c0):
    m, s, t = carry
    logits = jnp.dot(hf, wc.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    cm = jnp.max(logits, axis=1)
    m_new = jnp.maximum(m, cm)
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
    cols = c0 + jnp.arange(wc.shape[0])
    t = t + jnp.sum(jnp.where(cols[None, :] == y[:, None], logits, 0.0), axis=1)
    return m_new, s, t


def reference(h, w, y, chunk=8192):
    """float32 (lse, target logit) per token, chunked over the vocabulary."""
    n, v = h.shape[0], w.shape[0]
    hf = h.astype(jnp.float32)
    carry = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    for c0 in range(0, v, chunk):  # the shorter last chunk compiles once more; that is all
        carry = _ref_chunk(carry, hf, w[c0:c0 + chunk], y, c0)
    m, s, t = carry
    return m + jnp.log(s), t


def time_fn(fn, args, iters):
    """(median seconds, samples in seconds) of ``fn(*args)``."""
    times = [t / 1e3 for t in time_samples(lambda: fn(*args), iters)]
    return statistics.median(times), times


def max_err(a, b, n):
    return float(jnp.max(jnp.abs(a[:n] - b[:n])))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (results.json)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of: " + ",".join(CONFIGS))
    ap.add_argument("--shapes", default="ragged,gemma2")
    ap.add_argument("--time-ragged", action="store_true", help="also time the ragged shape")
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no new configuration after this")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    report = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()], "shapes": {}, "errors": []}
    print(f"jax {jax.__version__}  devices {report['devices']}", flush=True)
    sm = _sm_count()
    report["sm_count"] = sm
    rows = []

    def save():
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(report, f, indent=2)

    for shape_name in args.shapes.split(","):
        n, d, v = SHAPES[shape_name]
        flops = 2 * n * d * v
        entry = report["shapes"][shape_name] = {"n": n, "d": d, "v": v, "results": {}}
        print(f"\n=== {shape_name}: N={n} D={d} V={v} ===", flush=True)
        h, w, y = make_inputs(n, d, v)
        try:
            t0 = time.perf_counter()
            ref_lse, ref_tgt = jax.block_until_ready(reference(h, w, y))
            print(f"reference: {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception:  # noqa: BLE001
            tb = traceback.format_exc()
            print(tb, flush=True)
            report["errors"].append({"shape": shape_name, "what": "reference", "traceback": tb})
            ref_lse = ref_tgt = None

        # Triton forward.
        tri_lse = tri_tgt = None
        tri_time = None
        try:
            tri, (hp, wp, yp), _ = _forward(h, w, y, BlockSizes(forward_kernel="triton", sm_count=sm))
            tri_lse, tri_tgt = jax.block_until_ready(tri(hp, wp, yp))
            res = {}
            if ref_lse is not None:
                res = {"lse_err_ref": max_err(tri_lse, ref_lse, n), "tgt_err_ref": max_err(tri_tgt, ref_tgt, n)}
            if shape_name != "ragged" or args.time_ragged:
                tri_time, times = time_fn(tri, (hp, wp, yp), args.iters)
                res.update(ms=tri_time * 1e3, tflops=flops / tri_time / 1e12, times_ms=[t * 1e3 for t in times])
            entry["results"]["triton"] = res
            rows.append((shape_name, "triton", res))
            print(f"triton: {res if 'times_ms' not in res else {k: v_ for k, v_ in res.items() if k != 'times_ms'}}",
                  flush=True)
        except Exception:  # noqa: BLE001
            tb = traceback.format_exc()
            print(tb, flush=True)
            report["errors"].append({"shape": shape_name, "what": "triton", "traceback": tb})
        save()

        for name in args.configs.split(","):
            if time.perf_counter() - start > args.budget_s:
                print(f"[budget] skipping {shape_name}/{name}", flush=True)
                entry["results"][name] = {"skipped": "time budget"}
                continue
            cfg = CONFIGS[name]
            res = {"config": dataclasses.asdict(cfg)}
            try:
                fn, (hm, wm, ym), plan = _forward(h, w, y, BlockSizes(forward_kernel="mosaic", mosaic=cfg, sm_count=sm))
                splits, tps = choose_grid(plan.n_pad, plan.v_pad, cfg, sm)
                res.update(splits=splits, tiles_per_split=tps, smem_bytes=cfg.smem_bytes(jnp.bfloat16))
                t0 = time.perf_counter()
                lse, tgt = jax.block_until_ready(fn(hm, wm, ym))
                res["first_call_s"] = time.perf_counter() - t0
                if ref_lse is not None:
                    res["lse_err_ref"] = max_err(lse, ref_lse, n)
                    res["tgt_err_ref"] = max_err(tgt, ref_tgt, n)
                if tri_lse is not None:
                    res["lse_err_triton"] = max_err(lse, tri_lse, n)
                    res["tgt_err_triton"] = max_err(tgt, tri_tgt, n)
                res["finite"] = bool(jnp.all(jnp.isfinite(lse[:n])))
                if shape_name != "ragged" or args.time_ragged:
                    med, times = time_fn(fn, (hm, wm, ym), args.iters)
                    res.update(ms=med * 1e3, tflops=flops / med / 1e12, times_ms=[t * 1e3 for t in times])
                    if tri_time:
                        res["speedup_vs_triton"] = tri_time / med
            except Exception as e:  # noqa: BLE001
                tb = traceback.format_exc()
                print(f"--- {shape_name}/{name} FAILED ---\n{tb}", flush=True)
                res["error"] = f"{type(e).__name__}: {e}"[:2000]
                report["errors"].append({"shape": shape_name, "what": name, "traceback": tb})
            entry["results"][name] = res
            rows.append((shape_name, name, res))
            short = {k: v_ for k, v_ in res.items() if k not in ("config", "times_ms")}
            print(f"{name}: {short}", flush=True)
            save()

    print("\n%-8s %-12s %9s %8s %8s %11s %11s %11s %11s  %s" % (
        "shape", "kernel", "ms", "TFLOP/s", "x triton", "lse-ref", "tgt-ref", "lse-triton", "tgt-triton",
        "error"))
    for shape_name, name, res in rows:
        def f(key, fmt, res=res):
            return fmt % res[key] if key in res else "-"

        print("%-8s %-12s %9s %8s %8s %11s %11s %11s %11s  %s" % (
            shape_name, name, f("ms", "%.2f"), f("tflops", "%.0f"), f("speedup_vs_triton", "%.3f"),
            f("lse_err_ref", "%.2e"), f("tgt_err_ref", "%.2e"), f("lse_err_triton", "%.2e"),
            f("tgt_err_triton", "%.2e"), res.get("error", "")[:80]))
    report["elapsed_s"] = time.perf_counter() - start
    save()
    print(f"\nwrote {os.path.join(args.out, 'results.json')} in {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
