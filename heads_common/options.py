"""Checks of the loss options beyond d9d (bias, soft-capping, label smoothing, z-loss, shift, returned
log-sum-exp), shared by both frameworks so that a bad value gets the same exception and message.

Pure Python: importing it pulls in neither torch nor JAX. The formulas the options stand for are in
the README ("Loss options") and ``docs/loss-options.md``.
"""

from __future__ import annotations

import math

from heads_common import check_bool


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_softcap(softcap: object) -> float | None:
    """None (no soft-capping) or a finite float ``c > 0``: logits become ``c·tanh(logits / c)``."""
    if softcap is None:
        return None
    value = _number("softcap", softcap)
    if value <= 0:
        raise ValueError(f"softcap must be > 0 (or None), got {value}")
    return value


def check_label_smoothing(label_smoothing: object) -> float:
    """A float ``ε`` in ``[0, 1)``."""
    value = _number("label_smoothing", label_smoothing)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {value}")
    return value


def check_lse_square_scale(lse_square_scale: object) -> float:
    """A finite float ``λ >= 0`` (the z-loss weight)."""
    value = _number("lse_square_scale", lse_square_scale)
    if value < 0:
        raise ValueError(f"lse_square_scale must be >= 0, got {value}")
    return value


def check_shift(shift: object) -> int:
    """``True`` (1), ``False`` (0) or an int ``k >= 0``; the range against the sequence is :func:`check_shift_fits`."""
    if isinstance(shift, bool):
        return int(shift)
    if not isinstance(shift, int):
        raise TypeError(f"shift must be a bool or an int >= 0, got {type(shift).__name__} ({shift!r})")
    if shift < 0:
        raise ValueError(f"shift must be >= 0, got {shift}")
    return shift


def check_shift_fits(shift: int, labels_shape: tuple[int, ...]) -> None:
    """A shift ``k > 0`` needs labels with a last (sequence) dimension ``S > k``."""
    if shift == 0:
        return
    if len(labels_shape) == 0:
        raise ValueError(f"shift={shift} needs labels with a sequence dimension, got a scalar")
    if shift >= labels_shape[-1]:
        raise ValueError(
            f"shift={shift} must be smaller than the labels' last dimension (sequence length {labels_shape[-1]})"
        )


def check_return_lse(return_lse: object) -> bool:
    return check_bool(return_lse, "return_lse")


def check_bias_shape(bias_shape: tuple[int, ...], vocab_size: int) -> None:
    if tuple(bias_shape) != (vocab_size,):
        raise ValueError(f"bias must have shape (V,) = ({vocab_size},), got {tuple(bias_shape)}")


def check_head_bias(bias: object) -> bool:
    """The language-modelling heads' ``bias`` flag: a bool (True: one ``(V_split,)`` bias per split)."""
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool (one bias vector per split when True), got {bias!r}")
    return bias


def filter_smoothing_message(filter_eps: object) -> str:
    """The refusal of gradient filtering with label smoothing (every gradient entry is non-zero)."""
    return (f"filter_eps={filter_eps} cannot be combined with label_smoothing: smoothing puts −g·ε/V in every "
            "gradient entry, so no tile is negligible; pass filter_eps=None")
