"""``SplitLanguageModellingHead`` for PyTorch: d9d's split-vocabulary LM head on :func:`linear_cross_entropy`."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from heads_common import (
    LM_IGNORE_INDEX,
    check_filter_eps,
    check_hidden_size,
    check_impl_name,
    check_reduction,
    check_split_config,
)
from heads_common.options import check_head_bias, check_label_smoothing, check_lse_square_scale, check_softcap
from torch_heads.functional import IMPLEMENTATIONS, linear_cross_entropy, select_implementation
from torch_heads.heads._common import check_hidden
from torch_heads.parallel import (
    check_parallel_impl,
    select_parallel_implementation,
    shard_range,
    vocab_parallel_linear_cross_entropy,
)


class SplitLanguageModellingHead(nn.Module):
    """Per-token cross-entropy over a vocabulary made of named splits, never materialising logits.

    One ``nn.Linear(H, V_split)`` per split in ``lm_head`` (bias-free unless ``bias=True``); the
    forward concatenates their weights (and biases) in ``split_order`` into one ``(V, H)`` matrix
    (and one ``(V,)`` vector) and calls :func:`linear_cross_entropy` with the head's loss options.

    Vocabulary parallelism (``vocab_parallel_group``): rank ``r`` of the group holds only rows
    ``shard_range(V, r, world)`` of the concatenated vocabulary (:attr:`vocab_range`). Each split's
    ``nn.Linear`` holds the intersection of its rows with that range (possibly none), bias rows with
    weight rows, so the ``state_dict`` keys stay d9d's, with fewer rows; the forward concatenates
    the local pieces and calls :func:`torch_heads.parallel.vocab_parallel_linear_cross_entropy`.
    Every rank of the group passes the same hidden states and labels and gets the full loss and
    ``hidden`` gradient; each split parameter's gradient is the rank's rows of the full one. Load a
    d9d (unsharded) checkpoint with ``head.load_state_dict(head.shard_state_dict(full))``; save one
    with :meth:`full_state_dict`. Data parallelism goes over other ranks (e.g. DDP with
    ``process_group`` set to the ranks that hold the same shard).

    d9d checkpoints have no biases: they load with ``strict=True`` into a head built with
    ``bias=False`` (the default). A head built with ``bias=True`` refuses them under ``strict=True``
    (torch reports the missing ``lm_head.<split>.bias`` keys); ``strict=False`` loads the weights and
    keeps the biases as initialised.

    Args:
        split_vocab_size: split name -> vocabulary size.
        split_order: concatenation order; global label ids index the concatenation.
        hidden_size: input size ``H``.
        bias: one learnable ``(V_split,)`` bias per split, added to the logits (``nn.Linear``'s
            initialisation).
        softcap: None or ``c > 0``: logits become ``c·tanh(logits / c)`` (after the bias).
        label_smoothing: ``ε`` in ``[0, 1)`` (``F.cross_entropy``'s definition).
        lse_square_scale: ``λ >= 0``: adds ``λ·lse²`` per counted token (z-loss).
        reduction: ``"none"`` (d9d's per-token loss), ``"sum"`` or ``"mean"`` (over non-ignored tokens).
        impl: ``linear_cross_entropy`` implementation (None: best available that supports the
            options, ``"cce"`` on CUDA; ``"pallas"`` runs our JAX Pallas kernels on CUDA tensors,
            zero-copy, exact gradients). With ``vocab_parallel_group``, the per-shard computation:
            ``"pallas"``, ``"chunked"`` or None (``"pallas"`` on CUDA where it runs, else ``"chunked"``).
        filter_eps: gradient filtering, as in :func:`linear_cross_entropy` (``None`` for exact;
            a float, CCE's filtering, is refused with ``vocab_parallel_group``: the shards are exact).
        vocab_parallel_group: a ``torch.distributed`` process group to split the vocabulary over
            (``dist.group.WORLD`` for all ranks, once ``init_process_group`` has run: before, it is
            None), or None for the whole weight on every rank. ``jax_heads`` takes ``mesh`` and
            ``vocab_axis`` instead: there one program sees every device, here a process holds one.

    ``state_dict`` keys: ``lm_head.<split>.weight`` ``(V_split, H)``, and with ``bias=True``
    ``lm_head.<split>.bias`` ``(V_split,)`` (the rank's rows of them, with ``vocab_parallel_group``).

    Raises (at construction, with the same text as ``jax_heads``): ``ValueError``/``TypeError`` for
    a bad split configuration or split name (``heads_common.check_split_name``), an unknown
    ``impl`` (listing the known ones), an out-of-range ``filter_eps``, a non-bool ``bias``, a bad
    ``softcap``/``label_smoothing``/``lse_square_scale`` (``heads_common.options``) or ``reduction``.
    An implementation that does not support an option set here refuses it, by name, at the forward.

    Example:
        >>> head = SplitLanguageModellingHead({"text": 1000, "special": 4}, ["text", "special"], 64)
        >>> loss = head(torch.randn(2, 8, 64), torch.randint(0, 1004, (2, 8)))  # (2, 8) float32

        Gemma-2's head (soft-capped logits), training on the mean loss::

            head = SplitLanguageModellingHead({"text": 256000}, ["text"], 2304, softcap=30.0, reduction="mean")

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
        bias: bool = False,
        softcap: float | None = None,
        label_smoothing: float = 0.0,
        lse_square_scale: float = 0.0,
        reduction: Literal["none", "sum", "mean"] = "none",
        impl: str | None = None,
        filter_eps: float | Literal["auto"] | None = "auto",
        vocab_parallel_group: dist.ProcessGroup | None = None,
    ):
        super().__init__()
        self._layout = check_split_config(split_vocab_size, split_order)
        self._hidden_size = check_hidden_size(hidden_size)
        self._split_order = self._layout.order
        self._has_bias = check_head_bias(bias)
        self.softcap = check_softcap(softcap)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.lse_square_scale = check_lse_square_scale(lse_square_scale)
        self.reduction = check_reduction(reduction)
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
        rows = {name: stop - start for name, (start, stop) in zip(self._layout.order, self._split_rows(), strict=True)}
        with _quiet_empty_init():
            self.lm_head: Mapping[str, nn.Linear] = nn.ModuleDict(
                {name: nn.Linear(hidden_size, rows[name], bias=bias) for name in split_vocab_size}
            )

    @property
    def vocab_size(self) -> int:
        """The whole vocabulary ``V`` (all splits, all shards)."""
        return self._layout.total

    @property
    def has_bias(self) -> bool:
        """Whether the head was built with ``bias=True`` (one bias per split)."""
        return self._has_bias

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
        for offset, size in zip(self._layout.offsets, self._layout.sizes, strict=True):
            start = min(max(lo - offset, 0), size)
            rows.append((start, max(start, min(hi - offset, size))))
        return rows

    def weight(self) -> torch.Tensor:
        """The ``(V, H)`` concatenation of the split weights in ``split_order`` (differentiable).

        With ``vocab_parallel_group``: the rank's ``(stop - start, H)`` rows of it (:attr:`vocab_range`).
        """
        return torch.cat([self.lm_head[name].weight for name in self._split_order], dim=0)

    def bias(self) -> torch.Tensor | None:
        """The ``(V,)`` concatenation of the split biases in ``split_order`` (differentiable), or None
        without ``bias=True``. With ``vocab_parallel_group``: the rank's rows of it, as :meth:`weight`."""
        if not self._has_bias:
            return None
        return torch.cat([self.lm_head[name].bias for name in self._split_order], dim=0)

    def forward(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss, with the head's options and reduction.

        Args:
            hidden_states: ``(B, S, H)`` (any leading shape works) in the weights' dtype; the
                same on every rank of ``vocab_parallel_group``.
            labels: ``(B, S)`` integer global ids in ``[0, V)`` or ``LM_IGNORE_INDEX``; the same
                on every rank of ``vocab_parallel_group``.

        Returns:
            float32: the ``(B, S)`` per-token loss for reduction ``"none"`` (0 at ignored
            positions), else a scalar.
        """
        check_hidden(hidden_states, self._hidden_size)
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
                reduction=self.reduction,
                impl=self.impl,
                **self._options_set(),
            )
        return linear_cross_entropy(
            hidden_states,
            self.weight(),
            labels,
            bias=self.bias(),
            ignore_index=LM_IGNORE_INDEX,
            reduction=self.reduction,
            softcap=self.softcap,
            label_smoothing=self.label_smoothing,
            lse_square_scale=self.lse_square_scale,
            impl=self.impl,
            filter_eps=self.filter_eps,
        )

    def _options_set(self) -> dict[str, object]:
        """The loss options this head sets (not at their defaults), for the vocabulary-parallel op: a
        head at the defaults makes the plain call, one that sets an option passes it through."""
        options: dict[str, object] = {"bias_shard": self.bias()} if self._has_bias else {}
        if self.softcap is not None:
            options["softcap"] = self.softcap
        if self.label_smoothing:
            options["label_smoothing"] = self.label_smoothing
        if self.lse_square_scale:
            options["lse_square_scale"] = self.lse_square_scale
        return options

    def implementation_for(self, hidden_states: torch.Tensor) -> str:
        """The implementation the forward would run for these hidden states (per shard, with a group).

        Raises:
            ValueError: the named ``impl`` (or, for None, every candidate) cannot run with these
                inputs and the head's options, saying why.
        """
        if self._group is not None:
            _check_parallel_options(self.impl, self.filter_eps)
            return select_parallel_implementation(hidden_states, self.impl)
        return select_implementation(
            hidden_states, self.impl, self.filter_eps, reduction=self.reduction, softcap=self.softcap,
            label_smoothing=self.label_smoothing, lse_square_scale=self.lse_square_scale, has_bias=self._has_bias,
        )

    def _parameter_names(self) -> list[str]:
        return ["weight", "bias"] if self._has_bias else ["weight"]

    def shard_state_dict(self, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
        """A d9d (unsharded) state dict cut down to this rank's rows, for ``load_state_dict``.

        Args:
            state_dict: holds ``f"{prefix}lm_head.<split>.weight"`` ``(V_split, H)`` for every split
                (and ``f"{prefix}lm_head.<split>.bias"`` ``(V_split,)`` for a head with ``bias=True``);
                other entries (the rest of a model) pass through unchanged.
            prefix: where the head sits in the model whose state dict this is (e.g. ``"head."``).

        Returns:
            A new dict whose split parameters are views of this rank's rows (all rows without a group).

        Raises:
            KeyError: a split parameter is missing.
            ValueError: a split parameter has the wrong shape.
        """
        local = dict(state_dict)
        for name, size, (start, stop) in zip(self._layout.order, self._layout.sizes, self._split_rows(), strict=True):
            for param in self._parameter_names():
                key = f"{prefix}lm_head.{name}.{param}"
                if key not in state_dict:
                    raise KeyError(f"state_dict has no {key!r} (keys: {sorted(state_dict)[:8]}...)")
                full = state_dict[key]
                shape = (size, self._hidden_size) if param == "weight" else (size,)
                if tuple(full.shape) != shape:
                    raise ValueError(f"{key} must be the unsharded {shape} {param}, got {tuple(full.shape)}")
                local[key] = full[start:stop]
        return local

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The d9d (unsharded) state dict: ``lm_head.<split>.weight`` ``(V_split, H)`` and, with
        ``bias=True``, ``lm_head.<split>.bias`` ``(V_split,)`` (detached).

        With ``vocab_parallel_group`` this is collective (one ``all_gather`` over the group; every
        rank must call it) and every rank gets the whole parameters.
        """
        if self._group is None:
            return {key: value.detach() for key, value in self.state_dict().items()}
        local = self.weight().detach()
        if self._has_bias:  # the bias rows travel as one more column of the weight rows
            local = torch.cat([local, self.bias().detach()[:, None]], dim=1)
        full = _all_gather_rows(local, self.vocab_size, self._group)
        layout = self._layout
        spans = dict(zip(layout.order, zip(layout.offsets, layout.sizes, strict=True), strict=True))
        state = {}
        for name in self.lm_head:  # the key order of an unsharded head's state_dict
            offset, size = spans[name]
            rows = full[offset : offset + size]
            state[f"lm_head.{name}.weight"] = rows[:, : self._hidden_size]
            if self._has_bias:
                state[f"lm_head.{name}.bias"] = rows[:, self._hidden_size]
        return state

    def reset_parameters(self) -> None:
        """Re-initialise every split as ``nn.Linear`` does (each rank its own rows, with a group)."""
        with _quiet_empty_init():
            for layer in self.lm_head.values():
                layer.reset_parameters()


def _all_gather_rows(local: torch.Tensor, vocab_size: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The ``(V, C)`` rows every rank holds a ``shard_range`` of, from each rank's ``(rows, C)`` block."""
    world = dist.get_world_size(group)
    ranges = [shard_range(vocab_size, r, world) for r in range(world)]
    padded = local.new_zeros(max(stop - start for start, stop in ranges), local.shape[1])
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in ranges]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([block[: stop - start] for block, (start, stop) in zip(gathered, ranges, strict=True)])


def _group_shard(group: object, vocab_size: int) -> tuple[int, int]:
    if group is getattr(getattr(dist, "GroupMember", None), "NON_GROUP_MEMBER", object()):
        raise ValueError(
            "this process is not a member of vocab_parallel_group (dist.new_group returned NON_GROUP_MEMBER here)"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"vocab_parallel_group must be a torch.distributed ProcessGroup or None, got {group!r}")
    if not dist.is_initialized():
        raise RuntimeError(
            "vocab_parallel_group needs torch.distributed initialised: call dist.init_process_group first"
        )
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of vocab_parallel_group")
    if vocab_size < world:
        raise ValueError(
            f"a vocabulary of {vocab_size} rows cannot be split over {world} ranks (one row each at least)"
        )
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
