"""Interop between the PyTorch and Flax head families.

- :func:`to_jax` / :func:`to_torch`: DLPack conversion, zero-copy where it can be, never silently wrong.
- :func:`port_torch_to_flax` / :func:`port_flax_to_torch`: weights between matching heads.
- :func:`run_parity` (and ``python -m interop.parity``): the cross-framework parity check.

Importing this package imports nothing else: each name is loaded from its submodule on first use.
``interop.dlpack`` (what ``torch_heads``' ``impl="pallas"`` needs at run time) imports torch and
JAX only; ``interop.porting`` and ``interop.parity`` also import Flax and both head packages.
"""

import importlib

# public name -> the submodule that defines it
_EXPORTS = {
    "to_jax": "interop.dlpack",
    "to_torch": "interop.dlpack",
    "port_flax_to_torch": "interop.porting",
    "port_torch_to_flax": "interop.porting",
    "ParityConfig": "interop.parity",
    "ParityReport": "interop.parity",
    "run_parity": "interop.parity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'interop' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
