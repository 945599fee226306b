"""Zero-copy conversion between torch tensors and JAX arrays over DLPack.

Both functions hand the tensor or array object itself to the other framework's
``from_dlpack`` (the ``__dlpack__`` protocol), so on CUDA the consumer's stream waits for the
producer's pending work; no host synchronisation is added.

Copy and alias semantics of :func:`to_jax`, which decide whether a later in-place update of the
tensor shows through the array:

- A contiguous tensor whose dtype JAX keeps, at a buffer address the backend accepts, is aliased
  (zero-copy), CPU and CUDA alike. Tensors torch allocates on CPU start 64-byte aligned (one
  made by ``torch.from_numpy`` need not).
- A tensor that requires grad (an ``nn.Parameter``, say) is detached first; it is still
  aliased.
- Copied, with the reason ``copy=False`` gives:

  - a non-contiguous view (``t[:, ::2]``, ``expand``, ``.T``): "it is not contiguous". (JAX
    itself refuses strided and broadcast views and would accept a transpose as a column-major
    array; we always hand it row-major memory.)
  - a lazily negated view (``t._neg_view()``): "it is a negated view".
  - on CPU, data that does not start on a 64-byte boundary (a slice with an offset, ``t[1:]``
    of a float32 tensor): JAX copies it, because XLA's CPU buffers need that alignment; "its
    data address ... is not 64-byte aligned". On CUDA such a slice is aliased.
  - with JAX's 64-bit mode off, an int64 tensor, range-checked and copied as int32 ("int64 is
    narrowed to int32"), and a float64 tensor with ``allow_narrowing=True``, copied as float32
    ("float64 is narrowed to float32"; without ``allow_narrowing`` it raises ``TypeError``).

Each copy above is made silently under ``copy=None`` (the default). Pass ``copy=False`` to
make any copy a ``ValueError`` naming the reason instead (the array-API convention), so a
caller that relies on aliasing (a kernel writing into the tensor, say) cannot get an unrelated
buffer by accident; ``copy=True`` always returns independent memory.

:func:`to_torch` always aliases the array's buffer unless ``copy=True``: JAX arrays are dense
and single-device arrays map onto one torch tensor exactly.

Aliasing is a sharing of mutable memory with a framework that assumes immutability. Writing
into a torch tensor in place *is* visible through a JAX array made from it by zero-copy (and
vice versa), but JAX is free to have read the old value in a computation still in flight or
cached; do not mutate either side while the other may still use it, or pass ``copy=True``.

Supported dtypes, both ways, converted bit for bit: ``bool``, ``uint8``, ``int8``, ``int16``,
``int32``, ``int64``, ``float16``, ``bfloat16``, ``float32``, ``float64`` (the 64-bit ones in
JAX only when its 64-bit mode is on, see :func:`to_jax`). Complex, float8, the wider unsigned
integers and JAX's 4-bit types are refused with a ``TypeError``: no head uses them, and a
complex tensor's lazy conjugate bit would need its own aliasing rules.
"""

from __future__ import annotations

import jax
import jax.dlpack
import jax.numpy as jnp
import numpy as np
import torch

__all__ = ["to_jax", "to_torch"]

_TORCH_DTYPES = (
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
)
_JAX_DTYPES = frozenset(jnp.dtype(str(dtype).removeprefix("torch.")) for dtype in _TORCH_DTYPES)
_SUPPORTED_NAMES = ", ".join(str(dtype).removeprefix("torch.") for dtype in _TORCH_DTYPES)
_INT32 = torch.iinfo(torch.int32)
_CPU_ALIGNMENT = 64  # bytes: XLA:CPU copies a DLPack buffer that starts elsewhere


def to_jax(
    tensor: torch.Tensor, *, allow_narrowing: bool = False, copy: bool | None = None
) -> jax.Array:
    """Converts a torch tensor to a JAX array on the same device, zero-copy where possible.

    The result lives on the JAX device that matches ``tensor.device`` (CPU, or the GPU with the
    same index). Values and dtype are preserved exactly, except where narrowing is requested
    below. A tensor that requires grad is detached: the array is a plain value, and gradients
    do not flow back to ``tensor`` (port weights and compare gradients with
    ``interop.porting`` / ``interop.parity`` instead).

    When JAX's 64-bit mode is off (``jax_enable_x64`` false, JAX's default), JAX has no int64 or
    float64 arrays. Here an int64 tensor is range-checked and copied as int32 (labels and ids
    fit; a value outside int32 raises instead of wrapping), and a float64 tensor raises unless
    ``allow_narrowing=True`` casts it to float32 (values beyond float32's range become inf).
    With 64-bit mode on, both pass through unchanged and zero-copy.

    Args:
      tensor: a strided torch tensor on CPU or CUDA with dtype bool, uint8, int8, int16, int32,
        int64, float16, bfloat16, float32 or float64; any shape, including 0-d and empty.
      allow_narrowing: when JAX's 64-bit mode is off, cast a float64 tensor to float32 instead
        of raising. Has no effect on int64, which is always range-checked.
      copy: ``None`` (default) aliases ``tensor``'s memory when possible and copies otherwise:
        a non-contiguous or negated view, on CPU a tensor whose data is not 64-byte aligned
        (``t[1:]``), and an int64/float64 tensor narrowed while JAX's 64-bit mode is off (the
        module docstring lists the cases). ``False`` raises ``ValueError`` naming the reason
        instead of copying, so the array surely aliases ``tensor``; ``True`` always returns an
        array with its own memory.

    Returns:
      A ``jax.Array`` of ``tensor``'s shape on the matching device, with ``tensor``'s dtype
      (int32 or float32 for int64 or float64 inputs when JAX's 64-bit mode is off).

    Raises:
      TypeError: ``tensor`` is not a strided torch tensor, its dtype is unsupported, or it is
        float64 while JAX's 64-bit mode is off and ``allow_narrowing`` is false.
      ValueError: an int64 value does not fit int32 while JAX's 64-bit mode is off (the message
        names the first such value and its index); the tensor is on a device JAX cannot see;
        or ``copy=False`` but a copy is needed.

    Example:
      >>> labels = to_jax(torch.tensor([3, -100, 7]))  # int64 -> int32 unless x64 is on
    """
    _check_copy_arg(copy)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"to_jax: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(f"to_jax: tensor must be dense (torch.strided), got layout {tensor.layout}")
    if tensor.dtype not in _TORCH_DTYPES:
        raise TypeError(
            f"to_jax: tensor dtype {tensor.dtype} is not supported; supported: {_SUPPORTED_NAMES}"
        )
    _check_jax_sees(tensor.device)

    source = tensor.detach()
    prepared, why_copied = _narrow_for_jax(source, allow_narrowing=allow_narrowing)
    if prepared.is_neg():
        prepared, why_copied = prepared.resolve_neg(), why_copied or "it is a negated view"
    if not prepared.is_contiguous():
        prepared, why_copied = prepared.contiguous(), why_copied or (
            f"it is not contiguous (shape {tuple(tensor.shape)}, strides {tensor.stride()})"
        )
    if why_copied is not None and copy is False:
        raise ValueError(f"to_jax: copy=False, but a copy is needed because {why_copied}")
    if copy and why_copied is None:
        prepared = prepared.clone()

    array = jax.dlpack.from_dlpack(prepared)
    if copy is False and prepared.numel() and array.unsafe_buffer_pointer() != prepared.data_ptr():
        # JAX copies data that its backend cannot use in place (on CPU, XLA's 64-byte alignment).
        raise ValueError(f"to_jax: copy=False, but a copy is needed because {_why_jax_copied(prepared)}")
    return array


def to_torch(array: jax.Array, *, copy: bool | None = None) -> torch.Tensor:
    """Converts a JAX array to a torch tensor on the same device, zero-copy.

    Values, dtype and shape are preserved exactly (an int64 or float64 array, which exists when
    JAX's 64-bit mode is on, stays int64 or float64). The tensor aliases the array's buffer
    unless ``copy=True``; JAX assumes that buffer never changes, so writing into an aliasing
    tensor in place is undefined behaviour for the array (in practice the write shows through
    it). Pass ``copy=True`` for a tensor you mean to modify.

    Args:
      array: a concrete (not traced) ``jax.Array`` on a single CPU or GPU device with dtype
        bool, uint8, int8, int16, int32, int64, float16, bfloat16, float32 or float64; any
        shape, including 0-d and empty.
      copy: ``None`` (default) or ``False`` alias the array's buffer (it never needs a copy);
        ``True`` returns a tensor with its own memory.

    Returns:
      A ``torch.Tensor`` with ``requires_grad=False`` on the matching torch device.

    Raises:
      TypeError: ``array`` is not a ``jax.Array``, is a tracer (called under ``jax.jit``,
        ``grad`` or ``vmap``), or has an unsupported dtype.
      ValueError: ``array`` was deleted (e.g. donated), spans several devices, or lives on a
        device torch cannot use.
    """
    _check_copy_arg(copy)
    if isinstance(array, jax.core.Tracer):
        raise TypeError(
            "to_torch: array is a JAX tracer; convert concrete arrays outside jax.jit, grad and vmap"
        )
    if not isinstance(array, jax.Array):
        raise TypeError(f"to_torch: array must be a jax.Array, got {type(array).__name__}")
    if array.dtype not in _JAX_DTYPES:
        raise TypeError(
            f"to_torch: array dtype {array.dtype} is not supported; supported: {_SUPPORTED_NAMES}"
        )
    if array.is_deleted():
        raise ValueError("to_torch: array has been deleted (was it donated to a jitted call?)")
    devices = array.devices()
    if len(devices) != 1:
        raise ValueError(
            f"to_torch: array is sharded over {len(devices)} devices; gather it onto one first"
        )
    (device,) = devices
    if device.platform not in ("cpu", "gpu") or (
        device.platform == "gpu" and not torch.cuda.is_available()
    ):
        raise ValueError(f"to_torch: array is on {device}, which this torch build cannot use")

    tensor = torch.from_dlpack(array)
    return tensor.clone() if copy else tensor


def _why_jax_copied(tensor: torch.Tensor) -> str:
    """Why JAX's ``from_dlpack`` did not alias ``tensor``'s memory (it copied instead)."""
    address = tensor.data_ptr()
    if tensor.device.type == "cpu" and address % _CPU_ALIGNMENT:
        return (
            f"its data address {address:#x} is not {_CPU_ALIGNMENT}-byte aligned ({address % _CPU_ALIGNMENT} bytes "
            f"past a boundary; a slice such as t[1:] starts inside its storage), and XLA's CPU buffers need that "
            "alignment, so JAX copied it; pass copy=None to accept the copy, or align it with t.clone()"
        )
    return f"JAX's {tensor.device.type} backend could not use the memory at {address:#x} in place and copied it"


def _check_copy_arg(copy: object) -> None:
    if copy is not None and not isinstance(copy, bool):
        raise TypeError(f"copy must be None, True or False, got {copy!r}")


def _x64_enabled() -> bool:
    """Whether JAX currently keeps 64-bit dtypes (global flag or ``enable_x64`` context)."""
    return jax.dtypes.canonicalize_dtype(np.int64) == np.dtype(np.int64)


def _check_jax_sees(device: torch.device) -> None:
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise ValueError(
            f"to_jax: tensor is on {device}; only cpu and cuda tensors can be shared with JAX"
        )
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        raise ValueError(
            f"to_jax: tensor is on {device}, but this JAX has no GPU backend "
            f"(devices: {jax.devices()}); move the tensor to CPU or install JAX with CUDA"
        ) from None
    if all(gpu.local_hardware_id != device.index for gpu in gpus):
        raise ValueError(f"to_jax: tensor is on {device}, but JAX only sees GPUs {gpus}")


def _narrow_for_jax(
    tensor: torch.Tensor, *, allow_narrowing: bool
) -> tuple[torch.Tensor, str | None]:
    """Casts int64/float64 to what JAX holds with 64-bit mode off; returns why it copied."""
    if tensor.dtype not in (torch.int64, torch.float64) or _x64_enabled():
        return tensor, None
    if tensor.dtype == torch.float64:
        if not allow_narrowing:
            raise TypeError(
                "to_jax: tensor is float64 but JAX's 64-bit mode is off, so JAX would round it "
                "to float32. Enable it (jax.config.update('jax_enable_x64', True) or the "
                "jax.enable_x64 context) or pass allow_narrowing=True to cast to float32"
            )
        return tensor.to(torch.float32), "float64 is narrowed to float32"
    if tensor.numel():
        low, high = torch.aminmax(tensor)
        if low < _INT32.min or high > _INT32.max:
            outside = ((tensor < _INT32.min) | (tensor > _INT32.max)).reshape(-1)
            flat = int(outside.nonzero()[0])
            index = tuple(int(i) for i in np.unravel_index(flat, tuple(tensor.shape)))
            raise ValueError(
                f"to_jax: int64 tensor value {int(tensor.reshape(-1)[flat])} at index {index} "
                "does not fit int32, which JAX uses for it while its 64-bit mode is off; "
                "enable jax_enable_x64 to keep int64"
            )
    return tensor.to(torch.int32), "int64 is narrowed to int32"
