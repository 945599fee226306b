"""Linear cross-entropy on the GPU with our own Pallas kernels.

The package, read in this order: ``config.py`` (tiles and launch options, one dataclass per
kernel), ``plan.py`` (padding and grid geometry), the kernels (``triton_forward.py``,
``mosaic_pipeline.py`` with ``mosaic_forward.py`` and ``mosaic_backward.py``, ``backward.py``,
``filtered.py``), ``op.py`` (forward-kernel choice, the narrow entry and the differentiable loss) and
``gradient_in_forward.py`` (reductions ``"sum"``/``"mean"`` with the gradients formed in the forward).

Callers use the narrow entry, :func:`lse_and_target` and :func:`grads` (any ``N``, ``V``, ``D``;
padding and slicing are theirs), the per-token loss :func:`pallas_loss`, or the reduced loss
:func:`gradient_in_forward_loss` (and :func:`gradient_in_forward_grads`, loss and gradients at once).
"""

from jax_heads.pallas.config import (
    DEFAULT_BLOCK_SIZES,
    BackwardConfig,
    BlockSizes,
    FilterConfig,
    GradientInForwardConfig,
    MosaicForwardConfig,
    TritonForwardConfig,
)
from jax_heads.pallas.gradient_in_forward import (
    gradient_in_forward_grads,
    gradient_in_forward_loss,
    uses_gradient_in_forward,
)
from jax_heads.pallas.op import grads, loss_coefficients, lse_and_target, pallas_loss, unsupported_reason

__all__ = [
    "DEFAULT_BLOCK_SIZES",
    "BackwardConfig",
    "BlockSizes",
    "FilterConfig",
    "GradientInForwardConfig",
    "MosaicForwardConfig",
    "TritonForwardConfig",
    "gradient_in_forward_grads",
    "gradient_in_forward_loss",
    "grads",
    "loss_coefficients",
    "lse_and_target",
    "pallas_loss",
    "unsupported_reason",
    "uses_gradient_in_forward",
]
