"""Linear cross-entropy on the GPU with our own Pallas kernels.

The package, read in this order: ``config.py`` (tiles and launch options, one dataclass per
kernel), ``plan.py`` (padding and grid geometry), the kernels (``triton_forward.py``,
``mosaic_pipeline.py`` with ``mosaic_forward.py`` and ``mosaic_backward.py``, ``backward.py``,
``filtered.py``) and ``op.py`` (forward-kernel choice, the narrow entry and the differentiable loss).

Callers use the narrow entry, :func:`lse_and_target` and :func:`grads` (any ``N``, ``V``, ``D``;
padding and slicing are theirs), or the per-token loss :func:`pallas_loss`.
"""

from jax_heads.pallas.config import (
    DEFAULT_BLOCK_SIZES,
    BackwardConfig,
    BlockSizes,
    FilterConfig,
    MosaicForwardConfig,
    TritonForwardConfig,
)
from jax_heads.pallas.op import grads, loss_coefficients, lse_and_target, pallas_loss, unsupported_reason

__all__ = [
    "DEFAULT_BLOCK_SIZES",
    "BackwardConfig",
    "BlockSizes",
    "FilterConfig",
    "MosaicForwardConfig",
    "TritonForwardConfig",
    "grads",
    "loss_coefficients",
    "lse_and_target",
    "pallas_loss",
    "unsupported_reason",
]
