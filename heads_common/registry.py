"""The implementation registry both frameworks share: one record per implementation, one dispatch.

Pure Python: importing it pulls in neither torch nor JAX. Each framework's ``functional`` module
builds a :class:`Registry` of :class:`Implementation` records; its ``linear_cross_entropy`` then
reads as validate (:class:`LossOptions`), choose (:meth:`Registry.choose`), call
(``implementation.loss``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from heads_common import check_impl_name


@dataclass(frozen=True)
class LossOptions:
    """The validated, static options of one ``linear_cross_entropy`` call (hashable).

    Attributes:
        ignore_index: label value with loss 0 and gradient 0.
        reduction: ``"none"``, ``"sum"`` or ``"mean"``.
        filter_eps: ``"auto"`` (the implementation's default), None (exact gradients) or a float in
            (0, 1): the gradient-filter threshold.
        interpret: run Pallas kernels in interpret mode (JAX ``"pallas"`` and torch ``"pallas"``).
        sharding: a framework-specific, hashable description of a vocabulary-parallel call (JAX: the
            mesh and its axes), or None for a single-device call.
        softcap: None, or ``c > 0``: logits become ``c·tanh(logits / c)`` (after the bias).
        label_smoothing: ``ε`` in ``[0, 1)``.
        lse_square_scale: ``λ >= 0``: adds ``λ·lse²`` per counted token (z-loss).
        shift: ``k >= 0``: hidden position ``t`` predicts ``labels[..., t + k]``.
        return_lse: also return the per-token log-sum-exp.
        has_bias: a ``(V,)`` bias is added to the logits.
    """

    ignore_index: int
    reduction: str
    filter_eps: float | str | None = "auto"
    interpret: bool = False
    sharding: Hashable | None = None
    softcap: float | None = None
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    shift: int = 0
    return_lse: bool = False
    has_bias: bool = False

    @property
    def loss_options(self) -> frozenset[str]:
        """The names of the loss options this call sets (see :data:`LOSS_OPTIONS`)."""
        given = {
            "bias": self.has_bias,
            "softcap": self.softcap is not None,
            "label_smoothing": self.label_smoothing != 0.0,
            "lse_square_scale": self.lse_square_scale != 0.0,
            "return_lse": self.return_lse,
        }
        return frozenset(name for name, on in given.items() if on)

    @property
    def filtered(self) -> bool:
        """Whether the call asks for gradient filtering (a float ``filter_eps``)."""
        return isinstance(self.filter_eps, float)


# The loss options an implementation must support itself (``shift`` is applied to the labels by the
# functional entry point, the same for every implementation).
LOSS_OPTIONS = ("bias", "softcap", "label_smoothing", "lse_square_scale", "return_lse")

# (hidden (N, D), weight (V, D), labels (N,), options, *, bias, bad) -> the reduced loss [, lse]
LossFn = Callable[..., Any]


@dataclass(frozen=True)
class Implementation:
    """One implementation of ``linear_cross_entropy``.

    Attributes:
        name: the ``impl=`` name.
        unsupported_reason: ``(hidden, options) -> None`` when it can run on these inputs and options,
            else a sentence saying why not (shown to the user).
        loss: ``(hidden (N, D), weight (V, D), labels (N,), options, *, bias, bad) -> loss``: flat
            inputs with labels in ``[0, V)`` or ``options.ignore_index``; ``bias`` None or ``(V,)``;
            ``bad`` None or an ``(N,)`` bool mask of tokens whose loss and gradient rows must be NaN
            (JAX: out-of-range traced labels, already replaced by an in-range label). Returns the
            per-token ``(N,)`` loss for reduction ``"none"``, else the reduced scalar; float32
            (float64 for float64 inputs). With ``options.return_lse``: ``(loss, lse)``, ``lse`` the
            per-token ``(N,)`` float32 log-sum-exp, 0 where ignored, differentiable.
        auto: whether ``impl=None`` may pick it (in registration order).
        options: the names of :data:`LOSS_OPTIONS` it supports; a call setting another is refused
            by :meth:`Registry.choose` (naming the implementations that support it).
    """

    name: str
    unsupported_reason: Callable[[Any, LossOptions], str | None]
    loss: LossFn
    auto: bool = True
    options: frozenset[str] = frozenset()


def no_implementation_message(reasons: dict[str, str]) -> str:
    lines = "; ".join(f"{name}: {why}" for name, why in reasons.items())
    return f"no linear_cross_entropy implementation supports these inputs ({lines})"


class Registry:
    """Implementations by name, and the one dispatch rule.

    ``impl=None`` picks the first ``auto`` implementation that supports the inputs; a named one that
    cannot run raises with its reason (never a silent fallback); an unknown name raises listing the
    known ones.
    """

    def __init__(self, implementations: Sequence[Implementation]):
        self._by_name = {impl.name: impl for impl in implementations}
        if len(self._by_name) != len(implementations):
            raise ValueError("implementation names must be unique")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    @property
    def auto_order(self) -> tuple[str, ...]:
        return tuple(name for name, impl in self._by_name.items() if impl.auto)

    def __getitem__(self, name: str) -> Implementation:
        return self._by_name[name]

    def check_name(self, impl: object) -> None:
        """Raise ``ValueError`` for an ``impl`` that is neither None nor a registered name."""
        check_impl_name(impl, self.names)

    def supporting(self, option: str) -> tuple[str, ...]:
        """The implementations that support the loss option ``option``."""
        return tuple(name for name, impl in self._by_name.items() if option in impl.options)

    def reason(self, name: str, hidden: Any, options: LossOptions) -> str | None:
        """Why implementation ``name`` cannot run on ``hidden`` with ``options``, or None."""
        impl = self._by_name[name]
        missing = sorted(options.loss_options - impl.options)
        if missing:
            return "; ".join(
                f"does not support {option} (implementations that do: {', '.join(self.supporting(option)) or 'none'})"
                for option in missing
            )
        return impl.unsupported_reason(hidden, options)

    def choose(self, impl: str | None, hidden: Any, options: LossOptions) -> Implementation:
        """The implementation that runs for ``hidden`` (and a weight of its dtype and device) with ``options``.

        Raises:
            ValueError: an unknown ``impl``; a named ``impl`` that cannot run (saying why); with
                ``impl=None``, no candidate that can run (listing each one's reason).
        """
        self.check_name(impl)
        if impl is None:
            reasons = {}
            for name in self.auto_order:
                reason = self.reason(name, hidden, options)
                if reason is None:
                    return self._by_name[name]
                reasons[name] = reason
            raise ValueError(no_implementation_message(reasons))
        reason = self.reason(impl, hidden, options)
        if reason is not None:
            raise ValueError(f"impl={impl!r} cannot run on these inputs: {reason}")
        return self._by_name[impl]
