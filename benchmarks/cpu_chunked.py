"""CPU benchmark of ``linear_cross_entropy``: ``chunked`` against ``reference`` (materialised logits).

Forward + backward (gradients for hidden and weight) of the per-token loss at N=4096, D=256,
V=50304 in float32 by default (``benchmarks.common.make_inputs``: 10% of the labels ignored). Each
implementation runs in its own subprocess (this module with ``--worker``) so that its peak memory is
its own:

* time: ``benchmarks.common.time_ms``, median of ``--repeats`` runs after ``--warmup`` runs (the first
  of which is the one every measurement starts with);
* extra memory: ``ru_maxrss`` after the runs minus ``ru_maxrss`` once the inputs exist and a tiny
  warm-up (N=8) has loaded the kernels, i.e. the peak resident memory the full-size runs added.
  The workers run with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB (unless it is set
  already or ``--default-malloc`` is given): by default glibc raises that threshold after the first
  large free, so later mid-sized blocks come from a heap that is not given back, and ``ru_maxrss``
  then grows with the number of runs rather than with the live peak.

Targets: chunked/reference memory <= 1/8, chunked/reference time <= 1.5.

Usage::

    python -m benchmarks.cpu_chunked [--shape 4096,256,50304] [--threads 2] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys

from benchmarks.common import environment, make_inputs, no_sync, time_ms, write_json

IMPLS = ("chunked", "reference")
DEFAULT_SHAPE = (4096, 256, 50304)
TARGET_MEMORY_RATIO = 1 / 8
TARGET_TIME_RATIO = 1.5


def _max_rss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def worker(impl: str, shape: tuple[int, int, int], threads: int, warmup: int, repeats: int) -> dict:
    """Time ``impl`` in this process and measure the peak memory its runs add; return the numbers."""
    import torch

    from torch_heads import linear_cross_entropy

    torch.set_num_threads(threads)
    inputs = make_inputs(*shape, dtype=torch.float32, device="cpu")
    hidden, labels = inputs.hidden.requires_grad_(True), inputs.labels
    weight = inputs.weight.requires_grad_(True)

    def step(h: torch.Tensor, y: torch.Tensor) -> float:
        loss = linear_cross_entropy(h, weight, y, impl=impl)
        torch.autograd.grad(loss.sum(), (h, weight))
        return float(loss.detach().sum())

    step(hidden[:8], labels[:8])  # load the kernels before the baseline is taken
    before = _max_rss_bytes()
    last = {}

    def run() -> None:
        last["loss_sum"] = step(hidden, labels)

    timing = time_ms(run, sync=no_sync, warmup=max(warmup - 1, 0), iters=repeats)
    after = _max_rss_bytes()
    return {
        "impl": impl,
        "time_ms": timing.median_ms,
        "times_ms": list(timing.samples_ms),
        "extra_mb": (after - before) / 2**20,
        "loss_sum": last["loss_sum"],
    }


def run_worker(impl: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, "-m", "benchmarks.cpu_chunked", "--worker", impl,
        "--shape", ",".join(map(str, args.shape)), "--threads", str(args.threads),
        "--warmup", str(args.warmup), "--repeats", str(args.repeats),
    ]  # fmt: skip
    env = dict(os.environ)
    if not args.default_malloc:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    # From the repository root, so the worker imports this checkout's packages.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"worker {impl} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(results: dict, args: argparse.Namespace) -> str:
    chunked, reference = results["chunked"], results["reference"]
    time_ratio = chunked["time_ms"] / reference["time_ms"]
    memory_ratio = chunked["extra_mb"] / reference["extra_mb"]
    n, d, v = args.shape
    malloc = (
        "default malloc"
        if args.default_malloc
        else f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 131072)}"
    )
    lines = [
        f"CPU linear cross-entropy, forward + backward, N={n} D={d} V={v} float32, 10% ignored, "
        f"{args.threads} threads, median of {args.repeats} after {args.warmup} warm-up, {malloc} "
        f"({platform.machine()}, {os.cpu_count()} CPUs)",
        "",
        "| implementation | time ms | extra memory MB |",
        "|---|---|---|",
        *(f"| {name} | {results[name]['time_ms']:.1f} | {results[name]['extra_mb']:.1f} |" for name in IMPLS),
        "",
        "| ratio chunked / reference | measured | target | met |",
        "|---|---|---|---|",
        f"| time | {time_ratio:.3f} | <= {TARGET_TIME_RATIO} | {'yes' if time_ratio <= TARGET_TIME_RATIO else 'NO'} |",
        f"| extra memory | {memory_ratio:.3f} (1/{1 / memory_ratio:.1f}) | <= 1/{1 / TARGET_MEMORY_RATIO:.0f} | "
        f"{'yes' if memory_ratio <= TARGET_MEMORY_RATIO else 'NO'} |",
        "",
        f"loss sums: chunked {chunked['loss_sum']:.6f}, reference {reference['loss_sum']:.6f} "
        f"(relative difference {abs(chunked['loss_sum'] - reference['loss_sum']) / abs(reference['loss_sum']):.1e})",
    ]
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--shape must be N,D,V with positive ints, got {text!r}")
    return parts  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=_shape, default=DEFAULT_SHAPE, help="N,D,V (default %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in both workers")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's mmap threshold dynamic")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.shape, args.threads, args.warmup, args.repeats)))
        return
    results = {impl: run_worker(impl, args) for impl in IMPLS}
    print(markdown(results, args))
    if args.json:
        record = {
            "env": environment(),
            "shape": dict(zip("NDV", args.shape, strict=True)),
            "dtype": "float32",
            "threads": args.threads,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "default_malloc": args.default_malloc,
            "results": results,
            "time_ratio": results["chunked"]["time_ms"] / results["reference"]["time_ms"],
            "memory_ratio": results["chunked"]["extra_mb"] / results["reference"]["extra_mb"],
            "targets": {"time_ratio": TARGET_TIME_RATIO, "memory_ratio": TARGET_MEMORY_RATIO},
        }
        write_json(args.json, record)


if __name__ == "__main__":
    main()
