"""Elementwise epilogue math shared by the Pallas kernel bodies (Triton and Mosaic GPU lowerings).

Soft-capping ``z' = c·tanh(z / c)`` costs one ``exp2``, one reciprocal and one multiply-add per logit:
with ``q = 1 / (1 + 2^(2z·log2(e) / c))`` (the logistic function of ``−2z/c``, in ``[0, 1]``),
``tanh(z / c) = 1 − 2q``, so ``z' = c − 2c·q``, and its derivative is ``1 − tanh² = 4q(1 − q)``. No
absolute value, sign select or overflow: for ``z ≫ c`` the power is ``inf`` and ``q = 0`` (``z' = c``),
for ``z ≪ −c`` it is 0 and ``q = 1`` (``z' = −c``). The absolute error of ``z'`` is a few units of
``c·2⁻²⁴``, which is what the softmax sees (it depends on differences of logits). The constants are
folded at trace time (``c`` is static). Softmax exponentials use ``exp2`` of ``(z − m)·log2(e)``.
"""

from __future__ import annotations

import jax.numpy as jnp

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _logistic(z, cap: float):
    """``q = 1 / (1 + exp(2z / cap))`` elementwise (float32)."""
    return 1.0 / (1.0 + jnp.exp2(z * (2.0 * LOG2E / cap)))


def softcapped(z, cap: float):
    """``cap·tanh(z / cap)`` elementwise (float32); ``cap`` a static float > 0."""
    return cap - (2.0 * cap) * _logistic(z, cap)


def softcap_and_derivative(z, cap: float):
    """``(cap·tanh(z / cap), 1 − tanh²(z / cap))`` elementwise (float32), from one ``exp2`` and one reciprocal."""
    q = _logistic(z, cap)
    return cap - (2.0 * cap) * q, 4.0 * (q - q * q)
