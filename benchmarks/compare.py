"""The headline rows of this checkout and of another one, timed in the same run (``bench.py --compare-tree``).

Each checkout is timed by ``python -m benchmarks.bench`` in its own subprocess, with a folder of links
to that checkout's library packages first on the child's path: the child imports the library from
that checkout and this benchmark from here, so both trees are measured by the same code. The
checkouts alternate (this, other, other, this, ...) so that a drift of the machine falls on both.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from benchmarks.common import REGIMES, WORKLOADS, git_commit, read_json

HEADLINE = ("torch_heads-pallas", "jax-pallas")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package_shim(tree: str, folder: str) -> str:
    """A folder of links to ``tree``'s top-level packages (not its benchmarks or tests)."""
    os.makedirs(folder)
    for name in sorted(os.listdir(tree)):
        if name not in ("benchmarks", "tests") and os.path.isfile(os.path.join(tree, name, "__init__.py")):
            os.symlink(os.path.join(tree, name), os.path.join(folder, name))
    return folder


def _selection(only: str) -> tuple[list[str], list[str], list[str]]:
    """The impls, workloads and regimes of ``--compare-only`` (``WORKLOAD:REGIME:IMPL,...``; empty: every
    headline row)."""
    if not only:
        return list(HEADLINE), list(WORKLOADS), list(REGIMES)
    picked = [item.split(":") for item in only.split(",") if item]
    if any(len(p) != 3 or p[2] not in HEADLINE for p in picked):
        raise SystemExit(f"--compare-only takes WORKLOAD:REGIME:IMPL items with IMPL in {HEADLINE}, got {only!r}")
    return [sorted({p[i] for p in picked}) for i in (2, 0, 1)]


def compare_trees(other: str, args) -> dict:
    """The headline rows of this checkout and of ``other`` over ``args.compare_rounds`` rounds; every child
    runs with ``args.iters`` and ``args.warmup`` and is given ``args.compare_timeout`` seconds."""
    trees = {"this": REPO, "other": os.path.abspath(other)}
    result = {"tree": trees["other"], "commits": {k: git_commit(p) for k, p in trees.items()},
              "rounds": args.compare_rounds, "impls": list(HEADLINE), "rows": [], "errors": []}
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    with tempfile.TemporaryDirectory() as tmp:
        shims = {label: _package_shim(path, os.path.join(tmp, label)) for label, path in trees.items()}
        for r in range(args.compare_rounds):
            for label in ("this", "other") if r % 2 == 0 else ("other", "this"):
                out = os.path.join(tmp, f"{label}-{r}.json")
                impls, workloads, regimes = _selection(args.compare_only)
                cmd = [sys.executable, "-m", "benchmarks.bench", "--impls", ",".join(impls), "--no-errors",
                       "--workloads", ",".join(workloads), "--regimes", ",".join(regimes),
                       "--iters", str(args.iters), "--warmup", str(args.warmup), "--out", out]
                env = {**os.environ, "PYTHONPATH": os.pathsep.join([shims[label], REPO, *inherited])}
                print(f"\n== compare: {label} tree ({trees[label]}), round {r}", flush=True)
                try:
                    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True,
                                          timeout=args.compare_timeout)
                    print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
                    if proc.returncode:
                        result["errors"].append(f"{label} round {r}: exit {proc.returncode}: {proc.stderr[-400:]}")
                    child = read_json(out)
                except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
                    result["errors"].append(f"{label} round {r}: {type(exc).__name__}: {exc}"[:400])
                    continue
                rows = [row for row in child["rows"] if row["kind"] != "warmup"]
                result["rows"] += [{**row, "tree": label, "round": r} for row in rows]
                result.setdefault("env", {})[label] = child["env"]
    return result
