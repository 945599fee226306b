"""The one tolerance table of the project (tests and the parity harness), and the checks that use it.

Errors are relative in norm, ``||impl - truth|| / ||truth||``, in float64, against a ground truth
computed from the *same* input values in float64 (the reference on upcast inputs).

* float32 inputs: a fixed bound, tight (float32 accumulation lands near 1e-7..1e-6 here).
* float16/bfloat16 inputs: baseline-relative (DESIGN §4):
  ``err(impl) <= err(naive) + slack``, where ``naive`` is the materialised-logits computation in
  the input dtype. It neither passes vacuously (a wrong row moves the error by percents) nor asks
  more than the dtype can give (gradients are rounded to the input dtype).
* ``float32-tf32``: float32 inputs on a GPU whose matrix units round operands to tf32 (Triton's
  default for a float32 dot, used by cut-cross-entropy).
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
    # Slack: one unit in the last place of the dtype at 1.0 (2**-8 for bf16, 2**-11 for fp16).
    # Kernels that feed the tensor cores round the gradient logits to the input dtype, as the
    # naive path does, but in another order; at tiny shapes a single element's rounding moves
    # the relative error by up to about one ulp. A real bug (a wrong or unmasked row) moves it
    # by percents.
    "bfloat16": Tolerance(2**-8, baseline_relative=True),
    "float16": Tolerance(2**-11, baseline_relative=True),
}

# Cross-framework parity on the same float32 inputs: both sides accumulate in float32.
PARITY_FLOAT32 = 1e-5


def rel_err(value, truth) -> float:
    """``||value - truth|| / ||truth||`` in float64 (``||value||`` when the truth is all zeros). NaN never passes."""
    value = np.asarray(value, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if value.shape != truth.shape:
        raise AssertionError(f"shape {value.shape} != truth shape {truth.shape}")
    if not np.all(np.isfinite(value)):
        return float("inf")
    diff = np.linalg.norm((value - truth).ravel())
    scale = np.linalg.norm(truth.ravel())
    return float(diff / scale) if scale > 0 else float(diff)


def worst_place(value, truth) -> str:
    value = np.asarray(value, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if value.size == 0:
        return "empty"
    idx = np.unravel_index(np.argmax(np.abs(value - truth)), value.shape)
    return f"largest |diff| at {tuple(int(i) for i in idx)}: {value[idx]!r} vs {truth[idx]!r}"


def assert_close(name: str, value, truth, dtype: str, naive=None) -> float:
    """Assert ``value`` is within the table's bound of ``truth`` for inputs of ``dtype``; return the error."""
    tol = TOLERANCES[dtype]
    err = rel_err(value, truth)
    if tol.baseline_relative:
        if naive is None:
            raise ValueError(f"{dtype} comparisons are baseline-relative: pass the naive same-dtype result")
        bound = rel_err(naive, truth) + tol.bound
    else:
        bound = tol.bound
    if not err <= bound:
        raise AssertionError(f"{name}: relative error {err:.3e} > bound {bound:.3e} ({dtype}); {worst_place(value, truth)}")
    return err
