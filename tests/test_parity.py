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


BAD_NUMBERS = {
    "batch-negative": (["--batch", "-1"], "argument --batch: must be an integer >= 1, got -1"),
    "batch-zero": (["--batch", "0"], "argument --batch: must be an integer >= 1, got 0"),
    "batch-not-int": (["--batch", "2.5"], "argument --batch: expected an integer, got '2.5'"),
    "seq-negative": (["--seq", "-3"], "argument --seq: must be an integer >= 1, got -3"),
    "hidden-size-zero": (["--hidden-size", "0"], "argument --hidden-size: must be an integer >= 1, got 0"),
    "seed-negative": (["--seed", "-1"], "argument --seed: must be an integer in [0, 9223372036854775807], got -1"),
    "seed-too-big": (["--seed", str(2**64)], "argument --seed: must be an integer in [0, 9223372036854775807]"),
    "ignore-fraction-above-1": (["--ignore-fraction", "1.5"], "argument --ignore-fraction: must be in [0, 1], got 1.5"),
    "ignore-fraction-negative": (["--ignore-fraction", "-0.1"], "argument --ignore-fraction: must be in [0, 1]"),
    "ignore-fraction-nan": (["--ignore-fraction", "nan"], "argument --ignore-fraction: must be in [0, 1], got nan"),
    "split-size-zero": (["--splits", "a=0"], "argument --splits: split_vocab_size['a'] must be positive, got 0"),
    "split-size-negative": (["--splits", "a=3,b=-2"], "argument --splits: split_vocab_size['b'] must be positive"),
    "split-name": (["--splits", "a.b=3"], "argument --splits: split name 'a.b' cannot be used"),
}


@pytest.mark.parametrize("argv, message", BAD_NUMBERS.values(), ids=BAD_NUMBERS.keys())
def test_cli_out_of_range_numbers_are_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.rstrip().splitlines()[-1].startswith(f"python -m interop.parity: error: {message}")


def test_module_entry_point_out_of_range_batch_exits_2_without_a_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "interop.parity", "--batch", "-1"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert result.stderr.rstrip().splitlines()[-1] == (
        "python -m interop.parity: error: argument --batch: must be an integer >= 1, got -1"
    )
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize(
    "field, value, error, match",
    [
        ("batch", -1, ValueError, "batch must be positive, got -1"),
        ("seq", 0, ValueError, "seq must be positive, got 0"),
        ("hidden_size", 2.0, TypeError, "hidden_size must be an int"),
        ("seed", -1, ValueError, r"seed must be an int in \[0, 2\*\*63 - 1\], got -1"),
        ("ignore_fraction", 1.5, ValueError, r"ignore_fraction must be a number in \[0, 1\], got 1.5"),
    ],
)
def test_run_parity_checks_its_numbers_first(field, value, error, match):
    with pytest.raises(error, match=match):
        run_parity(ParityConfig(**{**SMALL, field: value}))
