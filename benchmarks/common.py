"""What every benchmark script shares: the workloads, the inputs, the timer, the environment, result files.

Timing, the same for both frameworks and every script: the host clock around one call followed by a
device synchronisation (``torch.cuda.synchronize()`` or ``jax.block_until_ready``), median of the
timed calls, after an untimed first call (compilation, autotuning) and warm-up calls. CUDA events
would time only torch's stream while JAX runs on its own streams; the host clock measures both the
same way (launch latency included, about 0.1 ms).

This module imports torch, and JAX only where a JAX helper is called.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import torch

IGNORE = -100
IGNORED_FRACTION = 0.1
# The two language-model heads of the benchmark: (tokens N, hidden size D, vocabulary V).
WORKLOADS = {
    "gemma2-2b": (8192, 2304, 256_000),
    "llama3-8b": (8192, 4096, 128_256),
}
# "uniform": logits ~ N(0, 1/4), a near-uniform softmax; "peaked": hidden states scaled until the
# mean top probability is PEAKED_TOP_PROB.
REGIMES = ("uniform", "peaked")
PEAKED_TOP_PROB = 0.15
SLOW_MS = 500.0  # a call slower than this (a fallback) is timed SLOW_ITERS times, without warm-up
SLOW_ITERS = 3
MIB = 2**20
# Distributions whose versions the environment records (those not installed are left out).
PACKAGES = (
    "torch", "jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "triton", "flax", "numpy",
    "cut-cross-entropy", "liger-kernel", "quack-kernels", "nvidia-cutlass-dsl", "apache-tvm-ffi",
)  # fmt: skip


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Inputs:
    """One problem: ``hidden`` (N, D), ``weight`` (V, D), ``labels`` (N,) int64 with ``IGNORE`` at
    about ``IGNORED_FRACTION`` of the tokens; ``scale`` is the factor the hidden states were
    multiplied by (1 for the near-uniform regime)."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    scale: float
    _jax: tuple | None = dataclasses.field(default=None, repr=False)

    def jax(self) -> tuple:
        """``(hidden, weight, labels)`` as JAX arrays (labels int32), zero-copy through DLPack, made once."""
        if self._jax is None:
            import jax

            self._jax = tuple(jax.dlpack.from_dlpack(t.detach()) for t in (self.hidden, self.weight, self.labels.int()))
        return self._jax


def make_inputs(n: int, d: int, v: int, regime: str = "uniform", *, dtype: torch.dtype = torch.bfloat16,
                device: str | torch.device = "cuda", seed: int = 0) -> Inputs:
    """Hidden states ~ N(0, 1), weight ~ N(0, 1/(4D)) and uniform labels, some ignored.

    Everything is drawn in float32 on ``device`` (with a generator of that device type) and rounded
    to ``dtype`` last, so the same seed and device type give the same values whatever the dtype.
    ``regime="peaked"`` scales the hidden states so that the mean top softmax probability of the
    first 256 tokens is ``PEAKED_TOP_PROB``.
    """
    if regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(n, d, device=device, generator=g)
    w = torch.randn(v, d, device=device, generator=g) * (d**-0.5) * 0.5
    y = torch.randint(0, v, (n,), device=device, generator=g)
    y[torch.rand(n, device=device, generator=g) < IGNORED_FRACTION] = IGNORE
    scale = _scale_for_top_prob(h[:256], w, PEAKED_TOP_PROB) if regime == "peaked" else 1.0
    return Inputs((h * scale).to(dtype).contiguous(), w.to(dtype).contiguous(), y, scale)


def _top_prob(h: torch.Tensor, w: torch.Tensor) -> float:
    return torch.softmax(h.float() @ w.float().T, dim=-1).max(dim=-1).values.mean().item()


def _scale_for_top_prob(h: torch.Tensor, w: torch.Tensor, target: float) -> float:
    lo, hi = 1.0, 256.0  # bisection in log space
    for _ in range(30):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if _top_prob(h * mid, w) < target else (lo, mid)
    return (lo * hi) ** 0.5


def mean_top_prob(hidden: torch.Tensor, weight: torch.Tensor) -> float:
    """Mean top softmax probability of the first 512 tokens (how peaked the data is)."""
    return _top_prob(hidden[:512], weight)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against ``b`` in the Frobenius norm (float32)."""
    a, b = a.float(), b.float()
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


# ------------------------------------------------------------------------------------------
# timing and memory
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    samples_ms: tuple[float, ...]


def cuda_sync(_result: Any = None) -> None:
    """Waits for every stream of the current CUDA device (torch's and JAX's)."""
    torch.cuda.synchronize()


def jax_sync(result: Any) -> None:
    """Waits for the JAX arrays in ``result``."""
    import jax

    jax.block_until_ready(result)


def no_sync(_result: Any = None) -> None:
    """For calls that have finished when they return (the CPU)."""


def time_ms(fn: Callable[[], Any], *, sync: Callable[[Any], None], warmup: int = 3, iters: int = 10,
            slow_ms: float | None = None) -> Timing:
    """Median wall time of ``sync(fn())`` in milliseconds.

    Args:
        fn: the call, without arguments; its result is passed to ``sync``.
        sync: waits until the device has finished the call (:func:`cuda_sync`, :func:`jax_sync`,
            :func:`no_sync`).
        warmup: untimed calls after the first (compiling) one.
        iters: timed calls.
        slow_ms: if given, one more call is timed first; if it takes longer than this (a fallback),
            there is no warm-up and only ``min(iters, SLOW_ITERS)`` timed calls.
    """
    sync(fn())  # compiles (XLA, Triton autotuning), so every timed call sees a steady program
    if slow_ms is not None:
        t0 = time.perf_counter()
        sync(fn())
        if (time.perf_counter() - t0) * 1e3 > slow_ms:
            warmup, iters = 0, min(iters, SLOW_ITERS)
    for _ in range(warmup):
        sync(fn())
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(fn())
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(samples), tuple(samples))


def torch_extra_memory_mb(fn: Callable[[], Any], *, exclude_bytes: int = 0,
                          device: torch.device | None = None) -> float:
    """MiB that torch's allocator held at its peak during one call of ``fn`` beyond what it held before,
    less ``exclude_bytes`` (e.g. the gradients' own size). Memory of JAX's allocator is not seen."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return max(0, peak - exclude_bytes) / MIB


def jax_temp_mb(jitted, *args) -> float:
    """MiB of temporary buffers of the compiled ``jitted(*args)``: what it needs beyond inputs and outputs."""
    return jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes / MIB


# ------------------------------------------------------------------------------------------
# environment and result files
# ------------------------------------------------------------------------------------------


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_tree() -> str | None:
    """The folder that holds the imported library packages (the checkout being measured)."""
    spec = importlib.util.find_spec("torch_heads")
    return os.path.dirname(os.path.dirname(os.path.realpath(spec.origin))) if spec and spec.origin else None


def git_commit(path: str | None) -> str | None:
    """Short commit of the git checkout at ``path`` (``+dirty`` with uncommitted changes), or None."""
    if not path:
        return None
    try:
        head = subprocess.run(["git", "-C", path, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def environment(**extra: Any) -> dict:
    """The machine, the date, the versions and the measured tree, plus ``extra``."""
    if torch.cuda.is_available():
        card, gpus = torch.cuda.get_device_name(), torch.cuda.device_count()
    else:
        card, gpus = f"CPU ({platform.machine()}, {os.cpu_count()} cores)", 0
    versions = {name: _version(name) for name in PACKAGES}
    tree = package_tree()
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "card": card,
        "gpus": gpus,
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "date": now.date().isoformat(),
        "started_utc": now.isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": {name: v for name, v in versions.items() if v},
        "tree": tree,
        "commit": git_commit(tree),
        **extra,
    }


def write_json(path: str, record: dict) -> None:
    """Writes ``record`` to ``path`` through a temporary file, so a reader (or a run cut off later)
    sees either the previous complete file or this one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def merge_results(records: list[dict]) -> dict:
    """One result from several ``bench.py`` files of one session (e.g. one workload per GPU, run at the
    same time): their rows in order, the first file's environment with every file's in ``env["parts"]``,
    and the first ``compare`` block found. Ratios stay within a workload and regime, hence within a part."""
    if not records:
        raise ValueError("merge_results needs at least one result")
    merged = {"format": records[0]["format"], "env": {**records[0]["env"], "parts": [r["env"] for r in records]},
              "rows": [row for r in records for row in r["rows"]]}
    compare = next((r["compare"] for r in records if r.get("compare")), None)
    if compare is not None:
        merged["compare"] = compare
    return merged
