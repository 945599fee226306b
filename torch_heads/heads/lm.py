"""The d9d heads for PyTorch: same class names, constructor arguments and ``state_dict`` keys."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from heads_common import (
    LM_IGNORE_INDEX,
    check_dropout,
    check_filter_eps,
    check_hidden_size,
    check_impl_name,
    check_mask_shape,
    check_split_config,
    token_id_range_message,
)
from torch_heads.functional import IMPLEMENTATIONS, linear_cross_entropy, select_implementation
from torch_heads.parallel import (
    check_parallel_impl,
    select_parallel_implementation,
    shard_range,
    vocab_parallel_linear_cross_entropy,
)


def _check_hidden(hidden_states: object, hidden_size: int) -> torch.Tensor:
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be a floating tensor, got {hidden_states.dtype}")
    if hidden_states.ndim < 1 or hidden_states.shape[-1] != hidden_size:
        raise ValueError(
            f"hidden size mismatch: expected hidden_states (..., {hidden_size}), got shape {tuple(hidden_states.shape)}"
        )
    return hidden_states


def pool(hidden_states: torch.Tensor, pooling_mask: torch.Tensor | None) -> torch.Tensor:
    """``hidden_states[pooling_mask == 1]`` (rows selected, leading dims flattened), or unchanged if no mask.

    Args:
        hidden_states: ``(..., H)``.
        pooling_mask: None or an integer/bool tensor of shape ``hidden_states.shape[:-1]``.

    Returns:
        ``(K, H)`` for the ``K`` selected rows (K may be 0), or ``hidden_states`` itself.
    """
    if pooling_mask is None:
        return hidden_states
    if not isinstance(pooling_mask, torch.Tensor):
        raise TypeError(f"pooling_mask must be a torch.Tensor or None, got {type(pooling_mask).__name__}")
    if pooling_mask.is_floating_point() or pooling_mask.is_complex():
        raise TypeError(f"pooling_mask must be a bool or integer tensor, got {pooling_mask.dtype}")
    check_mask_shape(pooling_mask.shape, hidden_states.shape)
    return hidden_states[pooling_mask == 1]


class ClassificationHead(nn.Module):
    """Dropout then a bias-free linear ``score``, on all tokens or on those a pooling mask selects.

    Args:
        hidden_size: input size ``H``.
        num_labels: number of classes ``C``.
        dropout: dropout probability in ``[0, 1)``.

    ``state_dict`` keys: ``score.weight`` ``(C, H)``.
    """

    def __init__(self, hidden_size: int, num_labels: int, dropout: float):
        super().__init__()
        self._hidden_size = check_hidden_size(hidden_size)
        check_hidden_size(num_labels, "num_labels")
        self.dropout = nn.Dropout(check_dropout(dropout))
        self.score = nn.Linear(hidden_size, num_labels, bias=False)

    def forward(self, hidden_states: torch.Tensor, pooling_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits.

        Args:
            hidden_states: ``(..., H)`` floating tensor.
            pooling_mask: optional ``hidden_states.shape[:-1]`` mask; rows where it equals 1 are kept.

        Returns:
            float32 logits: ``(..., C)`` without a mask, ``(K, C)`` for ``K`` selected rows with one.
        """
        hidden_states = pool(_check_hidden(hidden_states, self._hidden_size), pooling_mask)
        return self.score(self.dropout(hidden_states)).float()

    def reset_parameters(self) -> None:
        """Re-initialise ``score`` as ``nn.Linear`` does."""
        self.score.reset_parameters()


class EmbeddingHead(nn.Module):
    """Optional pooling, optional bias-free ``projection``, float32, optional L2 normalisation.

    Args:
        hidden_size: input size ``H``.
        embedding_dim: output size ``E``, or None for no projection (``E = H``).
        normalize: L2-normalise the last dimension.

    ``state_dict`` keys: ``projection.weight`` ``(E, H)`` when ``embedding_dim`` is given; none otherwise.
    """

    def __init__(self, hidden_size: int, embedding_dim: int | None, normalize: bool):
        super().__init__()
        self._hidden_size = check_hidden_size(hidden_size)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {normalize!r}")
        self._normalize = normalize
        if embedding_dim is None:
            self.projection = None
        else:
            self.projection = nn.Linear(hidden_size, check_hidden_size(embedding_dim, "embedding_dim"), bias=False)

    def forward(self, hidden_states: torch.Tensor, pooling_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings.

        Args:
            hidden_states: ``(..., H)`` floating tensor.
            pooling_mask: optional ``hidden_states.shape[:-1]`` mask; rows where it equals 1 are kept.

        Returns:
            float32 ``(..., E)`` (or ``(K, E)`` with a mask), unit L2 norm if ``normalize``.
        """
        hidden_states = pool(_check_hidden(hidden_states, self._hidden_size), pooling_mask)
        if self.projection is not None:
            hidden_states = self.projection(hidden_states)
        hidden_states = hidden_states.float()
        if self._normalize:
            hidden_states = F.normalize(hidden_states, p=2, dim=-1)
        return hidden_states

    def reset_parameters(self) -> None:
        """Re-initialise ``projection`` (if any) as ``nn.Linear`` does."""
        if self.projection is not None:
            self.projection.reset_parameters()


class SplitLanguageModellingHead(nn.Module):
    """Per-token cross-entropy over a vocabulary made of named splits, never materialising logits.

    One bias-free ``nn.Linear(H, V_split)`` per split in ``lm_head``; the forward concatenates their
    weights in ``split_order`` into one ``(V, H)`` matrix and calls :func:`linear_cross_entropy`.

    Vocabulary parallelism (``vocab_parallel_group``): rank ``r`` of the group holds only rows
    ``shard_range(V, r, world)`` of the concatenated vocabulary (:attr:`vocab_range`). Each split's
    ``nn.Linear`` holds the intersection of its rows with that range (possibly none), so the
    ``state_dict`` keys stay d9d's, with fewer rows; the forward concatenates the local pieces and
    calls :func:`torch_heads.parallel.vocab_parallel_linear_cross_entropy`. Every rank of the group
    passes the same hidden states and labels and gets the full loss and ``hidden`` gradient; each
    split weight's gradient is the rank's rows of the full one. Load a d9d (unsharded) checkpoint
    with ``head.load_state_dict(head.shard_state_dict(full))``; save one with
    :meth:`full_state_dict`. Data parallelism goes over other ranks (e.g. DDP with
    ``process_group`` set to the ranks that hold the same shard).

    Args:
        split_vocab_size: split name -> vocabulary size.
        split_order: concatenation order; global label ids index the concatenation.
        hidden_size: input size ``H``.
        impl: ``linear_cross_entropy`` implementation (None: best available, ``"cce"`` on CUDA;
            ``"pallas"`` runs our JAX Pallas kernels on CUDA tensors, zero-copy, exact gradients).
            With ``vocab_parallel_group``, the per-shard computation: ``"pallas"``, ``"chunked"``
            or None (``"pallas"`` on CUDA where it runs, else ``"chunked"``).
        filter_eps: gradient filtering, as in :func:`linear_cross_entropy` (``None`` for exact;
            a float, CCE's filtering, is refused with ``vocab_parallel_group``: the shards are exact).
        vocab_parallel_group: a ``torch.distributed`` process group to split the vocabulary over
            (``dist.group.WORLD`` for all ranks, once ``init_process_group`` has run: before, it is
            None), or None for the whole weight on every rank. ``jax_heads`` takes ``mesh`` and
            ``vocab_axis`` instead: there one program sees every device, here a process holds one.

    ``state_dict`` keys: ``lm_head.<split>.weight`` ``(V_split, H)`` (the rank's rows of it, with
    ``vocab_parallel_group``).

    Raises (at construction, with the same text as ``jax_heads``): ``ValueError``/``TypeError`` for
    a bad split configuration or split name (``heads_common.check_split_name``), an unknown
    ``impl`` (listing the known ones) or an out-of-range ``filter_eps``.

    Example:
        >>> head = SplitLanguageModellingHead({"text": 1000, "special": 4}, ["text", "special"], 64)
        >>> loss = head(torch.randn(2, 8, 64), torch.randint(0, 1004, (2, 8)))  # (2, 8) float32

        Vocabulary-parallel, on each rank of an initialised process group::

            head = SplitLanguageModellingHead(sizes, order, H, vocab_parallel_group=dist.group.WORLD)
            head.load_state_dict(head.shard_state_dict(full_d9d_state_dict))
            loss = head(hidden, labels)  # the full (B, S) loss on every rank
    """

    def __init__(
        self,
        split_vocab_size: dict[str, int],
        split_order: Sequence[str],
        hidden_size: int,
        *,
        impl: str | None = None,
        filter_eps: float | Literal["auto"] | None = "auto",
        vocab_parallel_group: dist.ProcessGroup | None = None,
    ):
        super().__init__()
        self._layout = check_split_config(split_vocab_size, split_order)
        self._hidden_size = check_hidden_size(hidden_size)
        self._split_order = self._layout.order
        self.impl = impl
        self.filter_eps = filter_eps
        self._group = vocab_parallel_group
        self._vocab_range = (0, self._layout.total)
        if vocab_parallel_group is None:
            check_impl_name(impl, IMPLEMENTATIONS)
            check_filter_eps(filter_eps)
        else:
            _check_parallel_options(impl, filter_eps)
            self._vocab_range = _group_shard(vocab_parallel_group, self._layout.total)
        rows = {name: stop - start for name, (start, stop) in zip(self._layout.order, self._split_rows())}
        with _quiet_empty_init():
            self.lm_head: Mapping[str, nn.Linear] = nn.ModuleDict(
                {name: nn.Linear(hidden_size, rows[name], bias=False) for name in split_vocab_size}
            )

    @property
    def vocab_size(self) -> int:
        """The whole vocabulary ``V`` (all splits, all shards)."""
        return self._layout.total

    @property
    def vocab_parallel_group(self) -> dist.ProcessGroup | None:
        """The process group the vocabulary is split over, or None."""
        return self._group

    @property
    def vocab_range(self) -> tuple[int, int]:
        """``(start, stop)``: the global rows this rank holds (``(0, V)`` without a group)."""
        return self._vocab_range

    def _split_rows(self) -> list[tuple[int, int]]:
        """Per split (in ``split_order``): its rows inside :attr:`vocab_range`, relative to the split."""
        lo, hi = self._vocab_range
        rows = []
        for offset, size in zip(self._layout.offsets, self._layout.sizes):
            start = min(max(lo - offset, 0), size)
            rows.append((start, max(start, min(hi - offset, size))))
        return rows

    def weight(self) -> torch.Tensor:
        """The ``(V, H)`` concatenation of the split weights in ``split_order`` (differentiable).

        With ``vocab_parallel_group``: the rank's ``(stop - start, H)`` rows of it (:attr:`vocab_range`).
        """
        return torch.cat([self.lm_head[name].weight for name in self._split_order], dim=0)

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token loss.

        Args:
            hidden_states: ``(B, S, H)`` (any leading shape works) in the weights' dtype; the
                same on every rank of ``vocab_parallel_group``.
            labels: ``(B, S)`` integer global ids in ``[0, V)`` or ``LM_IGNORE_INDEX``; the same
                on every rank of ``vocab_parallel_group``.

        Returns:
            ``(B, S)`` float32 loss, reduction none; 0 at ignored positions.
        """
        _check_hidden(hidden_states, self._hidden_size)
        if self._group is not None:
            _check_parallel_options(self.impl, self.filter_eps)
            return vocab_parallel_linear_cross_entropy(
                hidden_states,
                self.weight(),
                labels,
                vocab_start=self._vocab_range[0],
                vocab_size=self.vocab_size,
                group=self._group,
                ignore_index=LM_IGNORE_INDEX,
                reduction="none",
                impl=self.impl,
            )
        return linear_cross_entropy(
            hidden_states,
            self.weight(),
            labels,
            ignore_index=LM_IGNORE_INDEX,
            reduction="none",
            impl=self.impl,
            filter_eps=self.filter_eps,
        )

    def implementation_for(self, hidden_states: torch.Tensor) -> str:
        """The implementation the forward would run for these hidden states (per shard, with a group)."""
        if self._group is not None:
            _check_parallel_options(self.impl, self.filter_eps)
            return select_parallel_implementation(hidden_states, self.impl)
        return select_implementation(hidden_states, self.impl, self.filter_eps)

    def shard_state_dict(self, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """A d9d (unsharded) state dict cut down to this rank's rows, for ``load_state_dict``.

        Args:
            state_dict: holds ``f"{prefix}lm_head.<split>.weight"`` ``(V_split, H)`` for every split;
                other entries (the rest of a model) pass through unchanged.
            prefix: where the head sits in the model whose state dict this is (e.g. ``"head."``).

        Returns:
            A new dict whose split weights are views of this rank's rows (all rows without a group).

        Raises:
            KeyError: a split weight is missing.
            ValueError: a split weight has the wrong shape.
        """
        local = dict(state_dict)
        for name, size, (start, stop) in zip(self._layout.order, self._layout.sizes, self._split_rows()):
            key = f"{prefix}lm_head.{name}.weight"
            if key not in state_dict:
                raise KeyError(f"state_dict has no {key!r} (keys: {sorted(state_dict)[:8]}...)")
            full = state_dict[key]
            if tuple(full.shape) != (size, self._hidden_size):
                raise ValueError(
                    f"{key} must be the unsharded ({size}, {self._hidden_size}) weight, got {tuple(full.shape)}"
                )
            local[key] = full[start:stop]
        return local

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The d9d (unsharded) state dict, ``lm_head.<split>.weight`` ``(V_split, H)`` (detached).

        With ``vocab_parallel_group`` this is collective (an ``all_gather`` over the group; every
        rank must call it) and every rank gets the whole weights.
        """
        if self._group is None:
            return {key: value.detach() for key, value in self.state_dict().items()}
        world = dist.get_world_size(self._group)
        ranges = [shard_range(self.vocab_size, r, world) for r in range(world)]
        local = self.weight().detach()
        padded = local.new_zeros(max(stop - start for start, stop in ranges), self._hidden_size)
        padded[: local.shape[0]] = local
        gathered = [torch.empty_like(padded) for _ in ranges]
        dist.all_gather(gathered, padded, group=self._group)
        full = torch.cat([block[: stop - start] for block, (start, stop) in zip(gathered, ranges)])
        by_name = {
            name: full[offset : offset + size]
            for name, offset, size in zip(self._layout.order, self._layout.offsets, self._layout.sizes)
        }
        return {f"lm_head.{name}.weight": by_name[name] for name in self.lm_head}

    def reset_parameters(self) -> None:
        """Re-initialise every split as ``nn.Linear`` does (each rank its own rows, with a group)."""
        with _quiet_empty_init():
            for layer in self.lm_head.values():
                layer.reset_parameters()


def _group_shard(group: object, vocab_size: int) -> tuple[int, int]:
    if group is getattr(getattr(dist, "GroupMember", None), "NON_GROUP_MEMBER", object()):
        raise ValueError(
            "this process is not a member of vocab_parallel_group (dist.new_group returned NON_GROUP_MEMBER here)"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"vocab_parallel_group must be a torch.distributed ProcessGroup or None, got {group!r}")
    if not dist.is_initialized():
        raise RuntimeError("vocab_parallel_group needs torch.distributed initialised: call dist.init_process_group first")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of vocab_parallel_group")
    if vocab_size < world:
        raise ValueError(f"a vocabulary of {vocab_size} rows cannot be split over {world} ranks (one row each at least)")
    return shard_range(vocab_size, rank, world)


def _check_parallel_options(impl: object, filter_eps: object) -> None:
    check_parallel_impl(impl)
    if check_filter_eps(filter_eps) not in ("auto", None):
        raise ValueError(
            f"filter_eps={filter_eps} asks for CCE's gradient filtering, which the vocabulary-parallel head does not "
            "do (its shards compute exact gradients): use 'auto' or None"
        )


@contextlib.contextmanager
def _quiet_empty_init():
    """A split with no rows on this rank is a valid, empty ``nn.Linear``: its no-op init need not warn."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        yield


class SplitTokenEmbeddings(nn.Module):
    """Token embeddings over a vocabulary made of named splits (the LM head's input side).

    Args:
        split_vocab_size: split name -> vocabulary size.
        split_order: concatenation order; global ids map to splits as the LM head's labels do.
        hidden_size: embedding size ``H``.

    ``state_dict`` keys: ``token_embedding.<split>.weight`` ``(V_split, H)``.
    """

    def __init__(self, split_vocab_size: dict[str, int], split_order: Sequence[str], hidden_size: int):
        super().__init__()
        self._layout = check_split_config(split_vocab_size, split_order)
        self._hidden_size = check_hidden_size(hidden_size)
        self._split_order = self._layout.order
        self.token_embedding: Mapping[str, nn.Embedding] = nn.ModuleDict(
            {name: nn.Embedding(size, hidden_size) for name, size in split_vocab_size.items()}
        )

    @property
    def vocab_size(self) -> int:
        return self._layout.total

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed global token ids.

        Args:
            input_ids: integer tensor of any shape, values in ``[0, V)``.

        Returns:
            ``input_ids.shape + (H,)`` in the embedding dtype.

        Raises:
            ValueError: an id outside ``[0, V)`` (eagerly on CPU; on CUDA an asynchronous device
                assert, as for the LM head's labels).
        """
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        vocab = self.vocab_size
        input_ids = input_ids.long()  # a narrow or unsigned dtype would wrap in the comparison with vocab
        bad = (input_ids < 0) | (input_ids >= vocab)
        if input_ids.device.type == "cuda":
            torch._assert_async(~bad.any(), f"input_ids must be in [0, {vocab})")
        elif input_ids.numel() and bool(bad.any()):
            position = [int(i) for i in bad.nonzero()[0]]
            raise ValueError(token_id_range_message(int(input_ids[tuple(position)]), position, vocab))
        table = torch.cat([self.token_embedding[name].weight for name in self._split_order], dim=0)
        return F.embedding(input_ids, table)

    def reset_parameters(self) -> None:
        """Re-initialise every split as ``nn.Embedding`` does."""
        for layer in self.token_embedding.values():
            layer.reset_parameters()
