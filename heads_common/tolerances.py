"""The one tolerance table of the project (tests and the parity harness), and the checks that use it.

Errors are relative in norm, ``||impl - truth|| / ||truth||``, in float64, against a ground truth
computed from the *same* input values in float64 (the reference on upcast inputs).

* float32 inputs: a fixed bound, tight (float32 accumulation lands near 1e-7..1e-6 here).
* float16/bfloat16 inputs: baseline-relative:
  ``err(impl) <= err(naive) + slack``, where ``naive`` is the materialised-logits computation in
  the input dtype. It neither passes vacuously (a wrong row moves the error by percents) nor asks
  more than the dtype can give (gradients are rounded to the input dtype).
* ``float32-tf32``: float32 inputs on a GPU whose matrix units round operands to tf32 (Triton's
  default for a float32 dot, used by cut-cross-entropy).

``scale``: a relative error needs a well-conditioned result. A near-certain token's loss is the
small difference of two large logit-scale numbers (``lse - target``), so its float32 rounding is
tiny in absolute terms yet large relative to the loss. Randomly drawn problems (the property
tests) produce such cases; there the error is taken relative to the magnitude of the terms
(``tests/ground_truth.py::lce_condition_scales``), the textbook forward-error bound of a sum,
instead of relative to the result. Fixed-case tests keep the stricter default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    bound: float  # fixed bound on the relative error, or the slack added to the naive error
    baseline_relative: bool = False


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(1e-10),
    "float32": Tolerance(1e-5),
    "float32-tf32": Tolerance(2e-3),
    # float32 inputs at extreme magnitudes (|logits| ~ 1e4), gradients only: the fused
    # implementations save a float32 log-sum-exp, rounded by |lse|·2⁻²⁴ (6e-4 at 1e4), which scales
    # every softmax probability of its row by as much; materialised logits subtract the row max
    # first. Judged relative to materialised float32 logits (naive), with twice the float32 bound.
    "float32-extreme": Tolerance(2e-5, baseline_relative=True),
    # Slack: one unit in the last place of the dtype at 1.0 (2**-8 for bf16, 2**-11 for fp16).
    # Kernels that feed the tensor cores round the gradient logits to the input dtype, as the
    # naive path does, but in another order; at tiny shapes a single element's rounding moves
    # the relative error by up to about one ulp. A real bug (a wrong or unmasked row) moves it
    # by percents.
    "bfloat16": Tolerance(2**-8, baseline_relative=True),
    "float16": Tolerance(2**-11, baseline_relative=True),
    # cut-cross-entropy 25.1.1's d_hidden at large vocabularies (its backward adds each
    # vocabulary tile's share into d_hidden in bfloat16, so the rounding grows with V / 256 tiles):
    # above the naive bfloat16 baseline (measured figures: docs/robustness.md, GPU section). Used only to check
    # the peer for index overflow at shapes beyond 2**31 elements, where a wrapped offset puts gradients on
    # wrong rows (relative error ~1).
    "bfloat16-cce-large-d_hidden": Tolerance(0.1),
    # cut-cross-entropy 25.1.1's soft-capped loss in float16 rounds more than the naive float16
    # computation (figures: docs/robustness.md, GPU section); a peer's own numerics, so a wider slack
    # over the same baseline. A wrong cap (or none) moves the loss by far more.
    "float16-cce-softcap": Tolerance(2**-9, baseline_relative=True),
}

# Cross-framework parity on the same float32 inputs: both sides accumulate in float32.
PARITY_FLOAT32 = 1e-5


def rel_err(value, truth, scale=None) -> float:
    """``||value - truth|| / ||scale||`` in float64; ``scale`` defaults to the truth (``||value - truth||``
    alone when it is all zeros). NaN never passes."""
    value = np.asarray(value, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if value.shape != truth.shape:
        raise AssertionError(f"shape {value.shape} != truth shape {truth.shape}")
    if not np.all(np.isfinite(value)):
        return float("inf")
    diff = np.linalg.norm((value - truth).ravel())
    norm = np.linalg.norm(np.asarray(truth if scale is None else scale, dtype=np.float64).ravel())
    return float(diff / norm) if norm > 0 else float(diff)


def worst_place(value, truth) -> str:
    value = np.asarray(value, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if value.size == 0:
        return "empty"
    idx = np.unravel_index(np.argmax(np.abs(value - truth)), value.shape)
    return f"largest |diff| at {tuple(int(i) for i in idx)}: {value[idx]!r} vs {truth[idx]!r}"


def assert_close(name: str, value, truth, dtype: str, naive=None, scale=None) -> float:
    """Assert ``value`` is within the table's bound of ``truth`` for inputs of ``dtype``; return the error.

    ``scale``: the magnitude errors are relative to (default: the truth); see the module docstring.
    """
    tol = TOLERANCES[dtype]
    err = rel_err(value, truth, scale)
    if tol.baseline_relative:
        if naive is None:
            raise ValueError(f"{dtype} comparisons are baseline-relative: pass the naive same-dtype result")
        bound = rel_err(naive, truth, scale) + tol.bound
    else:
        bound = tol.bound
    if not err <= bound:
        raise AssertionError(
            f"{name}: relative error {err:.3e} > bound {bound:.3e} ({dtype}); {worst_place(value, truth)}"
        )
    return err
