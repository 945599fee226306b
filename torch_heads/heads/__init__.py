"""The d9d heads for PyTorch: same class names, constructor arguments and ``state_dict`` keys.

One module per kind of head: :mod:`~torch_heads.heads.pooled` (``ClassificationHead``,
``EmbeddingHead`` and their ``pool``), :mod:`~torch_heads.heads.lm` (``SplitLanguageModellingHead``)
and :mod:`~torch_heads.heads.embeddings` (``SplitTokenEmbeddings``).
"""

from torch_heads.heads.embeddings import SplitTokenEmbeddings
from torch_heads.heads.lm import SplitLanguageModellingHead
from torch_heads.heads.pooled import ClassificationHead, EmbeddingHead, pool

__all__ = ["ClassificationHead", "EmbeddingHead", "SplitLanguageModellingHead", "SplitTokenEmbeddings", "pool"]
