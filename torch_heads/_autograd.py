"""What the custom autograd Functions of ``torch_heads`` share: autocast, ``torch.func``, derivative orders.

* Autocast. The ops honour ``torch.autocast`` once, at their entry (:func:`autocast_inputs`, as
  ``F.linear`` would cast its operands), then compute with autocast off: each Function's forward and
  backward run under :func:`autocast_disabled`, so a backward called inside or outside an autocast
  block computes the same thing as the forward it belongs to.
* ``torch.func``. Each Function defines ``setup_context`` (for ``torch.func.grad``/``vjp``) and a
  ``vmap`` staticmethod built on :func:`vmap_by_loop`: the Function applied to each batch element in
  turn, whose outputs are stacked. Their forwards write into preallocated buffers, which
  ``generate_vmap_rule`` cannot batch.
* Orders. A backward is itself a Function's forward (its results then have a ``grad_fn``); a
  Function whose derivative is not implemented raises a ``RuntimeError`` in its backward naming what
  supports that order, never a wrong (zero) derivative or a torch-internal message.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_inputs(*tensors):
    """The tensors as an autocast-enabled matmul would take them (a differentiable cast).

    When autocast is enabled for the first tensor's device type at call time, every floating tensor
    except float64 is cast to ``torch.get_autocast_dtype(device_type)``, exactly as ``F.linear`` under
    autocast casts its operands (input, weight and bias); otherwise (or on a device type autocast does
    not know) the tensors are returned unchanged. None and non-tensors (which the caller's checks
    refuse) pass through.
    """
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        return tensors
    device_type = first.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)

    def cast(tensor):
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dtype == torch.float64:
            return tensor
        return tensor.to(dtype)

    return tuple(cast(t) for t in tensors)


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast off for ``device``'s type (a no-op context where autocast does not exist)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def vmap_by_loop(function: type[torch.autograd.Function], info, in_dims, *args):
    """The ``vmap`` staticmethod of ``function``: ``function.apply`` on each batch element, stacked.

    Returns ``(outputs, out_dims)`` as ``torch.func.vmap`` expects: every tensor output batched
    along dimension 0, a None output unbatched. An empty batch takes the outputs' shapes from one
    call on zeros (``function`` must accept them) and returns them empty.
    """

    def element(b: int | None) -> list:
        """The arguments of batch element ``b`` (None: zeros of one element's shape)."""
        picked = []
        for a, d in zip(args, in_dims):
            if d is None:
                picked.append(a)
            elif b is None:
                picked.append(a.new_zeros(a.shape[:d] + a.shape[d + 1 :]))
            else:
                picked.append(a.select(d, b))
        return picked

    if info.batch_size == 0:
        results, stack = [function.apply(*element(None))], lambda column: column[0].unsqueeze(0)[:0]
    else:
        results, stack = [function.apply(*element(b)) for b in range(info.batch_size)], torch.stack
    single = not isinstance(results[0], tuple)
    columns = list(zip(*([(r,) for r in results] if single else results)))
    outputs = tuple(None if column[0] is None else stack(column) for column in columns)
    out_dims = tuple(None if out is None else 0 for out in outputs)
    return (outputs[0], out_dims[0]) if single else (outputs, out_dims)
