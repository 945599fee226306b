"""The kernels as one operation: forward-kernel choice, the narrow entry, the loss and its support check.

* :func:`lse_and_target` and :func:`grads` are the narrow entry every caller uses (the JAX loss
  below, the JAX vocabulary-parallel op, torch's ``impl="pallas"`` and its vocabulary-parallel
  shards): they pad the inputs to the kernels' tiles, run the kernels and slice the results back.
* :func:`pallas_loss` is the per-token loss under ``jax.custom_vjp``: the forward keeps only the
  ``(N,)`` float32 log-sum-exp for the backward, which recomputes the logits.

Two forward kernels give the same per-split partials: the Mosaic GPU one on Hopper for 16-bit
inputs, the Triton one elsewhere (:func:`forward_kernel_for`). Their partials are combined in a
fixed summation order, so every program that runs them gives the same bits.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from heads_common.options import filter_smoothing_message
from jax_heads.pallas import mosaic_forward, triton_forward
from jax_heads.pallas import plan as geometry  # GPU queries through the module: tests replace them
from jax_heads.pallas.backward import backward
from jax_heads.pallas.config import DEFAULT_BLOCK_SIZES, PLAIN_LOGITS, BlockSizes, LogitOptions
from jax_heads.pallas.plan import Plan, pad_inputs, plan_for
from jax_heads.reference import grad_coefficients

# ------------------------------------------------------------------------------------------
# Forward: kernel choice and the combine of split partials
# ------------------------------------------------------------------------------------------


def _mosaic_reason(dtype, plan: Plan, config: BlockSizes) -> str | None:
    """Why the Mosaic forward cannot take these padded inputs, or None."""
    m = config.mosaic
    if (why := mosaic_forward.dtype_reason(dtype)) is not None:
        return why
    if plan.n_pad % m.block_n or plan.v_pad % m.block_v or plan.d_pad % m.block_k:
        return (f"the padded shape (N {plan.n_pad}, V {plan.v_pad}, D {plan.d_pad}) is not a whole number of its "
                f"tiles ({m.block_n}, {m.block_v}, {m.block_k})")
    if plan.v_pad - plan.v >= m.block_v:  # a tile of padding only would make its split's sum NaN
        return (f"the vocabulary is padded by {plan.v_pad - plan.v} rows (to {plan.v_pad}, for the other kernels' "
                f"tiles), a whole {m.block_v}-row tile of its own or more")
    return geometry.hopper_reason()


def forward_kernel_for(dtype, plan: Plan, config: BlockSizes, interpret: bool, bias_given: bool = False) -> str:
    """The forward kernel that ``config.forward_kernel`` resolves to for these inputs.

    Args:
        dtype: the inputs' dtype.
        plan: the call's padded geometry (:func:`jax_heads.pallas.plan.plan_for`).
        config: the block sizes; ``config.forward_kernel`` is ``"auto"``, ``"mosaic"`` or ``"triton"``.
        interpret: Pallas interpret mode.
        bias_given: a bias is given. The Mosaic forward takes the bias, the softcap and the row sum
            on the GPU; in interpret mode it does not take a bias (:data:`MOSAIC_BIAS_INTERPRET_REASON`).

    Returns:
        ``"mosaic"`` or ``"triton"``. ``"auto"`` gives ``"mosaic"`` for 16-bit inputs whose padded
        shapes fit its tiles, on a host whose GPUs are all Hopper parts, outside interpret mode.

    Raises:
        ValueError: ``"mosaic"`` named for inputs it cannot take (dtype, padding, a bias in interpret
            mode) or on a GPU that is not a Hopper part. Without any GPU (lowering with ``jax.export``,
            interpret mode) a named ``"mosaic"`` is kept.
    """
    def reason():
        why = _mosaic_reason(dtype, plan, config)
        return MOSAIC_BIAS_INTERPRET_REASON if why is None and bias_given and interpret else why

    return geometry.resolve_kernel("forward_kernel", config.forward_kernel, reason, interpret, "triton")


# Why a bias is not run through the Mosaic forward in interpret mode (docs/loss-options.md): jax 0.10's
# Mosaic GPU interpreter deadlocks on the bias path for some grids (one simulated warpgroup never starts).
MOSAIC_BIAS_INTERPRET_REASON = (
    "the bias path runs on the GPU only (jax's Mosaic GPU interpreter can deadlock on it); "
    "use forward_kernel='triton' or 'auto' in interpret mode"
)


def _sum_in_fixed_order(x):
    """``x.sum(axis=0)`` as a pairwise tree of elementwise adds of static slices.

    A reduction's summation order is the compiler's choice and can differ between two programs
    that fuse it differently (the torch path's jitted forward and JAX's own); elementwise adds in
    a fixed tree give the same bits in both.
    """
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        pairs = x[:half] + x[half : 2 * half]
        x = pairs if x.shape[0] % 2 == 0 else jnp.concatenate([pairs, x[2 * half :]])
    return x[0]


def combine_partials(m, s, t, *row_sum):
    """Per-token ``(lse, target logit[, row sum])`` from the forward's per-split partials ``(splits, n_pad)``.

    The maximum is exact in any order; the sums run in a fixed order (:func:`_sum_in_fixed_order`).
    """
    m_max = jnp.max(m, axis=0)
    lse = m_max + jnp.log(_sum_in_fixed_order(s * jnp.exp(m - m_max[None, :])))
    return lse, _sum_in_fixed_order(t), *(_sum_in_fixed_order(r) for r in row_sum)


def _forward(hidden, weight, labels, *, plan: Plan, config: BlockSizes, interpret: bool, bias=None,
             options: LogitOptions = PLAIN_LOGITS):
    """Per-token log-sum-exp and target logit (and row sum) of padded inputs, each ``(n_pad,)`` float32."""
    sm_count = config.sm_count or geometry.sm_count()
    given = bias is not None or options != PLAIN_LOGITS
    if forward_kernel_for(hidden.dtype, plan, config, interpret, bias is not None) == "mosaic":
        splits, tiles_per_split = mosaic_forward.choose_grid(plan.n_pad, plan.v_pad, config.mosaic, sm_count)
        partials = mosaic_forward.forward_partials(
            hidden, weight, labels, vocab_size=plan.v, splits=splits, tiles_per_split=tiles_per_split,
            config=config.mosaic, interpret=mosaic_forward.interpret_params() if interpret else None,
            **({"bias": bias, "options": options} if given else {}),
        )
    else:
        partials = triton_forward.forward_partials(
            hidden, weight, labels, plan=plan, config=config.triton, sm_count=sm_count, interpret=interpret,
            bias=bias, options=options,
        )
    return combine_partials(*partials)


# ------------------------------------------------------------------------------------------
# The narrow entry
# ------------------------------------------------------------------------------------------


def _padded(hidden, weight, labels, config: BlockSizes):
    """The plan and the padded inputs; labels outside ``[0, V)`` become -1 (no column matches)."""
    n, d = hidden.shape
    v = weight.shape[0]
    plan = plan_for(n, v, d, config)
    labels = jnp.where((labels >= 0) & (labels < v), labels, -1).astype(jnp.int32)
    return plan, pad_inputs(hidden, weight, labels, plan)


def _padded_bias(bias, plan: Plan):
    return None if bias is None else jnp.pad(bias.astype(jnp.float32), (0, plan.v_pad - plan.v))


def lse_and_target(
    hidden: jax.Array, weight: jax.Array, labels: jax.Array, *, bias: jax.Array | None = None,
    softcap: float | None = None, row_sum: bool = False, config: BlockSizes = DEFAULT_BLOCK_SIZES,
    interpret: bool = False,
) -> tuple[jax.Array, ...]:
    """Per-token log-sum-exp of the logits ``hidden @ weight.T (+ bias)`` and the target logit, on our kernels.

    Args:
        hidden: ``(N, D)`` float16/bfloat16/float32.
        weight: ``(V, D)``, same dtype.
        labels: ``(N,)`` integer: the target's row of ``weight``; any value outside ``[0, V)`` means
            "no target here" (an ignored token, or a label in another vocabulary shard).
        bias: None or ``(V,)``, added to the logits (in float32).
        softcap: None or ``c > 0``: the logits are ``c·tanh(z / c)`` (after the bias).
        row_sum: also return each row's sum of the (transformed) logits over the vocabulary,
            accumulated in the same pass (label smoothing needs it).
        config: tiles and launch options.
        interpret: run the kernels in Pallas interpret mode (CPU tests).

    Returns:
        ``(lse, target)``, each ``(N,)`` float32 (``(lse, target, row_sum)`` with ``row_sum``);
        ``target`` is 0 where there is no target. With ``N == 0`` or ``V == 0``: ``lse`` is
        ``-inf``, ``target`` and ``row_sum`` 0.

    Raises:
        ValueError: a bad ``softcap``/``row_sum``, or a named Mosaic forward that cannot take them.
    """
    options = LogitOptions(softcap, row_sum)
    n, v = hidden.shape[0], weight.shape[0]
    if n == 0 or v == 0:  # no grid to launch
        zeros = jnp.zeros((n,), jnp.float32)
        return jnp.full((n,), -jnp.inf, jnp.float32), zeros, *((zeros,) if row_sum else ())
    plan, (hp, wp, yp) = _padded(hidden, weight, labels, config)
    out = _forward(hp, wp, yp, plan=plan, config=config, interpret=interpret, bias=_padded_bias(bias, plan),
                   options=options)
    return tuple(x[:n] for x in out)


def loss_coefficients(g, g_lse, lse, *, label_smoothing: float, lse_square_scale: float, vocab_size: int):
    """Per-row coefficients ``(A, B, C)`` of ``dL/dz' = p·A − B·onehot − C`` for the loss options.

    ``A = g·(1 + 2λ·lse) + g_lse``, ``B = g·(1 − ε)``, ``C = g·ε / V`` (``ε`` label smoothing, ``λ``
    the z-loss scale, ``V`` the whole vocabulary's size). ``g``, ``g_lse`` (or None) and ``lse`` are
    ``(N,)`` float32; ``C`` is None without smoothing. Rows the caller ignores must be zeroed in the
    results (``lse`` may be anything there).
    """
    a, b, c = grad_coefficients(g, g_lse, lse, vocab_size, label_smoothing, lse_square_scale)
    return a, (g if b is None else b), c  # the kernels take B whenever they take coefficients


def grads(
    hidden: jax.Array, weight: jax.Array, labels: jax.Array, lse: jax.Array, g: jax.Array, *,
    bias: jax.Array | None = None, softcap: float | None = None, coefficients=None,
    config: BlockSizes = DEFAULT_BLOCK_SIZES, interpret: bool = False, filter_eps: float | None = None,
    filter_separate_targets: bool = True,
) -> tuple[jax.Array, ...]:
    """Gradients of ``sum(g * (lse - target))`` in ``hidden``, ``weight`` (and ``bias``), on our kernels.

    Only this ``weight``'s logits are differentiated: against a global ``lse`` over several
    vocabulary shards, ``d_hidden`` is this shard's share. With ``coefficients`` the gradient of the
    logits (after the softcap) is the general ``p·A − B·onehot − C`` (:func:`loss_coefficients`).

    Args:
        hidden, weight, labels, bias, softcap, config, interpret: as for :func:`lse_and_target`.
        lse: ``(N,)`` float32, the log-sum-exp the softmax is taken against (the global one).
        g: ``(N,)`` float32 upstream gradient, already 0 at ignored tokens (with ``coefficients``: A).
        coefficients: None (``A = B = g``, ``C = 0``) or ``(B, C)``: ``(N,)`` float32 each, 0 at
            ignored tokens; ``C`` may be None (0).
        filter_eps: None for exact gradients. A float in (0, 1) skips the backward tiles whose
            ``|softmax - onehot|`` is below it everywhere on counted rows (``g != 0``); the
            softmax of the transformed logits.
        filter_separate_targets: with ``filter_eps``, judge a tile by its probabilities alone and
            add the skipped tiles' target entries (``−g``, or ``−B``) exactly afterwards (a tile
            holding targets but only small probabilities is skipped too); False keeps every tile
            that holds a target of a counted row.

    Returns:
        ``(d_hidden (N, D) in hidden's dtype, d_weight (V, D) in weight's dtype)``, and with
        ``bias`` a third, ``d_bias (V,)`` in bias's dtype.

    Raises:
        ValueError: ``filter_eps`` with a ``C`` (label smoothing makes every entry non-zero).
    """
    if coefficients is not None and coefficients[1] is not None and filter_eps is not None:
        raise ValueError(filter_smoothing_message(filter_eps))
    n, d = hidden.shape
    v = weight.shape[0]
    if n == 0 or v == 0:
        return jnp.zeros_like(hidden), jnp.zeros_like(weight), *(() if bias is None else (jnp.zeros_like(bias),))
    plan, (hp, wp, yp) = _padded(hidden, weight, labels, config)
    pad = (0, plan.n_pad - n)
    f32 = lambda x: jnp.pad(x.astype(jnp.float32), pad)  # noqa: E731
    if coefficients is not None:
        b, c = coefficients
        coefficients = (f32(b), None if c is None else f32(c))
    d_hidden, d_weight, *d_bias = backward(
        hp, wp, yp, f32(lse), f32(g), plan=plan, config=config, interpret=interpret,
        filter_eps=None if filter_eps is None else float(filter_eps), separate_targets=bool(filter_separate_targets),
        coefficients=coefficients, bias=_padded_bias(bias, plan), softcap=LogitOptions(softcap).softcap,
    )
    return d_hidden[:n, :d], d_weight[:v, :d], *(x[:v].astype(bias.dtype) for x in d_bias)


# ------------------------------------------------------------------------------------------
# The loss under custom_vjp
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
    """Static (hashable) options of one :func:`pallas_loss` call."""

    ignore_index: int
    config: BlockSizes
    interpret: bool
    filter_eps: float | None
    filter_separate_targets: bool
    softcap: float | None = None
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    return_lse: bool = False


SECOND_ORDER_MESSAGE = (
    "impl='pallas' can be differentiated once only (its backward runs kernels that have no derivative of their "
    "own); for higher-order derivatives use impl='chunked' or impl='reference'"
)


def _first_order_only(fn):
    """``fn`` under a ``custom_vjp`` whose rule raises :data:`SECOND_ORDER_MESSAGE`: the kernels' results
    are never differentiated (which would fail deep inside JAX)."""

    @jax.custom_vjp
    def call(*args):
        return fn(*args)

    def bwd(residuals, cotangent):
        raise NotImplementedError(SECOND_ORDER_MESSAGE)

    call.defvjp(lambda *args: (fn(*args), None), bwd)
    return call


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loss(hidden, weight, labels, bias, o: _Options):
    return _loss_fwd(hidden, weight, labels, bias, o)[0]


def _loss_fwd(hidden, weight, labels, bias, o: _Options):
    valid = labels != o.ignore_index
    eps, lam = o.label_smoothing, o.lse_square_scale
    forward = functools.partial(lse_and_target, softcap=o.softcap, row_sum=eps > 0, config=o.config,
                                interpret=o.interpret)
    lse, target, *row_sum = _first_order_only(lambda h, w, y, b: forward(h, w, y, bias=b))(
        hidden, weight, jnp.where(valid, labels, -1), bias
    )
    loss = lse - target
    if eps:  # (1 − ε)·nll + ε·(lse − mean of the logits)
        loss = (1.0 - eps) * loss + eps * (lse - row_sum[0] / weight.shape[0])
    if lam:
        loss = loss + lam * jnp.square(lse)
    loss = jnp.where(valid, loss, 0.0)
    out = (loss, jnp.where(valid, lse, 0.0)) if o.return_lse else loss
    return out, (hidden, weight, labels, bias, lse)


def _loss_bwd(o: _Options, residuals, cotangent):
    hidden, weight, labels, bias, lse = residuals
    grad_loss, grad_lse = cotangent if o.return_lse else (cotangent, None)
    valid = labels != o.ignore_index
    # Ignored rows get zero gradient whatever the upstream gradient holds (even NaN).
    g = jnp.where(valid, grad_loss.astype(jnp.float32), 0.0)
    coefficients = None
    if o.label_smoothing or o.lse_square_scale or o.return_lse:
        g_lse = None if grad_lse is None else jnp.where(valid, grad_lse.astype(jnp.float32), 0.0)
        g, b, c = loss_coefficients(g, g_lse, lse, label_smoothing=o.label_smoothing,
                                    lse_square_scale=o.lse_square_scale, vocab_size=weight.shape[0])
        g = jnp.where(valid, g, 0.0)  # lse may be anything at an ignored row
        coefficients = (b, c)
    backward_ = functools.partial(
        grads, softcap=o.softcap, config=o.config, interpret=o.interpret, filter_eps=o.filter_eps,
        filter_separate_targets=o.filter_separate_targets,
    )
    d_hidden, d_weight, *d_bias = _first_order_only(
        lambda h, w, y, m, a, k, b: backward_(h, w, y, m, a, coefficients=k, bias=b)
    )(hidden, weight, jnp.where(valid, labels, -1), lse, g, coefficients, bias)
    return d_hidden, d_weight, None, (d_bias[0] if d_bias else None)


_loss.defvjp(_loss_fwd, _loss_bwd)


def pallas_loss(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    ignore_index: int,
    *,
    bias: jax.Array | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    return_lse: bool = False,
    interpret: bool = False,
    config: BlockSizes = DEFAULT_BLOCK_SIZES,
    filter_eps: float | None = None,
    filter_separate_targets: bool = True,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Per-token linear cross-entropy of flat inputs on our Pallas kernels.

    The loss options follow ``jax_heads.linear_cross_entropy``: logits ``z = h·wᵀ + bias``, then
    ``z' = softcap·tanh(z / softcap)``; per counted token ``(1 − ε)·(lse − z'_y) + ε·(lse − mean z')
    + λ·lse²``.

    Args:
        hidden: ``(N, D)`` float16/bfloat16/float32.
        weight: ``(V, D)``, same dtype.
        labels: ``(N,)`` integer; in ``[0, V)`` or ``ignore_index`` (others give loss ``lse``:
            the caller validates).
        ignore_index: label value with loss 0 and gradient 0.
        bias: None or ``(V,)`` of the weight's dtype; differentiable.
        softcap: None or ``c > 0``.
        label_smoothing: ``ε`` in ``[0, 1)`` (the caller validates).
        lse_square_scale: ``λ >= 0``, the z-loss.
        return_lse: also return the ``(N,)`` float32 log-sum-exp (0 where ignored), differentiable.
        interpret: run the kernels in Pallas interpret mode (CPU tests).
        config: tiles and launch options.
        filter_eps: None for exact gradients (default). A float in (0, 1) turns on gradient
            filtering: backward tiles whose ``|softmax - onehot|`` is below it everywhere (no
            target of a counted token in them) are skipped, as cut-cross-entropy's filter does
            (its default is ``finfo(dtype).eps / 32``: 2⁻¹² for bfloat16). The loss is unchanged;
            the gradients drop those contributions. With a softcap or a bias the softmax is that of
            the transformed logits; not with label smoothing.
        filter_separate_targets: with ``filter_eps``, judge a tile by its probabilities alone
            and add the skipped tiles' target entries (``−g``) exactly afterwards, so a tile that
            holds targets but only small probabilities is skipped as well (on near-uniform
            batches, nearly every tile): the default. False: cut-cross-entropy's rule (a tile
            holding a target is always kept). ``docs/benchmarks.md`` compares the two.

    Returns:
        ``(N,)`` float32 loss, differentiable once in ``hidden``, ``weight`` and ``bias`` (gradients
        in their dtype); with ``return_lse``, ``(loss, lse)``.

    Raises:
        ValueError: ``filter_eps`` with ``label_smoothing`` (:func:`heads_common.options.filter_smoothing_message`).
        NotImplementedError: when differentiated a second time (use ``impl='chunked'`` or ``'reference'``).
    """
    eps = None if filter_eps is None else float(filter_eps)
    if eps is not None and label_smoothing:
        raise ValueError(filter_smoothing_message(eps))
    options = _Options(int(ignore_index), config, bool(interpret), eps, bool(filter_separate_targets),
                       LogitOptions(softcap).softcap, float(label_smoothing), float(lse_square_scale),
                       bool(return_lse))
    return _loss(hidden, weight, labels, bias, options)


def unsupported_reason(hidden: jax.Array, *, interpret: bool = False) -> str | None:
    """Why the Pallas kernels cannot run on ``hidden``'s platform and dtype, or None."""
    dtype = jnp.dtype(hidden.dtype)
    if dtype not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        return f"supports float16/bfloat16/float32, got {dtype}"
    if interpret:
        return None
    platforms = {dev.platform for dev in _devices_of(hidden)}
    if platforms != {"gpu"}:
        return f"needs a GPU (got platform {sorted(platforms)}); pass interpret=True to run in Pallas interpret mode"
    return None


def _devices_of(x) -> set:
    try:
        return set(x.devices())
    except (AttributeError, jax.errors.ConcretizationTypeError):
        # A tracer: judge by the default backend the computation will run on.
        return set(jax.devices()[:1])
