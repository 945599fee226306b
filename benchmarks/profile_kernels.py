"""Where the time of one forward+backward goes: the GPU kernels of benchmark rows, by name.

Usage, from the repository root on a CUDA machine:

    python -m benchmarks.profile_kernels --impls floor,jax-pallas,jax-pallas-mean --workloads gemma2-2b \\
        --out /tmp/profile.json

Each row of ``benchmarks.bench`` is built as the benchmark builds it, called until compiled and warm,
then called ``--calls`` more times under ``torch.profiler`` with CUDA activity on. CUPTI records
every kernel of the process, so the kernels that JAX launches are listed beside torch's. Per row the
JSON holds the kernels' device time per call, grouped by kernel name and sorted by time, the sum of
them, and the wall time of the calls (the difference is launch and host time, and gaps between
kernels). A kernel's name says which stage it is (the Pallas kernels carry their function names,
cuBLAS products ``gemm``/``nvjet``, XLA fusions ``fusion``/``loop``/``input_reduce``).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import torch  # noqa: E402

from benchmarks.bench import CASE_NAMES, CASES, _names, make_runner  # noqa: E402
from benchmarks.common import REGIMES, WORKLOADS, environment, make_inputs, write_json  # noqa: E402


def kernel_times(events, calls: int) -> list[dict]:
    """Device time per call of each kernel name, from ``torch.profiler`` events, largest first.

    Args:
        events: ``profiler.events()``: objects with ``name``, ``device_type`` and
            ``device_time_total`` (microseconds; a kernel event's own duration).
        calls: how many calls the events cover.

    Returns:
        ``[{"kernel": name, "ms": device ms per call, "count": launches per call}, ...]``.
    """
    total_us: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for e in events:
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        total_us[e.name] += e.device_time_total
        count[e.name] += 1
    rows = [{"kernel": k, "ms": round(us / 1e3 / calls, 4), "count": round(count[k] / calls, 2)}
            for k, us in total_us.items()]
    return sorted(rows, key=lambda r: -r["ms"])


def profile_row(case, inputs, calls: int, warmup: int) -> dict:
    runner = make_runner(case, inputs)
    for _ in range(1 + warmup):
        runner.sync(runner.fwdbwd())
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            runner.sync(runner.fwdbwd())
        wall_ms = (time.perf_counter() - t0) * 1e3 / calls
    kernels = kernel_times(prof.events(), calls)
    return {"impl": case.name, "wall_ms": round(wall_ms, 3), "kernels_ms": round(sum(k["ms"] for k in kernels), 3),
            "kernels": kernels}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the JSON result file")
    p.add_argument("--impls", required=True, help="comma-separated subset of: " + ",".join(CASE_NAMES))
    p.add_argument("--workloads", default="gemma2-2b", help="comma-separated subset of " + ",".join(WORKLOADS))
    p.add_argument("--regime", default="uniform", choices=REGIMES)
    p.add_argument("--calls", type=int, default=3, help="profiled forward+backward calls per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the compiling one")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    if args.calls < 1:
        p.error("--calls must be at least 1")
    names = _names(args.impls, CASE_NAMES)
    record = {"env": environment(method=vars(args)), "rows": []}
    for workload in _names(args.workloads, WORKLOADS):
        n, d, v = WORKLOADS[workload]
        inputs = make_inputs(n, d, v, args.regime)
        for case in (c for c in CASES if c.name in names):
            try:
                row = profile_row(case, inputs, args.calls, args.warmup)
            except Exception as exc:  # a peer that is missing or fails: recorded, the others go on
                row = {"impl": case.name, "error": f"{type(exc).__name__}: {exc}"[:400]}
            row.update(workload=workload, regime=args.regime, n=n, d=d, v=v)
            record["rows"].append(row)
            write_json(args.out, record)
            print(f"{workload} {case.name}: wall {row.get('wall_ms')} ms, kernels {row.get('kernels_ms')} ms",
                  flush=True)
            for k in row.get("kernels", [])[:8]:
                print(f"    {k['ms']:9.3f} ms  x{k['count']:<6} {k['kernel'][:110]}", flush=True)
        del inputs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
