"""Try configurations of our Pallas kernels at one shape; print forward and forward+backward times.

    python -m benchmarks.tune_pallas --shape 8192,2304,256000 [--bwd | --bwd-only]

The forward configurations are the Triton forward's (``forward_kernel="triton"``; the Mosaic GPU
forward has ``benchmarks/tune_mosaic.py``); the forward+backward ones change the backward's chunk
budget and the filtered products, with the default forward. Each configuration is checked against
the first one's loss (gradients) before its time counts; the forward+backward lines also give the
compiled program's temporary memory. Timing: ``benchmarks.common.time_ms``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import IGNORE, MIB, jax_sync, jax_temp_mb, make_inputs, time_ms  # noqa: E402
from jax_heads.pallas import BlockSizes, pallas_loss  # noqa: E402

# Changes from the default configuration, per group of BlockSizes (triton, backward, filtered), plus the
# call options filter_eps and filter_separate_targets.
FWD_CONFIGS = [
    {},
    {"triton": {"num_stages": 4}},
    {"triton": {"programs_per_sm": 2}},
    {"triton": {"min_programs": 132}},
    {"triton": {"min_programs": 1056}},
]
BWD_CONFIGS = [
    {},
    {"backward": {"chunk_bytes": 48 * MIB}},
    {"backward": {"chunk_bytes": 64 * MIB}},
    {"backward": {"chunk_bytes": 72 * MIB}},
    {"filter_eps": 2.0**-12},
    {"filter_eps": 2.0**-12, "backward": {"chunk_bytes": 64 * MIB}},
    {"filter_eps": 2.0**-12, "backward": {"chunk_bytes": 64 * MIB}, "filtered": {"block_k": 32}},
    {"filter_eps": 2.0**-12, "backward": {"chunk_bytes": 128 * MIB}},
    {"filter_eps": 2.0**-12, "filter_separate_targets": False},  # CCE's rule: a tile holding a target is kept
    {"filter_eps": 2.0**-12, "filter_separate_targets": False, "backward": {"chunk_bytes": 128 * MIB}},
]


def configured(changes: dict, forward_kernel: str = "auto") -> tuple[BlockSizes, dict]:
    """The :class:`BlockSizes` with ``changes`` applied to its groups, and the call options among them."""
    base = BlockSizes(forward_kernel=forward_kernel)
    groups = {g: dataclasses.replace(getattr(base, g), **changes[g]) for g in ("triton", "backward", "filtered")
              if g in changes}
    options = {k: changes[k] for k in ("filter_eps", "filter_separate_targets") if k in changes}
    return dataclasses.replace(base, **groups), options


def _rel(a, b) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8192,2304,256000", help="N,D,V")
    p.add_argument("--bwd", action="store_true", help="also the forward+backward configurations")
    p.add_argument("--bwd-only", action="store_true", help="only the forward+backward configurations")
    p.add_argument("--exact-only", action="store_true", help="of the forward+backward ones, only the exact ones")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    n, d, v = map(int, args.shape.split(","))
    h, w, y = make_inputs(n, d, v).jax()
    print(f"{jax.devices()[0].device_kind}  N={n} D={d} V={v}", flush=True)
    ref = None
    for changes in FWD_CONFIGS if not args.bwd_only else ():
        config, _ = configured(changes, forward_kernel="triton")
        f = jax.jit(lambda a, b, config=config: pallas_loss(a, b, y, IGNORE, config=config))
        try:
            loss = f(h, w)
            ref = loss if ref is None else ref
            ms = time_ms(lambda f=f: f(h, w), sync=jax_sync, iters=args.iters).median_ms
            print(f"fwd {changes}: {ms:.2f} ms  {2 * n * d * v / ms / 1e9:.0f} TFLOP/s  rel-diff {_rel(loss, ref):.1e}",
                  flush=True)
        except Exception as exc:  # report and go on to the next configuration
            print(f"fwd {changes}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    if not (args.bwd or args.bwd_only):
        return
    ref = None
    for changes in BWD_CONFIGS:
        if args.exact_only and "filter_eps" in changes:
            continue
        config, options = configured(changes)

        def loss_fn(a, b, config=config, options=options):
            return jnp.sum(pallas_loss(a, b, y, IGNORE, config=config, **options))

        try:
            g = jax.jit(jax.grad(loss_fn, (0, 1)))
            temp = jax_temp_mb(g, h, w)
            dh, dw = g(h, w)
            ref = (dh, dw) if ref is None else ref
            err = max(_rel(a, b) for a, b in zip((dh, dw), ref, strict=True))
            ms = time_ms(lambda g=g: g(h, w), sync=jax_sync, iters=args.iters).median_ms
            print(f"fwd+bwd {changes}: {ms:.2f} ms  {8 * n * d * v / ms / 1e9:.0f} TFLOP/s  temp {temp:.0f} MiB  "
                  f"grad rel-diff {err:.1e}", flush=True)
        except Exception as exc:
            print(f"fwd+bwd {changes}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)


if __name__ == "__main__":
    main()
