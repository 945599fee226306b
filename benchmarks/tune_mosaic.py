"""Check and time the Mosaic GPU forward (``jax_heads/pallas/mosaic_forward.py``) against the Triton forward.

GPU only (Hopper). Every configuration runs in its own try/except (the traceback is printed and
recorded, the script goes on), and no new configuration starts after ``--budget-s`` seconds.

Per shape (Gemma-2: N=8192, D=2304, V=256000; Llama-3: N=8192, D=4096, V=128256; a ragged check:
N=1024, D=256, V=5003, padded):
  - a float32 reference of the per-token log-sum-exp and target logit, chunked over the vocabulary
    (never N × V at once);
  - ``lse_and_target`` with the Triton forward (checked and timed);
  - ``lse_and_target`` with each Mosaic configuration: max |Δ| of lse and target against the reference
    and against Triton, then (not at the ragged shape unless ``--time-ragged``) the time
    (``benchmarks.common.time_ms``), TFLOP/s at 2·N·D·V and the ratio to Triton.

    python -m benchmarks.tune_mosaic --out /tmp/mosaic [--shapes ragged,gemma2,llama3] [--configs default,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import environment, jax_sync, make_inputs, time_ms, write_json  # noqa: E402
from jax_heads.pallas import BlockSizes, lse_and_target  # noqa: E402
from jax_heads.pallas.config import MosaicForwardConfig  # noqa: E402
from jax_heads.pallas.mosaic_forward import choose_grid  # noqa: E402
from jax_heads.pallas.plan import plan_for, sm_count  # noqa: E402

SHAPES = {"ragged": (1024, 256, 5003), "gemma2": (8192, 2304, 256_000), "llama3": (8192, 4096, 128_256)}
# Changes from today's default MosaicForwardConfig (4 splits of 250 tiles at Gemma-2, 3 pipeline slots).
CONFIGS = {
    "default": {},
    "stages4": {"max_concurrent_steps": 4},
    "k128_s2": {"block_k": 128, "max_concurrent_steps": 2},
    "n256_v128": {"block_n": 256, "block_v": 128},
    "n256_v128_splits64": {"block_n": 256, "block_v": 128, "min_programs": 64},
    "splits64": {"min_programs": 64},
    "splits528": {"min_programs": 528},
    "splits1056": {"min_programs": 1056},
    "exact_exp": {"approx_math": False},
}


@jax.jit
def _ref_chunk(carry, hf, wc, y, c0):
    m, s, t = carry
    logits = jnp.dot(hf, wc.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
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


def max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(a - b)))


def run_config(name: str, config: BlockSizes, inputs: tuple, timed: bool, iters: int, checks: dict) -> dict:
    """lse and target of ``config``: errors against ``checks`` ({label: (lse, target)}), then the time."""
    h, w, y = inputs
    fn = jax.jit(lambda a, b, c: lse_and_target(a, b, c, config=config))
    res: dict = {"config": dataclasses.asdict(config.mosaic) if config.forward_kernel == "mosaic" else "triton"}
    if config.forward_kernel == "mosaic":
        plan = plan_for(h.shape[0], w.shape[0], h.shape[1], config)
        res["splits"], res["tiles_per_split"] = choose_grid(plan.n_pad, plan.v_pad, config.mosaic, config.sm_count)
        res["smem_bytes"] = config.mosaic.smem_bytes(h.dtype)
    t0 = time.perf_counter()
    lse, tgt = jax.block_until_ready(fn(h, w, y))
    res["first_call_s"] = time.perf_counter() - t0
    for label, (ref_lse, ref_tgt) in checks.items():
        res[f"lse_err_{label}"], res[f"tgt_err_{label}"] = max_err(lse, ref_lse), max_err(tgt, ref_tgt)
    res["finite"] = bool(jnp.all(jnp.isfinite(lse)))
    if timed:
        timing = time_ms(lambda: fn(h, w, y), sync=jax_sync, iters=iters)
        flops = 2 * h.shape[0] * h.shape[1] * w.shape[0]
        res.update(ms=timing.median_ms, tflops=flops / timing.median_ms / 1e9, times_ms=list(timing.samples_ms))
    res["outputs"] = (lse, tgt)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (tune_mosaic.json)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names of: " + ",".join(CONFIGS))
    ap.add_argument("--shapes", default="ragged,gemma2,llama3")
    ap.add_argument("--time-ragged", action="store_true", help="also time the ragged shape")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no new configuration after this")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    sm = sm_count()
    report = {"env": environment(sm_count=sm), "shapes": {}, "errors": []}
    path = os.path.join(args.out, "tune_mosaic.json")
    print(report["env"], flush=True)
    table = []

    for shape_name in args.shapes.split(","):
        n, d, v = SHAPES[shape_name]
        entry = report["shapes"][shape_name] = {"n": n, "d": d, "v": v, "results": {}}
        print(f"\n=== {shape_name}: N={n} D={d} V={v} ===", flush=True)
        inputs = make_inputs(n, d, v).jax()
        timed = shape_name != "ragged" or args.time_ragged
        checks = {}
        try:
            checks["ref"] = jax.block_until_ready(reference(*inputs))
        except Exception:  # noqa: BLE001 - recorded, the configurations still run
            report["errors"].append({"shape": shape_name, "what": "reference", "traceback": traceback.format_exc()})
        runs = [("triton", BlockSizes(forward_kernel="triton", sm_count=sm))]
        runs += [(name, BlockSizes(forward_kernel="mosaic", mosaic=MosaicForwardConfig(**CONFIGS[name]), sm_count=sm))
                 for name in args.configs.split(",")]
        triton_ms = None
        for name, config in runs:
            if time.perf_counter() - start > args.budget_s:
                entry["results"][name] = {"skipped": "time budget"}
                continue
            try:
                res = run_config(name, config, inputs, timed, args.iters, checks)
                outputs = res.pop("outputs")
                if name == "triton":
                    checks["triton"], triton_ms = outputs, res.get("ms")
                elif triton_ms and res.get("ms"):
                    res["speedup_vs_triton"] = triton_ms / res["ms"]
            except Exception as exc:  # noqa: BLE001
                tb = traceback.format_exc()
                print(f"--- {shape_name}/{name} FAILED ---\n{tb}", flush=True)
                res = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                report["errors"].append({"shape": shape_name, "what": name, "traceback": tb})
            entry["results"][name] = res
            table.append((shape_name, name, res))
            print(f"{name}: { {k: x for k, x in res.items() if k not in ('config', 'times_ms')} }", flush=True)
            write_json(path, report)

    head = ("shape", "kernel", "ms", "TFLOP/s", "x triton", "lse-ref", "tgt-ref", "lse-triton", "tgt-triton", "error")
    print("\n" + "  ".join(f"{h:>10s}" for h in head))
    for shape_name, name, res in table:
        def f(key, fmt, res=res):
            return fmt % res[key] if key in res else "-"

        print("  ".join(f"{c:>10s}" for c in (
            shape_name, name, f("ms", "%.2f"), f("tflops", "%.0f"), f("speedup_vs_triton", "%.3f"),
            f("lse_err_ref", "%.2e"), f("tgt_err_ref", "%.2e"), f("lse_err_triton", "%.2e"),
            f("tgt_err_triton", "%.2e"), res.get("error", "")[:60])))
    report["elapsed_s"] = time.perf_counter() - start
    write_json(path, report)
    print(f"\nwrote {path} in {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
