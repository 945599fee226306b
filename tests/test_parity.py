"""The parity harness and its command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

import interop.parity as parity
from interop.parity import ParityConfig, run_parity
from interop.parity.cli import main

SMALL = dict(batch=2, seq=13, hidden_size=24, splits=(("text", 301), ("special", 2)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_parity_passes_on_cpu(dtype):
    report = run_parity(ParityConfig(**SMALL, dtype=dtype, seed=3))
    assert report.passed, report.table()
    outputs = {c.output for c in report.checks}
    assert outputs == {"loss", "d_hidden", "d_lm_head.text.weight", "d_lm_head.special.weight"}
    pairs = {(c.left, c.right) for c in report.checks}
    assert ("torch:chunked", "jax:chunked") in pairs and ("jax:reference", "float64 truth") in pairs
    judged = [c for c in report.checks if c.passed is not None]
    assert judged and all(c.rel <= c.bound for c in judged)


def test_parity_catches_a_wrong_weight(monkeypatch):
    """A harness that cannot fail is a defect: perturb one ported weight and expect FAIL."""
    real_port = parity.port_torch_to_flax

    def bad_port(torch_head, flax_head):
        real_port(torch_head, flax_head)
        kernel = flax_head.lm_head["special"].kernel
        kernel[...] = kernel[...] * 1.01

    monkeypatch.setattr(parity, "port_torch_to_flax", bad_port)
    report = run_parity(ParityConfig(**SMALL, seed=1))
    assert not report.passed
    failed = {(c.left, c.right, c.output) for c in report.checks if c.passed is False}
    assert ("jax:chunked", "float64 truth", "d_lm_head.special.weight") in failed
    assert not any(c.left.startswith("torch") and c.right == "float64 truth" for c in report.checks if c.passed is False)


def test_parity_rejects_unknown_implementations():
    with pytest.raises(ValueError, match="unknown torch implementation 'fast'"):
        run_parity(ParityConfig(**SMALL, torch_impls=("fast",)))
    with pytest.raises(ValueError, match="dtype must be one of"):
        run_parity(ParityConfig(**SMALL, dtype="int8"))


def test_cli_prints_table_and_exits_zero(capsys):
    code = main(["--batch", "1", "--seq", "9", "--hidden-size", "16", "--splits", "a=50,b=3", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "verdict" in out and "torch:chunked" in out and "d_lm_head.b.weight" in out
    assert out.rstrip().splitlines()[-1].startswith("PASS")


def test_cli_bad_arguments():
    assert main(["--torch-impls", "nope", "--quiet"]) == 2
    with pytest.raises(SystemExit):
        main(["--splits", "text"])


def test_module_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "interop.parity", "--seq", "5", "--hidden-size", "8", "--splits", "t=40"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "PASS" in result.stdout and "float64 ground truth" in result.stderr
