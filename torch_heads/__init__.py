"""PyTorch model heads with fused linear cross-entropy (d9d-compatible API and checkpoints).

Importing this package never imports JAX.
"""

from heads_common import LM_IGNORE_INDEX
from torch_heads.functional import IMPLEMENTATIONS, linear_cross_entropy, select_implementation
from torch_heads.heads import ClassificationHead, EmbeddingHead, SplitLanguageModellingHead, SplitTokenEmbeddings

__all__ = [
    "LM_IGNORE_INDEX",
    "IMPLEMENTATIONS",
    "ClassificationHead",
    "EmbeddingHead",
    "SplitLanguageModellingHead",
    "SplitTokenEmbeddings",
    "linear_cross_entropy",
    "select_implementation",
]
