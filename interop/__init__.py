"""Interop between the PyTorch and Flax head families.

- :func:`to_jax` / :func:`to_torch`: DLPack conversion, zero-copy where it can be, never silently wrong.
- :func:`port_torch_to_flax` / :func:`port_flax_to_torch`: weights between matching heads.
- :func:`run_parity` (and ``python -m interop.parity``): the cross-framework parity check.

Imports both torch and JAX.
"""

from interop.dlpack import to_jax, to_torch
from interop.parity import ParityConfig, ParityReport, run_parity
from interop.porting import port_flax_to_torch, port_torch_to_flax

__all__ = [
    "ParityConfig",
    "ParityReport",
    "port_flax_to_torch",
    "port_torch_to_flax",
    "run_parity",
    "to_jax",
    "to_torch",
]
