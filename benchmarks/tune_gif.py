"""Time the gradient-in-forward path (``jax_heads/pallas/gradient_in_forward.py``) over its configurations.

GPU only. For each workload (Gemma-2, Llama-3 heads, bf16, reduction mean, 10 % ignored labels) and
each configuration of ``GradientInForwardConfig`` (changes from the default, below): the forward+
backward time of ``jax.value_and_grad`` of the mean loss (``benchmarks.common.time_ms``), the
first call's wall time (compiling included), the compiled program's temporary bytes, and the loss
and gradients' largest difference from the default configuration's (a configuration must not
change the result beyond bf16 rounding).
Every configuration runs in its own try/except; none starts after ``--budget-s`` seconds.

    python -m benchmarks.tune_gif --out /tmp/gif.json [--workloads gemma2-2b,llama3-8b] [--configs default,...]
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

from benchmarks.bench import _names  # noqa: E402
from benchmarks.common import (  # noqa: E402
    IGNORE,
    WORKLOADS,
    environment,
    jax_sync,
    jax_temp_mb,
    make_inputs,
    time_ms,
    write_json,  # noqa: E402
)
from jax_heads.pallas import BlockSizes, GradientInForwardConfig, gradient_in_forward_loss  # noqa: E402

MIB = 2**20
CONFIGS = {
    "default": {},
    "n32": {"block_n": 32},
    "v512": {"block_v": 512},
    "v2048": {"block_v": 2048},
    "w8": {"num_warps": 8},
    "n32_v2048_w8": {"block_n": 32, "block_v": 2048, "num_warps": 8},
    "stages3": {"num_stages": 3},
    "programs528": {"min_programs": 528},
    "programs2112": {"min_programs": 2112},
    "budget768": {"logits_budget_bytes": 768 * MIB},
    "budget512": {"logits_budget_bytes": 512 * MIB},
    "budget448": {"logits_budget_bytes": 448 * MIB},
    "budget384": {"logits_budget_bytes": 384 * MIB},
    "w8_budget448": {"num_warps": 8, "logits_budget_bytes": 448 * MIB},
    "chunks3": {"min_chunks": 3},
    "chunks5": {"min_chunks": 5},
    "tail4": {"tail_steps": 4},
    "tail16": {"tail_steps": 16},
}


def _run(row: dict, h, w, y, changes: dict):
    """Time one configuration into ``row``; returns ``(loss, (d_hidden, d_weight))``."""
    config = BlockSizes(gradient_in_forward=dataclasses.replace(GradientInForwardConfig(), **changes))
    fn = jax.jit(jax.value_and_grad(lambda a, b: gradient_in_forward_loss(a, b, y, IGNORE, "mean", config=config),
                                    (0, 1)))
    t0 = time.perf_counter()
    out = fn(h, w)
    jax_sync(out)
    row["first_call_s"] = round(time.perf_counter() - t0, 2)  # compiling included
    row["fwdbwd_ms"] = round(time_ms(lambda: fn(h, w), sync=jax_sync).median_ms, 3)
    row["temp_mib"] = round(jax_temp_mb(fn, h, w), 1)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--workloads", default="gemma2-2b,llama3-8b")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--budget-s", type=float, default=240.0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    record = {"env": environment(method=vars(args)), "rows": []}
    for workload in _names(args.workloads, WORKLOADS):
        n, d, v = WORKLOADS[workload]
        h, w, y = make_inputs(n, d, v).jax()
        base = None
        for name in _names(args.configs, CONFIGS):
            if time.perf_counter() - t0 > args.budget_s:
                print(f"budget spent: {name} and later not run", flush=True)
                break
            row = {"workload": workload, "config": name, "changes": CONFIGS[name]}
            try:
                out = _run(row, h, w, y, CONFIGS[name])
                base = out if base is None else base
                row["max_diff"] = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                                   for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(base))]
            except Exception as exc:  # recorded, the next configuration goes on
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            record["rows"].append(row)
            write_json(args.out, record)
            print(f"{workload} {name}: {row.get('fwdbwd_ms')} ms, {row.get('temp_mib')} MiB, "
                  f"diff {row.get('max_diff')} {row.get('error', '')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
