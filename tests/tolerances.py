"""The tests' view of the one tolerance table, which lives in ``heads_common.tolerances``
(the parity harness judges by it too)."""

from heads_common.tolerances import PARITY_FLOAT32, TOLERANCES, Tolerance, assert_close, rel_err, worst_place

__all__ = ["PARITY_FLOAT32", "TOLERANCES", "Tolerance", "assert_close", "rel_err", "worst_place"]
