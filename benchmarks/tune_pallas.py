"""Try block shapes of our Pallas kernel at one workload; print forward and forward+backward times.

    python benchmarks/tune_pallas.py --shape 8192,2304,256000 [--bwd | --bwd-only]

Each configuration is checked against the first one's loss (gradients) before its time counts;
the forward+backward lines also give the compiled program's temporary memory.
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

FWD_CONFIGS = [  # BlockSizes fields changed from the default (flat loop, splits by whole waves)
    dict(),
    dict(flat_loop=False),
    dict(num_stages=4),
    dict(programs_per_sm=2),
    dict(min_programs=132),
]
MIB = 2**20
BWD_CONFIGS = [  # "filter_eps" is a call option, the rest BlockSizes fields
    dict(),  # the default
    dict(filter_eps=2.0**-12),
    dict(filter_eps=2.0**-12, chunk_bytes=64 * MIB),
    dict(filter_eps=2.0**-12, chunk_bytes=64 * MIB, mm_block_k=32),
    dict(filter_eps=2.0**-12, chunk_bytes=128 * MIB),
    dict(filter_eps=2.0**-12, filter_separate_targets=False),  # CCE's rule: a tile holding a target is kept
    dict(filter_eps=2.0**-12, filter_separate_targets=False, chunk_bytes=128 * MIB),
]


def time_samples(fn, iters=10, warmup=2):
    """Milliseconds of ``iters`` calls of ``fn()`` (blocked until ready), after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def timeit(fn, iters=10, warmup=2):
    """Median milliseconds of :func:`time_samples`."""
    return statistics.median(time_samples(fn, iters, warmup))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8192,2304,256000")
    p.add_argument("--bwd", action="store_true")
    p.add_argument("--bwd-only", action="store_true", help="only the forward+backward configurations")
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
    for cfg in FWD_CONFIGS if not args.bwd_only else ():
        bs = dataclasses.replace(BlockSizes(), **cfg)
        f = jax.jit(lambda a, b, bs=bs: pallas_loss(a, b, y, -100, block_sizes=bs))
        try:
            loss = f(h, w)
            if ref is None:
                ref = loss
            err = float(jnp.linalg.norm(loss - ref) / jnp.linalg.norm(ref))
            ms = timeit(lambda: f(h, w))
            print(f"fwd {cfg}: {ms:.2f} ms  {2*n*d*v/ms/1e9:.0f} TFLOP/s  rel-diff {err:.1e}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report and go on to the next shape
            print(f"fwd {cfg}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    if not (args.bwd or args.bwd_only):
        return
    ref = None
    for cfg in BWD_CONFIGS:
        cfg = dict(cfg)
        eps = cfg.pop("filter_eps", None)
        separate = cfg.pop("filter_separate_targets", True)
        bs = dataclasses.replace(BlockSizes(), **cfg)
        loss_fn = lambda a, b, bs=bs, eps=eps, separate=separate: jnp.sum(  # noqa: E731
            pallas_loss(a, b, y, -100, block_sizes=bs, filter_eps=eps, filter_separate_targets=separate)
        )
        try:
            g = jax.jit(jax.grad(loss_fn, (0, 1))).lower(h, w).compile()
            temp = g.memory_analysis().temp_size_in_bytes / MIB
            dh, dw = g(h, w)
            if ref is None:
                ref = (dh, dw)
            err = max(float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
                      for a, b in zip((dh, dw), ref))
            ms = timeit(lambda: g(h, w), iters=5)
            print(f"fwd+bwd {cfg} filter_eps={eps} separate_targets={separate}: {ms:.2f} ms  {8*n*d*v/ms/1e9:.0f} TFLOP/s  "
                  f"temp {temp:.0f} MiB  grad rel-diff {err:.1e}", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"fwd+bwd {cfg} filter_eps={eps}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)


if __name__ == "__main__":
    main()
