"""The parity harness and its command line."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from ground_truth import lce_options_ground_truth

import interop.parity as parity
import jax_heads
import torch_heads
from heads_common.tolerances import assert_close
from interop.parity import ParityConfig, run_parity
from interop.parity.cli import main
from interop.parity.runs import output_names

SMALL = dict(batch=2, seq=13, hidden_size=24, splits=(("text", 301), ("special", 2)))
GROUPS = ("no options", "all options on")
ALL_NAMES = frozenset({"bias", "softcap", "label_smoothing", "lse_square_scale"})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_parity_passes_on_cpu(dtype):
    report = run_parity(ParityConfig(**SMALL, dtype=dtype, seed=3))
    assert report.passed, report.table()
    weights = {"loss", "d_hidden", "d_lm_head.text.weight", "d_lm_head.special.weight"}
    outputs = {group: {c.output for c in report.checks if c.group == group} for group in GROUPS}
    biases = {"d_lm_head.text.bias", "d_lm_head.special.bias"}
    assert outputs == {"no options": weights, "all options on": weights | biases}
    pairs = {(c.group, c.left, c.right) for c in report.checks}
    assert ("no options", "torch:chunked", "jax:chunked") in pairs
    assert ("no options", "jax:reference", "float64 truth") in pairs
    judged = [c for c in report.checks if c.passed is not None]
    assert judged and all(c.rel <= c.bound for c in judged)


def test_all_options_group_runs_the_implementations_the_registry_says_support_them():
    """The extra group: every default CPU implementation whose registry record supports all the options
    (today the references; the set grows with the registry), against the truth and across frameworks."""
    report = run_parity(ParityConfig(**SMALL, seed=5))
    supporting = {
        framework: [impl for impl in ("chunked", "reference") if ALL_NAMES <= package.functional.REGISTRY[impl].options]
        for framework, package in (("torch", torch_heads), ("jax", jax_heads))
    }
    assert "reference" in supporting["torch"] and "reference" in supporting["jax"]
    group = [c for c in report.checks if c.group == "all options on"]
    assert {c.left for c in group if c.right == "float64 truth"} == {
        f"{fw}:{impl}" for fw, impls in supporting.items() for impl in impls
    }
    crossed = {(c.left, c.right) for c in group if c.right != "float64 truth"}
    assert crossed == {(f"torch:{t}", f"jax:{j}") for t in supporting["torch"] for j in supporting["jax"]}
    assert all(c.passed for c in group), report.table()
    assert ParityConfig().all_options and not any(
        c.group == "all options on" for c in run_parity(ParityConfig(**SMALL, all_options=False)).checks
    )


def test_the_options_truth_is_the_hand_written_float64_truth():
    """The harness's truth (the torch reference in float64) equals ``ground_truth.lce_options_ground_truth``
    (written out in NumPy) with all the options on, shift included."""
    from interop.parity.runs import ALL_OPTIONS, copy_head, ground_truth

    setup, k = ALL_OPTIONS, ALL_OPTIONS.shift
    torch.manual_seed(0)
    head = torch_heads.SplitLanguageModellingHead({"text": 301, "special": 2}, ["text", "special"], 24,
                                                  **setup.head_options)
    rng = np.random.default_rng(0)
    hidden = torch.from_numpy(rng.standard_normal((2, 13, 24)) * 20).float()  # logits of tens: the softcap bites
    labels = torch.from_numpy(rng.integers(0, 303, (2, 13)))
    labels[0, 3] = labels[1, 7] = -100
    upstream = torch.from_numpy(rng.standard_normal((2, 13 - k))).float()
    got = ground_truth(head, hidden, labels, upstream, setup)

    shifted = np.concatenate([labels.numpy()[:, k:], np.full((2, k), -100)], axis=1)
    padded = np.concatenate([upstream.numpy(), np.zeros((2, k))], axis=1)
    f64 = copy_head(head, torch.float64, "cpu", setup)
    loss, _, d_hidden, d_weight, d_bias = lce_options_ground_truth(
        hidden.double().reshape(-1, 24).numpy(), f64.weight().detach().numpy(), shifted.reshape(-1),
        padded.reshape(-1), bias=f64.bias().detach().numpy(), softcap=setup.softcap,
        label_smoothing=setup.label_smoothing, lse_square_scale=setup.lse_square_scale,
    )
    want = [loss.reshape(2, 13)[:, : 13 - k], d_hidden.reshape(2, 13, 24), d_weight[:301], d_weight[301:],
            d_bias[:301], d_bias[301:]]
    for name, g, w in zip(output_names(["text", "special"], True), got, want, strict=True):
        assert_close(name, g, w, "float64")


def test_options_of_the_first_group_run_on_the_implementations_that_support_them():
    config = ParityConfig(**SMALL, softcap=3.0, label_smoothing=0.2, lse_square_scale=1e-3, bias=True, shift=2,
                          all_options=False)
    report = run_parity(config)
    assert report.passed, report.table()
    label = "softcap=3, label_smoothing=0.2, lse_square_scale=0.001, bias, shift=2"
    assert {c.group for c in report.checks} == {label}
    sides = {c.left for c in report.checks if c.right == "float64 truth"}
    for framework, package in (("torch", torch_heads), ("jax", jax_heads)):
        options = package.functional.REGISTRY
        expected = {f"{framework}:{impl}" for impl in ("chunked", "reference") if ALL_NAMES <= options[impl].options}
        assert {s for s in sides if s.startswith(framework)} == expected
    # Named, an implementation that lacks an option is refused by name (none of them, once all support them).
    for impl in ("chunked", "reference"):
        missing = sorted(ALL_NAMES - torch_heads.functional.REGISTRY[impl].options)
        if missing:
            with pytest.raises(ValueError, match=f"torch implementation '{impl}' does not support {missing[0]}"):
                run_parity(dataclasses.replace(config, torch_impls=(impl,)))


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
    failed = {(c.group, c.left, c.right, c.output) for c in report.checks if c.passed is False}
    assert ("no options", "jax:chunked", "float64 truth", "d_lm_head.special.weight") in failed
    assert ("all options on", "jax:reference", "float64 truth", "d_lm_head.special.weight") in failed
    torch_failures = [c for c in report.checks if c.passed is False and c.left.startswith("torch")]
    assert not any(c.right == "float64 truth" for c in torch_failures)


def test_parity_catches_a_wrong_bias(monkeypatch):
    real_port = parity.port_torch_to_flax

    def bad_port(torch_head, flax_head):
        real_port(torch_head, flax_head)
        if flax_head.has_bias:
            bias = flax_head.lm_head["text"].bias
            bias[...] = bias[...].at[7].add(0.05)

    monkeypatch.setattr(parity, "port_torch_to_flax", bad_port)
    report = run_parity(ParityConfig(**SMALL, seed=2))
    failed = {(c.group, c.left, c.right, c.output) for c in report.checks if c.passed is False}
    assert ("all options on", "jax:reference", "float64 truth", "d_lm_head.text.bias") in failed
    assert ("all options on", "torch:reference", "jax:reference", "loss") in failed
    assert not any(c.group == "no options" or c.left.startswith("torch") and c.right == "float64 truth"
                   for c in report.checks if c.passed is False)


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
    "softcap-zero": (["--softcap", "0"], "argument --softcap: softcap must be > 0 (or None), got 0.0"),
    "softcap-negative": (["--softcap", "-30"], "argument --softcap: softcap must be > 0 (or None), got -30.0"),
    "softcap-inf": (["--softcap", "inf"], "argument --softcap: softcap must be finite, got inf"),
    "softcap-not-number": (["--softcap", "big"], "argument --softcap: expected a number, got 'big'"),
    "label-smoothing-1": (["--label-smoothing", "1"], "argument --label-smoothing: label_smoothing must be in [0, 1)"),
    "label-smoothing-nan": (["--label-smoothing", "nan"],
                            "argument --label-smoothing: label_smoothing must be finite"),
    "lse-square-scale-negative": (["--lse-square-scale", "-0.5"],
                                  "argument --lse-square-scale: lse_square_scale must be >= 0, got -0.5"),
    "lse-square-scale-negative-exponent": (["--lse-square-scale=-1e-4"],
                                           "argument --lse-square-scale: lse_square_scale must be >= 0, got -0.0001"),
    "shift-negative": (["--shift", "-1"], "argument --shift: must be an integer >= 0, got -1"),
    "shift-not-int": (["--shift", "1.5"], "argument --shift: expected an integer, got '1.5'"),
    "shift-past-seq": (["--seq", "9", "--shift", "9"], "argument --shift: must be smaller than --seq (9), got 9"),
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
        ("softcap", 0.0, ValueError, r"softcap must be > 0 \(or None\), got 0.0"),
        ("label_smoothing", 1.0, ValueError, r"label_smoothing must be in \[0, 1\)"),
        ("lse_square_scale", -1.0, ValueError, "lse_square_scale must be >= 0"),
        ("bias", 1, TypeError, "bias must be a bool"),
        ("shift", 13, ValueError, r"shift=13 must be smaller than the labels' last dimension \(sequence length 13\)"),
    ],
)
def test_run_parity_checks_its_numbers_first(field, value, error, match):
    with pytest.raises(error, match=match):
        run_parity(ParityConfig(**{**SMALL, field: value}))
