"""Elementwise epilogue math shared by the Pallas kernel bodies (Triton and Mosaic GPU lowerings).

Soft-capping ``z' = c·tanh(z / c)`` is computed with one ``exp2`` per logit and no overflow:
``e = 2^(−2|z|·log2(e) / c)`` lies in ``(0, 1]``, so ``tanh(z / c) = sign(z)·(1 − e) / (1 + e)``
has a denominator in ``(1, 2]``; the capped logit is ``c·t`` and its derivative ``1 − t²`` comes from
the same ``t``. The constants are folded at trace time (``c`` is static). Softmax exponentials use
``exp2`` with ``log2(e)`` folded into one multiply-add.
"""

from __future__ import annotations

import jax.numpy as jnp

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def capped_tanh(z, cap: float):
    """``tanh(z / cap)`` elementwise (float32), from one ``exp2``; ``cap`` a static float > 0."""
    e = jnp.exp2(jnp.abs(z) * (-2.0 * LOG2E / cap))
    r = (1.0 - e) / (1.0 + e)
    return jnp.where(z < 0, -r, r)


def softcap_and_derivative(z, cap: float):
    """``(cap·tanh(z / cap), 1 − tanh²(z / cap))`` elementwise (float32) from one ``exp2`` and one division.

    The derivative is formed as ``4e/(1 + e)²`` (the same ``e`` as :func:`capped_tanh`), which keeps its
    relative accuracy where ``|z| ≫ cap`` (``1 − t²`` would cancel to 0 there).
    """
    e = jnp.exp2(jnp.abs(z) * (-2.0 * LOG2E / cap))
    q = 1.0 / (1.0 + e)
    r = cap * (1.0 - e) * q
    return jnp.where(z < 0, -r, r), 4.0 * e * q * q
