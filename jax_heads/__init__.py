"""Flax NNX model heads with fused linear cross-entropy (mirror of ``torch_heads``).

Importing this package never imports torch.
"""

from heads_common import LM_IGNORE_INDEX
from jax_heads.checked import check_inputs, invalid_tokens
from jax_heads.functional import IMPLEMENTATIONS, linear_cross_entropy, select_implementation
from jax_heads.heads import ClassificationHead, EmbeddingHead, SplitLanguageModellingHead, SplitTokenEmbeddings

__all__ = [
    "IMPLEMENTATIONS",
    "LM_IGNORE_INDEX",
    "ClassificationHead",
    "EmbeddingHead",
    "SplitLanguageModellingHead",
    "SplitTokenEmbeddings",
    "check_inputs",
    "invalid_tokens",
    "linear_cross_entropy",
    "select_implementation",
]
