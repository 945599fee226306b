"""Weight porting between the ``torch_heads`` and ``jax_heads`` modules.

``port_torch_to_flax(torch_module, flax_module)`` and ``port_flax_to_torch(flax_module,
torch_module)`` copy every parameter of one head into the matching head of the other family, in
place, and return the destination. Values go through host NumPy copies (no memory is shared with
the source) and are cast to the destination's dtype; ``nnx.Linear`` kernels ``(in, out)`` are
transposed to and from torch's ``(out, in)`` weights. Both heads must describe the same
configuration — head type, hidden size, ``num_labels``, presence and size of ``embedding_dim``,
``normalize``, split names, order and sizes, the LM head's ``bias`` — or a ``ValueError`` names the
mismatch. The LM head's per-split biases (torch ``lm_head.<split>.bias``, Flax
``lm_head[<split>].bias``, both ``(V_split,)``) are carried in both directions; a bias on one side
and none on the other is a ``ValueError`` naming the split.

A port is atomic: every parameter is read, converted to the destination's dtype and placement and
checked first (one converted copy of each parameter is held meanwhile), and only then written,
so on any error the destination is untouched. Besides a
mismatch, a port refuses (``ValueError`` naming the parameter) a torch parameter on the ``meta``
device (it holds no values), a deleted Flax array (e.g. donated to a jitted call), and a narrowing
that would create non-finite values: a float32 ``1e5`` becomes ``inf`` in a float16 head, so the
message gives how many values would turn non-finite. Non-finite values the source already holds
are copied as they are.

Dropout rates and the LM head's ``impl``, loss options (``softcap``, ``label_smoothing``,
``lse_square_scale``) and ``reduction`` are not weights and are not compared.

Example:
    >>> t = torch_heads.ClassificationHead(64, 3, 0.1)
    >>> f = port_torch_to_flax(t, jax_heads.ClassificationHead(64, 3, 0.1, rngs=nnx.Rngs(0)))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import jax_heads
import torch_heads

# torch head class -> flax head class
HEAD_PAIRS: dict[type, type] = {
    torch_heads.ClassificationHead: jax_heads.ClassificationHead,
    torch_heads.EmbeddingHead: jax_heads.EmbeddingHead,
    torch_heads.SplitLanguageModellingHead: jax_heads.SplitLanguageModellingHead,
    torch_heads.SplitTokenEmbeddings: jax_heads.SplitTokenEmbeddings,
}

FlaxHead = TypeVar("FlaxHead", bound=nnx.Module)
TorchHead = TypeVar("TorchHead", bound=torch.nn.Module)


@dataclass(frozen=True)
class _Pair:
    """One parameter on both sides; ``transpose``: the flax value is the torch value transposed."""

    kind: str  # the head's class name, for messages
    name: str
    torch_param: torch.nn.Parameter
    flax_variable: nnx.Variable
    transpose: bool


def _kind(module: object, argument: str, package: str, classes) -> type:
    for cls in classes:
        if isinstance(module, cls):
            return cls
    names = ", ".join(c.__name__ for c in classes)
    raise TypeError(f"{argument} must be a {package} head ({names}), got {type(module).__name__}")


def _mismatch(kind: str, what: str, torch_value: object, flax_value: object) -> ValueError:
    return ValueError(f"cannot port {kind}: {what} mismatch: torch has {torch_value}, flax has {flax_value}")


def _check_equal(kind: str, what: str, torch_value: object, flax_value: object) -> None:
    if torch_value != flax_value:
        raise _mismatch(kind, what, torch_value, flax_value)


def _linear_pair(kind: str, name: str, torch_linear: torch.nn.Linear, flax_linear: nnx.Linear, what: str) -> _Pair:
    torch_out = torch_linear.weight.shape[0]
    flax_out = flax_linear.kernel[...].shape[1]
    _check_equal(kind, what, torch_out, flax_out)
    return _Pair(kind, f"{name}.weight", torch_linear.weight, flax_linear.kernel, transpose=True)


def _split_pairs(kind: str, torch_module, flax_module, attribute: str, torch_name: str, flax_name: str) -> list[_Pair]:
    t_layout, f_layout = torch_module._layout, flax_module._layout
    _check_equal(kind, "split names", sorted(t_layout.order), sorted(f_layout.order))
    _check_equal(kind, "split_order", list(t_layout.order), list(f_layout.order))
    _check_equal(
        kind, "split sizes", dict(zip(t_layout.order, t_layout.sizes)), dict(zip(f_layout.order, f_layout.sizes))
    )
    torch_layers, flax_layers = getattr(torch_module, attribute), getattr(flax_module, attribute)
    pairs = []
    for name in t_layout.order:
        torch_layer, flax_layer = torch_layers[name], flax_layers[name]
        pairs.append(
            _Pair(
                kind,
                f"{attribute}.{name}.weight",
                getattr(torch_layer, torch_name),
                getattr(flax_layer, flax_name),
                transpose=attribute == "lm_head",
            )
        )
        if attribute == "lm_head":
            pairs.extend(_bias_pair(kind, name, torch_layer, flax_layer))
    return pairs


def _bias_pair(kind: str, split: str, torch_linear: torch.nn.Linear, flax_linear: nnx.Linear) -> list[_Pair]:
    """The split's bias on both sides (none when neither has one); a bias on one side only is a mismatch."""
    torch_has, flax_has = torch_linear.bias is not None, flax_linear.bias is not None
    if torch_has != flax_has:
        has, lacks = ("torch", "flax") if torch_has else ("flax", "torch")
        raise ValueError(
            f"cannot port {kind}: split {split!r} has a bias in {has} (lm_head.{split}.bias) but none in {lacks}; "
            "build both heads with the same bias="
        )
    if not torch_has:
        return []
    return [_Pair(kind, f"lm_head.{split}.bias", torch_linear.bias, flax_linear.bias, transpose=False)]


def _matched_parameters(torch_module: torch.nn.Module, flax_module: nnx.Module) -> list[_Pair]:
    """Every parameter of the pair, after checking that the two heads have one configuration."""
    torch_kind = _kind(torch_module, "torch_module", "torch_heads", HEAD_PAIRS)
    flax_kind = _kind(flax_module, "flax_module", "jax_heads", HEAD_PAIRS.values())
    kind = torch_kind.__name__
    if HEAD_PAIRS[torch_kind] is not flax_kind:
        raise ValueError(f"head type mismatch: torch {kind} cannot be ported to/from flax {flax_kind.__name__}")
    _check_equal(kind, "hidden_size", torch_module._hidden_size, flax_module._hidden_size)

    if torch_kind is torch_heads.ClassificationHead:
        pairs = [_linear_pair(kind, "score", torch_module.score, flax_module.score, "num_labels")]
    elif torch_kind is torch_heads.EmbeddingHead:
        _check_equal(kind, "normalize", torch_module._normalize, flax_module._normalize)
        t_proj, f_proj = torch_module.projection, flax_module.projection
        if (t_proj is None) != (f_proj is None):
            t_dim = None if t_proj is None else t_proj.weight.shape[0]
            f_dim = None if f_proj is None else f_proj.kernel[...].shape[1]
            raise _mismatch(kind, "embedding_dim", t_dim, f_dim)
        pairs = [] if t_proj is None else [_linear_pair(kind, "projection", t_proj, f_proj, "embedding_dim")]
    elif torch_kind is torch_heads.SplitLanguageModellingHead:
        if torch_module.vocab_parallel_group is not None:
            raise ValueError(
                f"cannot port {kind}: the torch head is vocabulary-parallel (this rank holds rows "
                f"{torch_module.vocab_range} only); load its full_state_dict() into an unsharded head and port that"
            )
        pairs = _split_pairs(kind, torch_module, flax_module, "lm_head", "weight", "kernel")
    else:
        pairs = _split_pairs(kind, torch_module, flax_module, "token_embedding", "weight", "embedding")
    # The configuration fixes every shape; this only catches a parameter replaced after construction.
    for pair in pairs:
        flax_shape = tuple(pair.flax_variable[...].shape)
        _check_equal(
            kind,
            f"{pair.name} shape",
            tuple(pair.torch_param.shape),
            flax_shape[::-1] if pair.transpose else flax_shape,
        )
    return pairs


def _host_copy(value: torch.Tensor | jax.Array) -> np.ndarray:
    """A fresh NumPy copy in float32 (float64 for float64 values).

    float16/bfloat16/float32 values are exact in float32, and NumPy has no bfloat16 that torch reads.
    """
    if isinstance(value, torch.Tensor):
        dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
        return value.detach().to("cpu", dtype, copy=True).numpy()
    return np.array(value, dtype=np.float64 if value.dtype == jnp.float64 else np.float32)


def _read_torch(pair: _Pair) -> np.ndarray:
    """The torch value in the flax layout (transposed for kernels), on the host."""
    if pair.torch_param.is_meta:
        raise ValueError(f"cannot port {pair.kind}: torch {pair.name} is on the meta device and holds no values")
    host = _host_copy(pair.torch_param)
    return host.T if pair.transpose else host


def _read_flax(pair: _Pair) -> np.ndarray:
    """The flax value in the torch layout, on the host."""
    value = pair.flax_variable[...]
    if value.is_deleted():
        raise ValueError(
            f"cannot port {pair.kind}: the flax array for {pair.name} has been deleted (donated to a jitted call?)"
        )
    host = _host_copy(value)
    return host.T if pair.transpose else host


def _check_finite(pair: _Pair, source: np.ndarray, finite: np.ndarray, dtype: object) -> None:
    """Refuse a conversion that turned finite source values into inf (narrowing past the dtype's range)."""
    produced = np.isfinite(source) & ~finite
    count = int(np.count_nonzero(produced))
    if count:
        dtype_name, largest = str(dtype).removeprefix("torch."), float(np.abs(source[produced]).max())
        raise ValueError(
            f"cannot port {pair.kind}: {pair.name} would hold {count} non-finite value(s) that the source does "
            f"not: {dtype_name} cannot represent magnitudes up to {largest:.6g}; port into a head of a wider dtype"
        )


def port_torch_to_flax(torch_module: TorchHead, flax_module: FlaxHead) -> FlaxHead:
    """Copy a ``torch_heads`` head's weights into the matching ``jax_heads`` head, in place.

    Atomic: nothing is written unless every parameter converts (see the module docstring).

    Args:
        torch_module: a ``torch_heads`` head (any device and dtype).
        flax_module: the ``jax_heads`` head of the same type and configuration; its parameters keep
            their dtype and placement.

    Returns:
        ``flax_module``.

    Raises:
        TypeError: an argument is not a head of its family.
        ValueError: the heads differ in type or configuration, a torch parameter is on the ``meta``
            device, or a value would become non-finite in the destination's dtype (the message
            names the parameter and counts the values). ``flax_module`` is then unchanged.
    """
    writes = []
    for pair in _matched_parameters(torch_module, flax_module):
        host = _read_torch(pair)
        old = pair.flax_variable[...]
        with np.errstate(over="ignore"):  # an overflow is counted and refused just below
            new = jax.device_put(jnp.asarray(host, dtype=old.dtype), old.sharding)
        _check_finite(pair, host, np.asarray(jnp.isfinite(new)), old.dtype)
        writes.append((pair.flax_variable, new))
    for variable, new in writes:
        variable[...] = new
    return flax_module


def port_flax_to_torch(flax_module: FlaxHead, torch_module: TorchHead) -> TorchHead:
    """Copy a ``jax_heads`` head's weights into the matching ``torch_heads`` head, in place.

    Atomic: nothing is written unless every parameter converts (see the module docstring).

    Args:
        flax_module: a ``jax_heads`` head.
        torch_module: the ``torch_heads`` head of the same type and configuration; its parameters
            keep their dtype and device.

    Returns:
        ``torch_module``.

    Raises:
        TypeError: an argument is not a head of its family.
        ValueError: the heads differ in type or configuration, a flax array was deleted, a torch
            parameter is on the ``meta`` device (it cannot hold the values), or a value would
            become non-finite in the destination's dtype (the message names the parameter and
            counts the values). ``torch_module`` is then unchanged.
    """
    writes = []
    for pair in _matched_parameters(torch_module, flax_module):
        host = _read_flax(pair)
        param = pair.torch_param
        if param.is_meta:
            raise ValueError(
                f"cannot port {pair.kind}: torch {pair.name} is on the meta device and cannot hold values; "
                "materialise the head first (module.to_empty(device=...))"
            )
        new = torch.from_numpy(np.ascontiguousarray(host)).to(param.device, param.dtype)
        _check_finite(pair, host, torch.isfinite(new).cpu().numpy(), param.dtype)
        writes.append((param, new))
    with torch.no_grad():
        for param, new in writes:
            param.copy_(new)
    return torch_module
