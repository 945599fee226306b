"""Try block shapes of our Pallas kernel at one workload; print forward and forward+backward times.

    python benchmarks/tune_pallas.py --shape 8192,2304,256000 [--bwd]

Each configuration is checked against the first one's loss before its time counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax_heads.pallas_lce import BlockSizes, pallas_loss  # noqa: E402

FWD_CONFIGS = [
    dict(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3),
    dict(block_n=128, block_v=128, block_d=64, num_warps=4, num_stages=4),
    dict(block_n=128, block_v=256, block_d=64, num_warps=8, num_stages=3),
    dict(block_n=256, block_v=128, block_d=64, num_warps=8, num_stages=3),
    dict(block_n=128, block_v=128, block_d=128, num_warps=8, num_stages=2),
    dict(block_n=64, block_v=256, block_d=64, num_warps=4, num_stages=4),
    dict(block_n=128, block_v=256, block_d=32, num_warps=8, num_stages=4),
]
BWD_CONFIGS = [
    dict(bwd_block_n=128, bwd_block_v=128, bwd_block_d=64, bwd_num_warps=8, bwd_num_stages=3),
    dict(bwd_block_n=128, bwd_block_v=256, bwd_block_d=64, bwd_num_warps=8, bwd_num_stages=3),
    dict(bwd_block_n=256, bwd_block_v=128, bwd_block_d=64, bwd_num_warps=8, bwd_num_stages=3),
    dict(bwd_block_n=128, bwd_block_v=128, bwd_block_d=64, bwd_num_warps=4, bwd_num_stages=4),
]


def timeit(fn, iters=10, warmup=2):
    for _ in range(warmup):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8192,2304,256000")
    p.add_argument("--bwd", action="store_true")
    p.add_argument("--splits", default="528", help="comma-separated min_programs values to try")
    args = p.parse_args()
    n, d, v = map(int, args.shape.split(","))
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((n, d), np.float32), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((v, d), np.float32) * d**-0.5, jnp.bfloat16)
    y = rng.integers(0, v, n).astype(np.int32)
    y[rng.random(n) < 0.1] = -100
    y = jnp.asarray(y)
    print(f"{jax.devices()[0].device_kind}  N={n} D={d} V={v}", flush=True)
    ref = None
    for cfg in FWD_CONFIGS:
        for mp in map(int, args.splits.split(",")):
            bs = BlockSizes(**cfg, min_programs=mp)
            f = jax.jit(lambda a, b, bs=bs: pallas_loss(a, b, y, -100, block_sizes=bs))
            try:
                loss = f(h, w)
                if ref is None:
                    ref = loss
                err = float(jnp.linalg.norm(loss - ref) / jnp.linalg.norm(ref))
                ms = timeit(lambda: f(h, w))
                print(f"fwd {cfg} min_programs={mp}: {ms:.2f} ms  {2*n*d*v/ms/1e9:.0f} TFLOP/s  rel-diff {err:.1e}", flush=True)
            except Exception as exc:  # noqa: BLE001 - report and go on to the next shape
                print(f"fwd {cfg} min_programs={mp}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    if not args.bwd:
        return
    for cfg in BWD_CONFIGS:
        bs = dataclasses.replace(BlockSizes(), **cfg)
        g = jax.jit(jax.grad(lambda a, b, bs=bs: jnp.sum(pallas_loss(a, b, y, -100, block_sizes=bs)), (0, 1)))
        try:
            ms = timeit(lambda: g(h, w), iters=5)
            print(f"fwd+bwd {cfg}: {ms:.2f} ms  {8*n*d*v/ms/1e9:.0f} TFLOP/s", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"fwd+bwd {cfg}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)


if __name__ == "__main__":
    main()
