"""The CUDA path on our JAX Pallas kernels (``jax_heads/pallas_lce.py``), called from PyTorch.

The kernels are written once, in Pallas, and serve both frameworks: the ``torch.autograd.Function``
below hands hidden states, weight and labels to JAX through :mod:`interop.dlpack` (zero-copy), runs
the Pallas forward, keeps the per-token log-sum-exp for the backward, and hands the loss and the
two gradients back to torch, zero-copy as well.

JAX is imported on first use only (``import torch_heads`` never imports it). The first import sets
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless the environment already chooses: JAX would otherwise
reserve 75% of the GPU that the PyTorch program is using when its GPU backend starts. (It has no
effect if JAX's GPU backend has already started in this process.)

Compilation. Two programs are ``jax.jit``-compiled per ``(ignore_index, interpret, block sizes)``
(:func:`_programs`, cached) and, within each, per shape and dtype by ``jit`` itself: the first call
at a new shape traces and compiles, every later one dispatches the cached executable. Measured on
an H200 (``benchmarks/compile_time.py``, bf16, forward + backward): JAX import and GPU backend start
2.2 s once per process; first call at the Gemma-2 head shape 9.7 s (the process's first
compilation), at a second shape 3.4 s, a repeated shape 0.07 s (no compilation; the steady step
is 69 ms).

* forward ``(hidden, weight, labels) -> (loss, lse)``: the forward rule of ``pallas_lce``; only the
  ``(N_pad,)`` float32 log-sum-exp is kept for the backward (as a JAX array on ``ctx``), so the
  backward does not recompute the forward (8·N·D·V FLOPs in all, as for ``jax-pallas``).
* backward ``(hidden, weight, labels, grad, lse) -> (d_hidden, d_weight)``: the backward rule of
  ``pallas_lce`` on residuals rebuilt from the torch tensors saved by ``ctx.save_for_backward``
  (re-imported zero-copy, so torch's in-place-modification checks still guard them).

Two more, :func:`_shard_programs` (cached per ``(interpret, block sizes)``), serve the
vocabulary-parallel op (``torch_heads/parallel.py``, ``impl="pallas"``): the forward returns one
weight shard's log-sum-exp and target logit, the backward takes the global log-sum-exp; the
collectives between them are torch's.

Storing ``jax.vjp``'s closure on ``ctx`` instead would keep the padded inputs alive as JAX
residuals and, created per call, would not be a cached program; rebuilding the residuals is free
(padding is a no-op at aligned shapes) and keeps both programs fixed.

Stream ordering (CUDA). PyTorch and JAX each enqueue work on their own streams; nothing here
synchronises the host. The hand-over is ordered by the DLPack stream protocol, as implemented by
torch ``Tensor.__dlpack__``/``torch.from_dlpack`` and by JAX's default (StreamExecutor) GPU client:

1. torch → JAX (hidden, weight, labels, upstream gradient). ``interop.to_jax`` calls
   ``jax.dlpack.from_dlpack(tensor)``: JAX passes its device's external-ready-events stream to
   ``tensor.__dlpack__(stream=...)``, where torch records an event on its *current* stream and
   makes JAX's stream wait for it; JAX records the wrapped buffer's definition event on that
   stream, and every JAX program that takes the array waits for its definition event. So the
   kernels read the inputs only after all torch work enqueued on the current stream before the
   call (e.g. the kernel that wrote ``hidden``).
2. JAX → torch (loss, d_hidden, d_weight). ``interop.to_torch`` calls ``torch.from_dlpack(array)``,
   which passes torch's current stream to ``array.__dlpack__(stream=...)``; JAX makes that stream
   wait for the array's definition event, i.e. for the end of the program that computed it. Torch
   kernels enqueued afterwards read finished results.
3. What the protocol does not order: memory reuse. (a) PJRT does not promise to hold a torch
   tensor it wraps until the programs reading it have finished, so a tensor freed (or written in
   place) right after the call could be overwritten by torch while JAX still reads it. We keep
   every torch input referenced until the results have been handed back (point 2), which makes
   torch's stream wait for the JAX program: anything torch does later with that memory is queued
   behind it. (b) When torch frees a tensor that aliases a JAX result, JAX's allocator gets the
   memory back with no record of torch's pending reads. Every JAX program of this module starts
   after all torch work enqueued before it (point 1: each takes a freshly imported tensor), so
   these programs never overwrite such memory early. Other JAX GPU work that the process runs
   between our calls is not ordered against torch's stream; synchronise it first if it may run
   while torch still reads our results.
4. XLA's TFRT GPU client (opt-in, ``XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT=1``) ignores the stream
   when it wraps foreign memory (its ``CreateViewOfDeviceBuffer`` marks the buffer ready at once),
   so point 1 does not hold there. With that client this module synchronises: it waits for
   torch's current stream before handing inputs over and for JAX's results before handing them
   back (a host synchronisation per call).

Not supported: CUDA graph capture and ``torch.compile`` tracing through the call (JAX launches on
its own streams, outside torch's view).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from torch_heads._cce import _ZeroLoss, tensor_reason

# Triton (and XLA, for its entry parameters) assume 16-byte aligned buffers; torch's caching
# allocator gives 512-byte aligned blocks, but a view with a storage offset may be less aligned.
_ALIGNMENT = 16
_INT32 = torch.iinfo(torch.int32)


def _import_jax():
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    return jax


def unsupported_reason(hidden: torch.Tensor, filter_eps: object) -> str | None:
    """Why ``pallas`` cannot run on these inputs, or None when it can (imports JAX for CUDA inputs)."""
    reason = tensor_reason(hidden)
    if reason is not None:
        return reason
    try:
        jax = _import_jax()
        import interop.dlpack  # noqa: F401
        import jax_heads.pallas_lce  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        return f"JAX with our Pallas kernels is not importable ({exc})"
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return f"JAX has no GPU backend (devices: {jax.devices()}); install JAX with CUDA support"
    if all(gpu.local_hardware_id != hidden.device.index for gpu in gpus):
        return f"JAX does not see {hidden.device} (its GPUs: {gpus})"
    return None


@functools.cache
def _programs(ignore_index: int, interpret: bool, block_sizes, filter_eps: float | None = None):
    """The jitted forward and backward for these static options (``jit`` caches per shape and dtype)."""
    jax = _import_jax()
    from jax_heads import pallas_lce

    def options(hidden, weight):
        return pallas_lce.options_for(
            hidden.shape, weight.shape, ignore_index, interpret=interpret, block_sizes=block_sizes,
            filter_eps=filter_eps,
        )

    @jax.jit
    def forward(hidden, weight, labels):
        return pallas_lce.forward_with_lse(hidden, weight, labels, options(hidden, weight))

    @jax.jit
    def backward(hidden, weight, labels, grad, lse):
        return pallas_lce.backward_from_lse(hidden, weight, labels, lse, grad, options(hidden, weight))

    return forward, backward


@functools.cache
def _shard_programs(interpret: bool, block_sizes):
    """The jitted per-shard forward and backward of the vocabulary-parallel op (``torch_heads.parallel``).

    Labels are shard-local: the target's row of the weight shard, -1 where the token has no target
    in this shard (ignored, or its label lies in another shard). Every shape is padded to the
    kernels' tiles inside the program and sliced back.

    * forward ``(hidden, weight, local_labels) -> (lse_k, target_k)``: the shard's per-token
      log-sum-exp and target logit (0 without a target), ``(N,)`` float32 each;
    * backward ``(hidden, weight, local_labels, lse, g) -> (d_hidden, d_weight)``: the gradients of
      ``sum(g * loss)`` restricted to the shard's logits, against the *global* ``lse`` and the
      upstream ``g`` (float32, 0 at ignored tokens); ``d_hidden`` is this shard's partial sum.
    """
    jax = _import_jax()
    import jax.numpy as jnp

    from jax_heads import pallas_lce

    def padded(hidden, weight, local_labels):
        plan = pallas_lce.plan_for(hidden.shape[0], weight.shape[0], hidden.shape[1], block_sizes)
        return plan, pallas_lce.pad_inputs(hidden, weight, local_labels, plan)

    @jax.jit
    def forward(hidden, weight, local_labels):
        plan, (hp, wp, yp) = padded(hidden, weight, local_labels)
        lse, target = pallas_lce.lce_forward(hp, wp, yp, block_sizes=block_sizes, plan=plan, interpret=interpret)
        return lse[: plan.n], target[: plan.n]

    @jax.jit
    def backward(hidden, weight, local_labels, lse, g):
        plan, (hp, wp, yp) = padded(hidden, weight, local_labels)
        pad = (0, plan.n_pad - plan.n)
        d_hidden, d_weight = pallas_lce.lce_backward(
            hp, wp, yp, jnp.pad(lse, pad), jnp.pad(g, pad), block_sizes=block_sizes, plan=plan, interpret=interpret
        )
        return d_hidden[: plan.n, : plan.d], d_weight[: plan.v, : plan.d]

    return forward, backward


def _tfrt_gpu_client() -> bool:
    """Whether JAX's GPU backend is the TFRT client, whose DLPack views ignore streams (docstring, point 4)."""
    return os.environ.get("XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT", "0").strip() not in ("", "0")


def _call(program, device: torch.device, tensors: tuple[torch.Tensor, ...], *jax_args):
    """``program(*tensors, *jax_args)`` with the tensors handed to JAX zero-copy; returns JAX arrays.

    The caller keeps ``tensors`` referenced until it has handed the results back with ``to_torch``
    (module docstring, point 3a).
    """
    from interop.dlpack import to_jax

    fence = device.type == "cuda" and _tfrt_gpu_client()
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if fence:
            torch.cuda.current_stream(device).synchronize()
        results = program(*(to_jax(t) for t in tensors), *jax_args)
    if fence:
        _import_jax().block_until_ready(results)
    return results


class _PallasLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, programs):
        from interop.dlpack import to_torch

        loss, lse = _call(programs[0], hidden.device, (hidden, weight, labels))
        ctx.save_for_backward(hidden, weight, labels)
        ctx.lse = lse
        ctx.programs = programs
        return to_torch(loss)

    @staticmethod
    def backward(ctx, grad_loss):
        from interop.dlpack import to_torch

        hidden, weight, labels = ctx.saved_tensors
        grad = _aligned(grad_loss.contiguous())  # any upstream layout (a transpose, an expand)
        d_hidden, d_weight = _call(ctx.programs[1], hidden.device, (hidden, weight, labels, grad), ctx.lse)
        # At least one gradient is needed, and handing back either orders torch after the program.
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        return (
            to_torch(d_hidden) if need_hidden else None,
            to_torch(d_weight) if need_weight else None,
            None,
            None,
        )


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (contiguous) itself if its data is 16-byte aligned, else an aligned copy."""
    return tensor if tensor.data_ptr() % _ALIGNMENT == 0 else tensor.clone()


def _int32_labels(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, int]:
    """Contiguous int32 labels and the ignore index to pass with them.

    Labels arrive validated (in ``[0, V)`` or equal to ``ignore_index``) and ``V < 2**31``, so the
    narrowing is exact. An ``ignore_index`` outside int32 is never a class id: those positions
    become -1 (never a class either), compared in int64 so that nothing wraps.
    """
    if _INT32.min <= ignore_index <= _INT32.max:
        return labels.to(torch.int32).contiguous(), ignore_index
    wide = labels.long()
    return torch.where(wide == ignore_index, -1, wide).to(torch.int32).contiguous(), -1


def _default_block_sizes(block_sizes):
    if block_sizes is not None:
        return block_sizes
    _import_jax()
    from jax_heads.pallas_lce import DEFAULT_BLOCK_SIZES

    return DEFAULT_BLOCK_SIZES


def pallas_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    *,
    interpret: bool = False,
    block_sizes=None,
    filter_eps: float | None = None,
) -> torch.Tensor:
    """Per-token loss of flat inputs on our Pallas kernels, through JAX, zero-copy.

    Args:
        hidden: ``(N, D)`` float16/bfloat16/float32 tensor (CUDA; CPU only with ``interpret``).
        weight: ``(V, D)`` tensor of the same dtype and device.
        labels: ``(N,)`` integer tensor, each in ``[0, V)`` or ``ignore_index`` (validated by the caller).
        ignore_index: label value that gives loss 0 and gradient 0.
        interpret: run the kernels in Pallas interpret mode (CPU tests; slow).
        block_sizes: a ``jax_heads.pallas_lce.BlockSizes``; None for its default.
        filter_eps: None for exact gradients; a float turns on the kernel's gradient filtering
            (``jax_heads.pallas_lce.pallas_loss``).

    Returns:
        ``(N,)`` float32 loss; gradients with respect to ``hidden`` and ``weight`` come back in their dtype.
    """
    if hidden.shape[0] == 0:
        return _ZeroLoss.apply(hidden, weight)
    block_sizes = _default_block_sizes(block_sizes)
    labels, ignore_index = _int32_labels(labels, ignore_index)
    # Differentiable copies where needed: JAX gets dense, aligned, row-major memory without copying it.
    hidden = _aligned(hidden.contiguous())
    weight = _aligned(weight.contiguous())
    programs = _programs(ignore_index, bool(interpret), block_sizes, None if filter_eps is None else float(filter_eps))
    return _PallasLinearCrossEntropy.apply(hidden, weight, _aligned(labels), programs)


def pallas_shard_lse_target(
    hidden: torch.Tensor, weight: torch.Tensor, local_labels: torch.Tensor, *, interpret: bool = False, block_sizes=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One vocabulary shard's per-token log-sum-exp and target logit, on our Pallas kernels.

    Args:
        hidden: ``(N, D)`` float16/bfloat16/float32 tensor (CUDA; CPU only with ``interpret``).
        weight: ``(V_shard, D)`` shard of the weight, same dtype and device.
        local_labels: ``(N,)`` integer: the target's row of ``weight``, -1 where there is none.
        interpret: run the kernels in Pallas interpret mode (CPU tests; slow).
        block_sizes: a ``jax_heads.pallas_lce.BlockSizes``; None for its default.

    Returns:
        ``(lse_k, target_k)``, ``(N,)`` float32 each; ``target_k`` is 0 where there is no target and
        lives in torch's allocator (the caller sums it in place over the group).
    """
    n = hidden.shape[0]
    if n == 0 or weight.shape[0] == 0:
        lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
        return lse, torch.zeros_like(lse)
    from interop.dlpack import to_torch

    programs = _shard_programs(bool(interpret), _default_block_sizes(block_sizes))
    labels = local_labels.to(torch.int32).contiguous()
    inputs = (_aligned(hidden.contiguous()), _aligned(weight.contiguous()), _aligned(labels))
    lse, target = _call(programs[0], hidden.device, inputs)
    # The target is summed in place by the caller's collective (NCCL writes on its own stream):
    # give it memory from torch's allocator, which tracks that stream, not a view of JAX's buffer.
    return to_torch(lse), to_torch(target).clone()


def pallas_shard_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    local_labels: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    *,
    interpret: bool = False,
    block_sizes=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One vocabulary shard's gradients against the global log-sum-exp, on our Pallas kernels.

    Args:
        hidden, weight, local_labels: as for :func:`pallas_shard_lse_target`.
        lse: ``(N,)`` float32 global log-sum-exp (any finite value or +inf where ``g`` is 0).
        g: ``(N,)`` float32 upstream gradient, 0 at ignored tokens.
        interpret, block_sizes: as for :func:`pallas_shard_lse_target`.

    Returns:
        ``(d_hidden, d_weight)``: this shard's float32 partial ``(N, D)`` of the hidden gradient, in
        memory torch owns (summed in place over the group next; the kernels round it to the input
        dtype first, as in ``jax_heads.parallel``), and the shard's ``(V_shard, D)`` weight gradient
        in the weight's dtype.
    """
    if hidden.shape[0] == 0 or weight.shape[0] == 0:
        return torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device), torch.zeros_like(weight)
    from interop.dlpack import to_torch

    programs = _shard_programs(bool(interpret), _default_block_sizes(block_sizes))
    inputs = (
        _aligned(hidden.contiguous()),
        _aligned(weight.contiguous()),
        _aligned(local_labels.to(torch.int32).contiguous()),
        _aligned(lse.to(torch.float32).contiguous()),
        _aligned(g.to(torch.float32).contiguous()),
    )
    d_hidden, d_weight = _call(programs[1], hidden.device, inputs)
    return to_torch(d_hidden).to(torch.float32, copy=True), to_torch(d_weight)
