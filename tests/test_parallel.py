"""Vocabulary parallelism in both frameworks, and torch-sharded against JAX-sharded.

Each framework runs in its own process (the JAX device count is fixed when JAX starts; torch
spawns gloo ranks): ``tests/multidevice/torch_vocab_parallel.py`` with 2 and 3 gloo ranks (the
vocabulary-parallel op with impl chunked and pallas in interpret mode, the vocabulary-parallel split
head, DDP, DTensor refusal, configuration errors; it also saves its 2-rank results), then
``tests/multidevice/jax_vocab_parallel.py`` on 4 fake CPU devices (the op, ``linear_cross_entropy``
and the split head with mesh options, 1 x 4 and 2 x 2 meshes; and the same problem as the saved
torch results). Last, the 2-GPU benchmark script's ``--cpu-smoke`` mode.
"""

import json
import os
import subprocess
import sys

import pytest

from heads_common.tolerances import PARITY_FLOAT32

HERE = os.path.join(os.path.dirname(__file__), "multidevice")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, env, results):
    """Run a multidevice script; returns the process and the checks it recorded (its JSON report)."""
    env = dict(env, RESULTS_JSON=str(results))
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, script)], capture_output=True, text=True, timeout=600, env=env
    )
    checks = json.loads(results.read_text()) if results.exists() else []
    return proc, checks


@pytest.fixture(scope="module")
def sharded_env(tmp_path_factory):
    path = tmp_path_factory.mktemp("parallel") / "torch_sharded.npz"
    # The scripts import the packages of this checkout (their own directory comes first on sys.path, not the
    # repository root).
    python_path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, SHARDED_PARITY_FILE=str(path), JAX_PLATFORMS="cpu", PYTHONPATH=python_path)


@pytest.fixture(scope="module")
def torch_result(sharded_env, tmp_path_factory):
    return _run("torch_vocab_parallel.py", sharded_env, tmp_path_factory.mktemp("torch") / "checks.json")


TORCH_CASES = {"vocab-parallel none", "vocab-parallel sum", "vocab-parallel mean", "vocab-parallel loss options",
               "DDP split head", "DTensor weight", "sharded split head", "sharded split head biases",
               "pallas interpret per shard", "errors"}


def test_torch_vocab_parallel_ddp_and_dtensor_on_gloo(torch_result):
    proc, checks = torch_result
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [c for c in checks if not c["ok"]] == []
    ran = {(c["world"], c["rank"], c["name"]) for c in checks}
    expected = {(w, r, name) for w in (2, 3) for r in range(w) for name in TORCH_CASES}
    assert ran == expected | {(2, r, "save") for r in range(2)}, sorted(ran ^ expected)


def test_jax_vocab_parallel_and_torch_sharded_parity(torch_result, sharded_env, tmp_path):
    assert torch_result[0].returncode == 0, torch_result[0].stdout + torch_result[0].stderr
    proc, checks = _run("jax_vocab_parallel.py", sharded_env, tmp_path / "checks.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [c for c in checks if not c["ok"]] == []
    names = {c["name"] for c in checks}
    assert len(checks) == 24 and len(names) == 24, sorted(names)
    assert "torch-sharded (2 ranks) vs JAX-sharded (4 devices)" in names


def test_gpu_benchmark_script_runs_on_cpu(tmp_path):
    """``benchmarks/vocab_parallel_gpu.py --cpu-smoke``: the GPU script's logic on tiny shapes.

    It runs on gloo and 2 CPU JAX devices.
    """
    root = os.path.dirname(os.path.dirname(HERE))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.vocab_parallel_gpu", "--cpu-smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=root,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "vocab_parallel.json").read_text())
    assert not report["errors"] and report["cross"]["ok"], report
    # pallas and chunked on 2 ranks for 3 problems (parity, parity with a bias and the options, main);
    # 1-device pallas and chunked; JAX: 2 parity rows + 2 main rows
    assert (len(report["torch_sharded"]), len(report["torch_single"]), len(report["jax"])) == (12, 2, 4)
    assert len(report["verdicts"]) == 11 and all(line.startswith("ok") for line in report["verdicts"])
    options = [r for r in report["torch_sharded"] + report["jax"] if r["problem"] == "parity-options"]
    assert len(options) == 5 and all(r["err_db"] <= PARITY_FLOAT32 for r in options), options
    assert (tmp_path / "vocab_parallel.md").read_text().startswith("# Vocabulary-parallel")
