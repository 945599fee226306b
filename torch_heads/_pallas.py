"""The CUDA path on our JAX Pallas kernels (``jax_heads/pallas/``), called from PyTorch.

The per-token ``torch.autograd.Function`` below hands hidden states, weight and labels to JAX through
:mod:`interop.dlpack` (zero-copy), runs the kernels' narrow entry (``jax_heads.pallas.lse_and_target``
and ``grads``) in jitted programs cached per static options (``jit`` caches per shape and dtype),
keeps the ``(N,)`` float32 log-sum-exp for the backward, and hands the loss and the two gradients
back to torch, zero-copy as well. The reductions ``"sum"``/``"mean"`` (:func:`pallas_reduced_loss`)
run ``jax_heads.pallas.gradient_in_forward_grads`` once in the forward instead and keep its
gradients for the backward. JAX is imported on first use only. The hand-over is ordered on the
CUDA streams by the DLPack stream protocol; the torch inputs are kept referenced until the results
are handed back, and with XLA's TFRT GPU client (which ignores the protocol) each call synchronises.
``docs/design-torch-on-jax.md`` gives the argument and the compilation costs. Not supported: CUDA
graph capture and ``torch.compile`` tracing through the call.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from torch_heads._common import ZeroLoss, tensor_reason

# Triton (and XLA, for its entry parameters) assume 16-byte aligned buffers; torch's caching
# allocator gives 512-byte aligned blocks, but a view with a storage offset may be less aligned.
_ALIGNMENT = 16
_INT32 = torch.iinfo(torch.int32)


def _import_jax():
    # Unless the environment chooses, JAX's GPU backend would reserve 75% of the GPU torch is using.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    return jax


def unsupported_reason(hidden: torch.Tensor, filter_eps: object, label_smoothing: float = 0.0) -> str | None:
    """Why ``pallas`` cannot run on these inputs and options, or None when it can (imports JAX for CUDA inputs)."""
    if isinstance(filter_eps, float) and label_smoothing:
        from heads_common.options import filter_smoothing_message

        return filter_smoothing_message(filter_eps)
    reason = tensor_reason(hidden)
    if reason is not None:
        return reason
    try:
        jax = _import_jax()
        import interop.dlpack  # noqa: F401
        import jax_heads.pallas  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        return f"JAX with our Pallas kernels is not importable ({exc})"
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return f"JAX has no GPU backend (devices: {jax.devices()}); install JAX with CUDA support"
    if all(gpu.local_hardware_id != hidden.device.index for gpu in gpus):
        return f"JAX does not see {hidden.device} (its GPUs: {gpus})"
    return None


def _options(interpret: bool, config) -> dict:
    """Keyword arguments of the kernels' entry points: the default configuration unless one is named."""
    return {"interpret": interpret} if config is None else {"interpret": interpret, "config": config}


@functools.cache
def _programs(ignore_index: int, interpret: bool, config, filter_eps: float | None = None, logits=None):
    """The jitted forward and backward of the loss for these static options.

    ``logits`` is None (the plain loss) or ``(has_bias, softcap, label_smoothing, lse_square_scale,
    return_lse)``.

    * forward ``(hidden, weight, labels[, bias]) -> (loss, lse[, returned lse])``: the per-token
      loss and the ``(N,)`` log-sum-exp, which is all the backward needs besides the inputs (and,
      with ``return_lse``, the lse handed to the caller, 0 where ignored);
    * backward ``(hidden, weight, labels, grad[, grad_lse][, bias], lse) -> (d_hidden, d_weight[, d_bias])``:
      the gradients of ``sum(grad * loss) (+ sum(grad_lse * lse))``.

    The arithmetic is that of ``jax_heads.pallas.pallas_loss``'s rules, so both give the same bits.
    """
    jax = _import_jax()
    import jax.numpy as jnp

    from jax_heads.pallas import grads, loss_coefficients, lse_and_target

    options = _options(interpret, config)
    has_bias, softcap, eps, lam, return_lse = logits or (False, None, 0.0, 0.0, False)

    @jax.jit
    def forward(hidden, weight, labels, *bias):
        valid = labels != ignore_index
        lse, target, *row_sum = lse_and_target(
            hidden, weight, jnp.where(valid, labels, -1), **options,
            **({} if logits is None else {"bias": bias[0] if has_bias else None, "softcap": softcap,
                                          "row_sum": eps > 0}),
        )
        loss = lse - target
        if eps:  # (1 − ε)·nll + ε·(lse − mean of the logits)
            loss = (1.0 - eps) * loss + eps * (lse - row_sum[0] / weight.shape[0])
        if lam:
            loss = loss + lam * jnp.square(lse)
        return (jnp.where(valid, loss, 0.0), lse, *((jnp.where(valid, lse, 0.0),) if return_lse else ()))

    @jax.jit
    def backward(hidden, weight, labels, grad, *rest):
        grad_lse = rest[0] if return_lse else None
        bias, lse = rest[int(return_lse) : -1], rest[-1]
        valid = labels != ignore_index
        # Ignored rows get zero gradient whatever the upstream gradient holds (even NaN).
        g = jnp.where(valid, grad.astype(jnp.float32), 0.0)
        if logits is None:
            return grads(hidden, weight, jnp.where(valid, labels, -1), lse, g, filter_eps=filter_eps, **options)
        coefficients = None
        if eps or lam or return_lse:
            g_lse = None if grad_lse is None else jnp.where(valid, grad_lse.astype(jnp.float32), 0.0)
            g, b, c = loss_coefficients(g, g_lse, lse, label_smoothing=eps, lse_square_scale=lam,
                                        vocab_size=weight.shape[0])
            g = jnp.where(valid, g, 0.0)  # lse may be anything at an ignored row
            coefficients = (b, c)
        return grads(hidden, weight, jnp.where(valid, labels, -1), lse, g, bias=bias[0] if bias else None,
                     softcap=softcap, coefficients=coefficients, filter_eps=filter_eps, **options)

    return forward, backward


@functools.cache
def _shard_programs(interpret: bool, config, softcap: float | None = None, row_sum: bool = False,
                    has_bias: bool = False, coefficients: int = 0):
    """The jitted per-shard forward and backward of the vocabulary-parallel op (``torch_heads.parallel``):
    ``jax_heads.pallas.lse_and_target`` and ``jax_heads.pallas.grads`` (labels are shard-local, -1
    where the token has no target in this shard), for these static options.

    * forward ``(hidden, weight, labels[, bias]) -> (lse, target[, row_sum])``;
    * backward ``(hidden, weight, labels, lse, a[, b[, c]][, bias]) -> (d_hidden, d_weight[, d_bias])``
      with ``coefficients`` (0, 1 or 2) of the per-row ``B``, ``C`` after ``a``.
    """
    jax = _import_jax()
    from jax_heads.pallas import grads, lse_and_target

    options = _options(interpret, config)

    def forward(hidden, weight, labels, *bias):
        return lse_and_target(hidden, weight, labels, bias=bias[0] if has_bias else None, softcap=softcap,
                              row_sum=row_sum, **options)

    def backward(hidden, weight, labels, lse, a, *rest):
        k = (*rest[:coefficients], None)
        return grads(hidden, weight, labels, lse, a, bias=rest[coefficients] if has_bias else None, softcap=softcap,
                     coefficients=(k[0], k[1]) if coefficients else None, **options)

    return jax.jit(forward), jax.jit(backward)


def _tfrt_gpu_client() -> bool:
    """Whether JAX's GPU backend is the TFRT client, whose DLPack views ignore streams
    (``docs/design-torch-on-jax.md``, stream ordering, point 4)."""
    return os.environ.get("XLA_PYTHON_CLIENT_USE_TFRT_GPU_CLIENT", "0").strip() not in ("", "0")


def _call(program, device: torch.device, tensors: tuple[torch.Tensor, ...], *jax_args):
    """``program(*tensors, *jax_args)`` with the tensors handed to JAX zero-copy; returns JAX arrays.

    The caller keeps ``tensors`` referenced until it has handed the results back with ``to_torch``
    (``docs/design-torch-on-jax.md``, stream ordering, point 3a).
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
    def forward(ctx, hidden, weight, labels, bias, programs, return_lse):
        from interop.dlpack import to_torch

        inputs = (hidden, weight, labels) if bias is None else (hidden, weight, labels, bias)
        loss, lse, *returned = _call(programs[0], hidden.device, inputs)
        ctx.save_for_backward(*inputs)
        ctx.lse = lse
        ctx.programs = programs
        ctx.return_lse = return_lse
        return (to_torch(loss), to_torch(returned[0])) if return_lse else to_torch(loss)

    @staticmethod
    def backward(ctx, grad_loss, *grad_lse):
        from interop.dlpack import to_torch

        hidden, weight, labels, *bias = ctx.saved_tensors
        upstream = (grad_loss, *grad_lse) if ctx.return_lse else (grad_loss,)
        # Any upstream layout (a transpose, an expand); an unused returned lse has a zero gradient.
        upstream = tuple(_aligned((torch.zeros_like(grad_loss) if u is None else u).contiguous()) for u in upstream)
        d_hidden, d_weight, *d_bias = _call(
            ctx.programs[1], hidden.device, (hidden, weight, labels, *upstream, *bias), ctx.lse
        )
        # At least one gradient is needed, and handing back either orders torch after the program.
        need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
        return (
            to_torch(d_hidden) if need_hidden else None,
            to_torch(d_weight) if need_weight else None,
            None,
            to_torch(d_bias[0]) if d_bias and need_bias else None,
            None,
            None,
        )


@functools.cache
def _gradient_in_forward_program(ignore_index: int, reduction: str, interpret: bool, config, logits):
    """The jitted ``(hidden, weight, labels[, bias]) -> (loss, d_hidden, d_weight[, d_bias])`` of the reduced
    loss (``jax_heads.pallas.gradient_in_forward_grads``); ``logits`` is ``(has_bias, softcap,
    label_smoothing, lse_square_scale)``."""
    jax = _import_jax()
    from jax_heads.pallas import gradient_in_forward_grads

    has_bias, softcap, eps, lam = logits

    @jax.jit
    def program(hidden, weight, labels, *bias):
        loss, d_hidden, d_weight, d_bias = gradient_in_forward_grads(
            hidden, weight, labels, ignore_index, reduction, bias=bias[0] if has_bias else None, softcap=softcap,
            label_smoothing=eps, lse_square_scale=lam, **_options(interpret, config),
        )
        return (loss, d_hidden, d_weight) if d_bias is None else (loss, d_hidden, d_weight, d_bias)

    return program


class _GradientInForward(torch.autograd.Function):
    """The reduced loss; its forward runs one JAX program that also forms the gradients for an upstream
    of 1, and its backward scales them by the upstream scalar."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, program):
        from interop.dlpack import to_torch

        inputs = (hidden, weight, labels) if bias is None else (hidden, weight, labels, bias)
        loss, *grads = _call(program, hidden.device, inputs)
        # Saved (not attributes) so that torch's version check refuses a second backward through the
        # graph (retain_graph) after the first has scaled them in place.
        ctx.save_for_backward(*(to_torch(g) for g in grads))
        return to_torch(loss)

    @staticmethod
    def backward(ctx, grad):
        grads = ctx.saved_tensors
        # In place: the buffers are this call's alone (their JAX arrays were dropped at the hand-over).
        for g in grads:
            g.mul_(grad)
        need_hidden, need_weight, _, need_bias = ctx.needs_input_grad[:4]
        d_bias = grads[2] if len(grads) == 3 and need_bias else None
        return grads[0] if need_hidden else None, grads[1] if need_weight else None, None, d_bias, None


def pallas_reduced_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    interpret: bool = False,
    config=None,
) -> torch.Tensor:
    """Summed or mean loss of flat inputs on our Pallas kernels, the gradients formed in the forward.

    When a gradient is wanted (grad mode on and an input requiring it), one JAX program
    (``jax_heads.pallas.gradient_in_forward_grads``) returns the loss and the three gradients; the
    backward scales them by the upstream scalar, in place. Otherwise the per-token forward of
    :func:`pallas_loss` runs and is reduced (no gradient work). No ``return_lse`` and no gradient
    filtering: those take :func:`pallas_loss`.

    Args:
        hidden, weight, labels, ignore_index, bias, softcap, label_smoothing, lse_square_scale,
            interpret, config: as for :func:`pallas_loss`.
        reduction: ``"sum"`` or ``"mean"`` (over the non-ignored tokens; 0 when all are ignored).

    Returns:
        A float32 scalar; gradients with respect to ``hidden``, ``weight`` and ``bias`` come back in
        their dtype. A second backward through the same graph raises torch's in-place error.
    """
    wanted = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if not wanted or hidden.shape[0] == 0:
        from torch_heads.functional import reduce_loss

        per_token = pallas_loss(hidden, weight, labels, ignore_index, bias=bias, softcap=softcap,
                                label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
                                interpret=interpret, config=config)
        return reduce_loss(per_token, labels != ignore_index, reduction)
    labels, ignore_index = _int32_labels(labels, ignore_index)
    hidden = _aligned(hidden.contiguous())
    weight = _aligned(weight.contiguous())
    bias = None if bias is None else _aligned(bias.contiguous())
    program = _gradient_in_forward_program(ignore_index, reduction, bool(interpret), config, (
        bias is not None, softcap, float(label_smoothing), float(lse_square_scale)))
    return _GradientInForward.apply(hidden, weight, _aligned(labels), bias, program)


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


def pallas_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    return_lse: bool = False,
    interpret: bool = False,
    config=None,
    filter_eps: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss of flat inputs on our Pallas kernels, through JAX, zero-copy.

    The loss options are those of ``torch_heads.linear_cross_entropy`` (validated by the caller);
    the bias goes to JAX over DLPack as well.

    Args:
        hidden: ``(N, D)`` float16/bfloat16/float32 tensor (CUDA; CPU only with ``interpret``).
        weight: ``(V, D)`` tensor of the same dtype and device.
        labels: ``(N,)`` integer tensor, each in ``[0, V)`` or ``ignore_index`` (validated by the caller).
        ignore_index: label value that gives loss 0 and gradient 0.
        interpret: run the kernels in Pallas interpret mode (CPU tests; slow).
        config: a ``jax_heads.pallas.BlockSizes``; None for its default.
        filter_eps: None for exact gradients; a float turns on the kernel's gradient filtering
            (``jax_heads.pallas.grads``; with ``label_smoothing`` a ``ValueError``).
        bias, softcap, label_smoothing, lse_square_scale, return_lse: the loss options.

    Returns:
        ``(N,)`` float32 loss (with ``return_lse``, ``(loss, lse)``); gradients with respect to
        ``hidden``, ``weight`` and ``bias`` come back in their dtype.
    """
    if filter_eps is not None and label_smoothing:
        from heads_common.options import filter_smoothing_message

        raise ValueError(filter_smoothing_message(filter_eps))
    if hidden.shape[0] == 0:
        loss = ZeroLoss.apply(hidden, weight)
        if bias is not None:
            loss = loss + bias[:0].sum()  # a zero gradient for the bias too
        return (loss, torch.zeros_like(loss)) if return_lse else loss
    labels, ignore_index = _int32_labels(labels, ignore_index)
    # Differentiable copies where needed: JAX gets dense, aligned, row-major memory without copying it.
    hidden = _aligned(hidden.contiguous())
    weight = _aligned(weight.contiguous())
    bias = None if bias is None else _aligned(bias.contiguous())
    logits = (bias is not None, softcap, float(label_smoothing), float(lse_square_scale), bool(return_lse))
    programs = _programs(ignore_index, bool(interpret), config, None if filter_eps is None else float(filter_eps),
                         None if logits == (False, None, 0.0, 0.0, False) else logits)
    return _PallasLinearCrossEntropy.apply(hidden, weight, _aligned(labels), bias, programs, bool(return_lse))


def pallas_shard_lse_target(
    hidden: torch.Tensor, weight: torch.Tensor, local_labels: torch.Tensor, *, bias: torch.Tensor | None = None,
    softcap: float | None = None, row_sum: bool = False, interpret: bool = False, config=None,
) -> tuple[torch.Tensor, ...]:
    """One vocabulary shard's per-token log-sum-exp and target logit, on our Pallas kernels.

    Args:
        hidden: ``(N, D)`` float16/bfloat16/float32 tensor (CUDA; CPU only with ``interpret``).
        weight: ``(V_shard, D)`` shard of the weight, same dtype and device.
        local_labels: ``(N,)`` integer: the target's row of ``weight``, -1 where there is none.
        bias: None or the ``(V_shard,)`` shard of the bias (added to the logits).
        softcap: None or ``c > 0``: the logits are ``c·tanh(z / c)`` (after the bias).
        row_sum: also return the row sum of the (transformed) logits (label smoothing).
        interpret: run the kernels in Pallas interpret mode (CPU tests; slow).
        config: a ``jax_heads.pallas.BlockSizes``; None for its default.

    Returns:
        ``(lse_k, target_k[, row_sum_k])``, ``(N,)`` float32 each; ``target_k`` is 0 where there is no
        target; ``target_k`` and ``row_sum_k`` live in torch's allocator (the caller sums them in
        place over the group).
    """
    n = hidden.shape[0]
    if n == 0 or weight.shape[0] == 0:
        lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
        return (lse, torch.zeros_like(lse), *((torch.zeros_like(lse),) if row_sum else ()))
    from interop.dlpack import to_torch

    programs = _shard_programs(bool(interpret), config, softcap, bool(row_sum), bias is not None)
    labels = local_labels.to(torch.int32).contiguous()
    inputs = (_aligned(hidden.contiguous()), _aligned(weight.contiguous()), _aligned(labels),
              *(() if bias is None else (_aligned(bias.contiguous()),)))
    lse, *sums = _call(programs[0], hidden.device, inputs)
    # The target (and row sum) are summed in place by the caller's collective (NCCL writes on its own
    # stream): give them memory from torch's allocator, which tracks that stream, not views of JAX's buffers.
    return (to_torch(lse), *(to_torch(x).clone() for x in sums))


def pallas_shard_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    local_labels: torch.Tensor,
    lse: torch.Tensor,
    g: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    coefficients: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    interpret: bool = False,
    config=None,
) -> tuple[torch.Tensor, ...]:
    """One vocabulary shard's gradients against the global log-sum-exp, on our Pallas kernels.

    Args:
        hidden, weight, local_labels, bias, softcap: as for :func:`pallas_shard_lse_target`.
        lse: ``(N,)`` float32 global log-sum-exp (any finite value or +inf where ``g`` is 0).
        g: ``(N,)`` float32 upstream gradient, 0 at ignored tokens; with ``coefficients`` the per-row
            ``A`` of ``dL/dz' = p·A − B·[v == y] − C``.
        coefficients: None (``B = A``, ``C = 0``) or ``(B, C)``, ``(N,)`` float32 each (``C`` may be None).
        interpret, config: as for :func:`pallas_shard_lse_target`.

    Returns:
        ``(d_hidden, d_weight[, d_bias])``: this shard's float32 partial ``(N, D)`` of the hidden
        gradient, in memory torch owns (summed in place over the group next; the kernels round it to
        the input dtype first, as in ``jax_heads.parallel``), the shard's ``(V_shard, D)`` weight
        gradient in the weight's dtype and, with a bias, its ``(V_shard,)`` gradient in the bias's dtype.
    """
    if hidden.shape[0] == 0 or weight.shape[0] == 0:
        return (torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device), torch.zeros_like(weight),
                *(() if bias is None else (torch.zeros_like(bias),)))
    from interop.dlpack import to_torch

    rows = () if coefficients is None else tuple(x for x in coefficients if x is not None)
    programs = _shard_programs(bool(interpret), config, softcap, False, bias is not None, len(rows))
    inputs = (
        _aligned(hidden.contiguous()),
        _aligned(weight.contiguous()),
        _aligned(local_labels.to(torch.int32).contiguous()),
        _aligned(lse.to(torch.float32).contiguous()),
        _aligned(g.to(torch.float32).contiguous()),
        *(_aligned(x.to(torch.float32).contiguous()) for x in rows),
        *(() if bias is None else (_aligned(bias.contiguous()),)),
    )
    d_hidden, d_weight, *d_bias = _call(programs[1], hidden.device, inputs)
    return (to_torch(d_hidden).to(torch.float32, copy=True), to_torch(d_weight), *(to_torch(x) for x in d_bias))
