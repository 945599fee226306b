"""Framework-neutral configuration checks shared by ``torch_heads`` and ``jax_heads``.

Pure Python: importing it pulls in neither torch nor JAX. Both head families call these
functions so that the same bad input gets the same exception type and the same message
in either framework.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

LM_IGNORE_INDEX = -100
"""Label value that contributes loss 0 and gradient 0."""

REDUCTIONS = ("none", "sum", "mean")

# The public attribute names of the containers that hold the splits, torch's ``nn.ModuleDict`` and
# Flax's ``nnx.Dict``: torch refuses a split of that name ("attribute 'training' already exists"),
# ``nnx.Dict`` lets it shadow a method (a split named "keys" breaks ``keys()``). Both frameworks
# refuse all of them, so a head builds, and ports, in either. The head tests check that this covers
# every such attribute of the installed torch and Flax.
RESERVED_SPLIT_NAMES = frozenset(
    [
        "T_destination", "add_module", "apply", "bfloat16", "buffers", "call_super_init", "children", "clear",
        "compile", "cpu", "cuda", "double", "dump_patches", "eval", "extra_repr", "float", "forward", "get",
        "get_buffer", "get_extra_state", "get_parameter", "get_submodule", "half", "ipu", "items", "iter_children",
        "iter_modules", "keys", "load_state_dict", "modules", "mtia", "named_buffers", "named_children",
        "named_modules", "named_parameters", "parameters", "perturb", "pop", "popitem", "register_backward_hook",
        "register_buffer", "register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
        "register_full_backward_pre_hook", "register_load_state_dict_post_hook", "register_load_state_dict_pre_hook",
        "register_module", "register_parameter", "register_state_dict_post_hook", "register_state_dict_pre_hook",
        "requires_grad_", "set_attributes", "set_extra_state", "set_submodule", "setdefault", "share_memory", "sow",
        "state_dict", "to", "to_empty", "train", "training", "type", "update", "values", "xpu", "zero_grad",
    ]
)


@dataclass(frozen=True)
class SplitLayout:
    """A validated split vocabulary: names in concatenation order, sizes and start offsets."""

    order: tuple[str, ...]
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.sizes)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def check_hidden_size(hidden_size: object, name: str = "hidden_size") -> int:
    """Return ``hidden_size`` if it is a positive int, else raise naming ``name``."""
    return _check_positive_int(name, hidden_size)


def check_bool(value: object, name: str) -> bool:
    """Return ``value`` if it is a bool (not merely truthy), else raise ``TypeError`` naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_dropout(dropout: object) -> float:
    """Return ``dropout`` as a float in ``[0, 1)``."""
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"dropout must be a float, got {type(dropout).__name__} ({dropout!r})")
    if not (0.0 <= float(dropout) < 1.0) or math.isnan(dropout):
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    return float(dropout)


def check_split_name(name: object) -> str:
    """Return ``name`` if both frameworks can hold a split of that name, else raise naming it.

    A split name must be a non-empty ``str`` without ``"."`` (it joins the parts of state-dict keys
    and parameter paths), not starting with ``"_"`` (the containers' own attributes) and not in
    :data:`RESERVED_SPLIT_NAMES`.

    Raises:
        TypeError: ``name`` is not a ``str``.
        ValueError: any other rule is broken (the message names the split and the rule).
    """
    if not isinstance(name, str):
        raise TypeError(f"split_order entries must be str, got {name!r}")
    if not name:
        why = "it is empty"
    elif "." in name:
        why = "it contains '.', which joins the parts of state-dict keys and parameter paths"
    elif name.startswith("_"):
        why = "it starts with '_', which the module containers keep for their own attributes"
    elif name in RESERVED_SPLIT_NAMES:
        why = "it is an attribute of the containers that hold the splits (torch's nn.ModuleDict, Flax's nnx.Dict)"
    else:
        return name
    raise ValueError(f"split name {name!r} cannot be used: {why}")


def check_split_config(split_vocab_size: Mapping[str, int], split_order: Sequence[str]) -> SplitLayout:
    """Validate a split vocabulary and return its layout.

    Raises:
        TypeError: ``split_vocab_size`` is not a mapping, ``split_order`` is a bare string or
            not a sequence, or a name/size has the wrong type.
        ValueError: duplicate names in ``split_order``, a name in one argument but not the other,
            no splits at all, or a non-positive size.
    """
    if not isinstance(split_vocab_size, Mapping):
        raise TypeError(f"split_vocab_size must be a dict of name -> size, got {type(split_vocab_size).__name__}")
    if isinstance(split_order, (str, bytes)) or not isinstance(split_order, Sequence):
        raise TypeError(f"split_order must be a sequence of split names, got {split_order!r}")
    order = tuple(split_order)
    for name in order:
        check_split_name(name)
    if not order:
        raise ValueError("split_order must name at least one split")
    duplicates = sorted({n for n in order if order.count(n) > 1})
    if duplicates:
        raise ValueError(f"split_order has duplicate split names: {duplicates}")
    missing = [n for n in order if n not in split_vocab_size]
    if missing:
        raise ValueError(f"split_order names splits missing from split_vocab_size: {missing}")
    extra = [n for n in split_vocab_size if n not in order]
    if extra:
        raise ValueError(f"split_vocab_size has splits not named in split_order: {extra}")
    sizes = tuple(_check_positive_int(f"split_vocab_size[{n!r}]", split_vocab_size[n]) for n in order)
    offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
    return SplitLayout(order=order, sizes=sizes, offsets=offsets)


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def check_ignore_index(ignore_index: object) -> int:
    """Return ``ignore_index`` as a Python int.

    Any integral scalar is accepted: an ``int``, a NumPy integer, a 0-d integer array or tensor
    (through ``operator.index``). A bool (Python, NumPy or a bool array) is refused, as is anything
    with dimensions.

    Raises:
        TypeError: ``ignore_index`` is not an integral scalar (a traced array included).
    """
    is_bool = isinstance(ignore_index, bool) or str(getattr(ignore_index, "dtype", "")) in ("bool", "torch.bool")
    if not is_bool and getattr(ignore_index, "ndim", 0) == 0:
        try:
            return operator.index(ignore_index)
        except TypeError:
            pass
    raise TypeError(f"ignore_index must be an int (or an integer scalar), got {ignore_index!r}")


def check_ignore_index_fits(ignore_index: int, labels_dtype: str, low: int, high: int) -> None:
    """``ignore_index`` must be representable in the labels' (widened) integer dtype ``[low, high]``.

    A value outside it could never equal a label; comparing it with the labels would wrap or overflow.
    """
    if not low <= ignore_index <= high:
        raise ValueError(
            f"ignore_index={ignore_index} does not fit the labels' integer dtype {labels_dtype} ([{low}, {high}])"
        )


def check_lce_shapes(
    hidden_shape: Sequence[int],
    weight_shape: Sequence[int],
    labels_shape: Sequence[int],
    *,
    weight_name: str = "weight",
    allow_no_rows: bool = False,
) -> None:
    """Shape contract of ``linear_cross_entropy``: hidden ``(..., D)``, weight ``(V, D)``, labels ``(...)``.

    ``weight_name`` names the weight in the messages; ``allow_no_rows`` accepts ``V = 0`` (a
    vocabulary-parallel rank may hold no rows of the vocabulary).
    """
    hidden_shape, weight_shape, labels_shape = tuple(hidden_shape), tuple(weight_shape), tuple(labels_shape)
    if len(hidden_shape) < 1:
        raise ValueError("hidden must have at least one dimension (..., D), got a scalar")
    if len(weight_shape) != 2:
        raise ValueError(f"{weight_name} must have shape (V, D), got {weight_shape}")
    if weight_shape[0] < 1 and not allow_no_rows:
        raise ValueError(f"{weight_name} must have at least one vocabulary row, got shape {weight_shape}")
    if weight_shape[1] != hidden_shape[-1]:
        raise ValueError(
            f"hidden size mismatch: hidden has D={hidden_shape[-1]} (shape {hidden_shape}) "
            f"but {weight_name} has D={weight_shape[1]} (shape {weight_shape})"
        )
    if hidden_shape[-1] < 1:
        raise ValueError(f"hidden must have a hidden size D >= 1 in its last dimension, got shape {hidden_shape}")
    if labels_shape != hidden_shape[:-1]:
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {hidden_shape[:-1]}, got {labels_shape}")


def check_mask_shape(mask_shape: Sequence[int], hidden_shape: Sequence[int], name: str = "pooling_mask") -> None:
    if tuple(mask_shape) != tuple(hidden_shape)[:-1]:
        raise ValueError(
            f"{name} must have shape hidden_states.shape[:-1] = {tuple(hidden_shape)[:-1]}, got {tuple(mask_shape)}"
        )


def label_range_message(bad_value: int, position: Sequence[int], vocab_size: int, ignore_index: int) -> str:
    return (
        f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
        f"found {bad_value} at index {tuple(position)}"
    )


def token_id_range_message(bad_value: int, position: Sequence[int], vocab_size: int) -> str:
    return f"input_ids must be in [0, {vocab_size}); found {bad_value} at index {tuple(position)}"


def check_filter_eps(filter_eps: object) -> float | str | None:
    """``"auto"`` (the implementation's default), ``None`` (exact) or a float threshold in (0, 1)."""
    if filter_eps is None or filter_eps == "auto":
        return filter_eps
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)):
        raise TypeError(f"filter_eps must be 'auto', None or a float, got {filter_eps!r}")
    if not (0.0 < float(filter_eps) < 1.0):
        raise ValueError(f"filter_eps must be in (0, 1), got {filter_eps}")
    return float(filter_eps)


def unknown_impl_message(impl: object, known: Sequence[str]) -> str:
    return f"impl must be None or one of {tuple(known)}, got {impl!r}"


def check_impl_name(impl: object, known: Sequence[str]) -> str | None:
    """Return ``impl`` if it is None or one of ``known``, else raise ``ValueError`` listing them."""
    if impl is not None and (not isinstance(impl, str) or impl not in known):
        raise ValueError(unknown_impl_message(impl, known))
    return impl


def check_interpret(interpret: object, impl: object, check_impl: Callable[[object], None] | None = None) -> None:
    """Pallas interpret mode: ``interpret`` must be a bool, and True only with ``impl="pallas"``.

    ``check_impl`` (the caller's check of the name) runs in between, so an unknown ``impl`` is
    reported as such rather than as a mismatch with ``interpret``.
    """
    check_bool(interpret, "interpret")
    if check_impl is not None:
        check_impl(impl)
    if interpret and impl != "pallas":
        raise ValueError(f"interpret=True applies to impl='pallas' only, got impl={impl!r}")
