"""The d9d heads for Flax NNX: same class names and constructor arguments as ``torch_heads``.

Parameters are created eagerly from ``rngs`` with the distributions torch uses (linear kernels
and biases uniform in ``±1/sqrt(in_features)``, embeddings standard normal), so both families start
from the same distribution. ``interop.porting`` moves weights between the two; it relies on the
layout documented on each class (an ``nnx.Linear`` kernel is ``(in, out)``, the transpose of
torch's ``(out, in)`` weight).

NNX conventions kept here: keyword-only ``rngs``; ``param_dtype`` where torch would use
``module.to(dtype)``; ``deterministic`` on the dropout, overridable per call, and
``module.train()`` / ``module.eval()``; ``reset_parameters()`` draws from a stream the module
keeps, so every call gives new weights.

One module per kind of head: :mod:`~jax_heads.heads.pooled` (``ClassificationHead``,
``EmbeddingHead`` and their ``pool``), :mod:`~jax_heads.heads.lm` (``SplitLanguageModellingHead``)
and :mod:`~jax_heads.heads.embeddings` (``SplitTokenEmbeddings``).
"""

from jax_heads.heads.embeddings import SplitTokenEmbeddings
from jax_heads.heads.lm import SplitLanguageModellingHead
from jax_heads.heads.pooled import ClassificationHead, EmbeddingHead, pool

__all__ = ["ClassificationHead", "EmbeddingHead", "SplitLanguageModellingHead", "SplitTokenEmbeddings", "pool"]
