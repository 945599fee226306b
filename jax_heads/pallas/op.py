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

from jax_heads.pallas import mosaic_forward, triton_forward
from jax_heads.pallas import plan as geometry  # GPU queries through the module: tests replace them
from jax_heads.pallas.backward import backward
from jax_heads.pallas.config import DEFAULT_BLOCK_SIZES, BlockSizes
from jax_heads.pallas.plan import Plan, pad_inputs, plan_for

# ------------------------------------------------------------------------------------------
# Forward: kernel choice and the combine of split partials
# ------------------------------------------------------------------------------------------


def _mosaic_reason(dtype, plan: Plan, config: BlockSizes) -> str | None:
    """Why the Mosaic forward cannot take these padded inputs, or None."""
    m = config.mosaic
    if jnp.dtype(dtype) not in mosaic_forward.MOSAIC_DTYPES:
        return f"it takes bfloat16 or float16 (WGMMA), got {jnp.dtype(dtype).name}"
    if plan.n_pad % m.block_n or plan.v_pad % m.block_v or plan.d_pad % m.block_k:
        return (f"the padded shape (N {plan.n_pad}, V {plan.v_pad}, D {plan.d_pad}) is not a whole number of its "
                f"tiles ({m.block_n}, {m.block_v}, {m.block_k})")
    if plan.v_pad - plan.v >= m.block_v:  # a tile of padding only would make its split's sum NaN
        return (f"the vocabulary is padded by {plan.v_pad - plan.v} rows (to {plan.v_pad}, for the other kernels' "
                f"tiles), a whole {m.block_v}-row tile of its own or more")
    caps = geometry.gpu_capabilities()
    if caps and not geometry.is_hopper():
        return f"it needs a Hopper GPU (compute capability 9.x), found {', '.join(caps)}"
    return None


def forward_kernel_for(dtype, plan: Plan, config: BlockSizes, interpret: bool) -> str:
    """The forward kernel that ``config.forward_kernel`` resolves to for these inputs.

    Args:
        dtype: the inputs' dtype.
        plan: the call's padded geometry (:func:`jax_heads.pallas.plan.plan_for`).
        config: the block sizes; ``config.forward_kernel`` is ``"auto"``, ``"mosaic"`` or ``"triton"``.
        interpret: Pallas interpret mode.

    Returns:
        ``"mosaic"`` or ``"triton"``. ``"auto"`` gives ``"mosaic"`` for 16-bit inputs whose padded
        shapes fit its tiles, on a host whose GPUs are all Hopper parts, outside interpret mode.

    Raises:
        ValueError: ``"mosaic"`` named for inputs it cannot take (dtype, padding) or on a GPU
            that is not a Hopper part. Without any GPU (lowering with ``jax.export``, interpret
            mode) a named ``"mosaic"`` is kept.
    """
    if config.forward_kernel == "triton":
        return "triton"
    reason = _mosaic_reason(dtype, plan, config)
    if config.forward_kernel == "mosaic":
        if reason is not None:
            raise ValueError(f"forward_kernel='mosaic' cannot run on these inputs: {reason}")
        return "mosaic"
    return "mosaic" if reason is None and not interpret and geometry.is_hopper() else "triton"


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


def combine_partials(m, s, t):
    """Per-token ``(lse, target logit)`` from the forward's per-split partials ``(splits, n_pad)``.

    The maximum is exact in any order; the two sums run in a fixed order (:func:`_sum_in_fixed_order`).
    """
    m_max = jnp.max(m, axis=0)
    lse = m_max + jnp.log(_sum_in_fixed_order(s * jnp.exp(m - m_max[None, :])))
    return lse, _sum_in_fixed_order(t)


def _forward(hidden, weight, labels, *, plan: Plan, config: BlockSizes, interpret: bool):
    """Per-token log-sum-exp and target logit of padded inputs, each ``(n_pad,)`` float32."""
    sm_count = config.sm_count or geometry.sm_count()
    if forward_kernel_for(hidden.dtype, plan, config, interpret) == "mosaic":
        splits, tiles_per_split = mosaic_forward.choose_grid(plan.n_pad, plan.v_pad, config.mosaic, sm_count)
        partials = mosaic_forward.forward_partials(
            hidden, weight, labels, vocab_size=plan.v, splits=splits, tiles_per_split=tiles_per_split,
            config=config.mosaic, interpret=mosaic_forward.interpret_params() if interpret else None,
        )
    else:
        partials = triton_forward.forward_partials(
            hidden, weight, labels, plan=plan, config=config.triton, sm_count=sm_count, interpret=interpret
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


def lse_and_target(
    hidden: jax.Array, weight: jax.Array, labels: jax.Array, *, config: BlockSizes = DEFAULT_BLOCK_SIZES,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Per-token log-sum-exp of ``hidden @ weight.T`` and the target logit, on our kernels.

    Args:
        hidden: ``(N, D)`` float16/bfloat16/float32.
        weight: ``(V, D)``, same dtype.
        labels: ``(N,)`` integer: the target's row of ``weight``; any value outside ``[0, V)`` means
            "no target here" (an ignored token, or a label in another vocabulary shard).
        config: tiles and launch options.
        interpret: run the kernels in Pallas interpret mode (CPU tests).

    Returns:
        ``(lse, target)``, each ``(N,)`` float32; ``target`` is 0 where there is no target. With
        ``N == 0`` or ``V == 0``: ``lse`` is ``-inf`` and ``target`` 0.
    """
    n, v = hidden.shape[0], weight.shape[0]
    if n == 0 or v == 0:  # no grid to launch
        return jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32)
    plan, (hp, wp, yp) = _padded(hidden, weight, labels, config)
    lse, target = _forward(hp, wp, yp, plan=plan, config=config, interpret=interpret)
    return lse[:n], target[:n]


def grads(
    hidden: jax.Array, weight: jax.Array, labels: jax.Array, lse: jax.Array, g: jax.Array, *,
    config: BlockSizes = DEFAULT_BLOCK_SIZES, interpret: bool = False, filter_eps: float | None = None,
    filter_separate_targets: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Gradients of ``sum(g * (lse - target))`` with respect to ``hidden`` and ``weight``, on our kernels.

    Only this ``weight``'s logits are differentiated: against a global ``lse`` over several
    vocabulary shards, ``d_hidden`` is this shard's share.

    Args:
        hidden, weight, labels, config, interpret: as for :func:`lse_and_target`.
        lse: ``(N,)`` float32, the log-sum-exp the softmax is taken against (the global one).
        g: ``(N,)`` float32 upstream gradient, already 0 at ignored tokens.
        filter_eps: None for exact gradients. A float in (0, 1) skips the backward tiles whose
            ``|softmax - onehot|`` is below it everywhere on counted rows (``g != 0``).
        filter_separate_targets: with ``filter_eps``, judge a tile by its probabilities alone and
            add the skipped tiles' target entries (``−g``) exactly afterwards (a tile holding
            targets but only small probabilities is skipped too); False keeps every tile that
            holds a target of a counted row.

    Returns:
        ``(d_hidden (N, D) in hidden's dtype, d_weight (V, D) in weight's dtype)``.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    if n == 0 or v == 0:
        return jnp.zeros_like(hidden), jnp.zeros_like(weight)
    plan, (hp, wp, yp) = _padded(hidden, weight, labels, config)
    pad = (0, plan.n_pad - n)
    d_hidden, d_weight = backward(
        hp, wp, yp, jnp.pad(lse.astype(jnp.float32), pad), jnp.pad(g.astype(jnp.float32), pad), plan=plan,
        config=config, interpret=interpret, filter_eps=None if filter_eps is None else float(filter_eps),
        separate_targets=bool(filter_separate_targets),
    )
    return d_hidden[:n, :d], d_weight[:v, :d]


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _loss(hidden, weight, labels, o: _Options):
    return _loss_fwd(hidden, weight, labels, o)[0]


def _loss_fwd(hidden, weight, labels, o: _Options):
    valid = labels != o.ignore_index
    lse, target = lse_and_target(
        hidden, weight, jnp.where(valid, labels, -1), config=o.config, interpret=o.interpret
    )
    return jnp.where(valid, lse - target, 0.0), (hidden, weight, labels, lse)


def _loss_bwd(o: _Options, residuals, grad_loss):
    hidden, weight, labels, lse = residuals
    valid = labels != o.ignore_index
    # Ignored rows get zero gradient whatever the upstream gradient holds (even NaN).
    g = jnp.where(valid, grad_loss.astype(jnp.float32), 0.0)
    d_hidden, d_weight = grads(
        hidden, weight, jnp.where(valid, labels, -1), lse, g, config=o.config, interpret=o.interpret,
        filter_eps=o.filter_eps, filter_separate_targets=o.filter_separate_targets,
    )
    return d_hidden, d_weight, None


_loss.defvjp(_loss_fwd, _loss_bwd)


def pallas_loss(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    ignore_index: int,
    *,
    interpret: bool = False,
    config: BlockSizes = DEFAULT_BLOCK_SIZES,
    filter_eps: float | None = None,
    filter_separate_targets: bool = True,
) -> jax.Array:
    """Per-token linear cross-entropy of flat inputs on our Pallas kernels.

    Args:
        hidden: ``(N, D)`` float16/bfloat16/float32.
        weight: ``(V, D)``, same dtype.
        labels: ``(N,)`` integer; in ``[0, V)`` or ``ignore_index`` (others give loss ``lse``:
            the caller validates).
        ignore_index: label value with loss 0 and gradient 0.
        interpret: run the kernels in Pallas interpret mode (CPU tests).
        config: tiles and launch options.
        filter_eps: None for exact gradients (default). A float in (0, 1) turns on gradient
            filtering: backward tiles whose ``|softmax - onehot|`` is below it everywhere (no
            target of a counted token in them) are skipped, as cut-cross-entropy's filter does
            (its default is ``finfo(dtype).eps / 32``: 2⁻¹² for bfloat16). The loss is unchanged;
            the gradients drop those contributions.
        filter_separate_targets: with ``filter_eps``, judge a tile by its probabilities alone
            and add the skipped tiles' target entries (``−g``) exactly afterwards, so a tile that
            holds targets but only small probabilities is skipped as well (on near-uniform
            batches, nearly every tile): the default. False: cut-cross-entropy's rule (a tile
            holding a target is always kept). ``docs/benchmarks.md`` compares the two.

    Returns:
        ``(N,)`` float32 loss, differentiable in ``hidden`` and ``weight`` (gradients in their dtype).
    """
    eps = None if filter_eps is None else float(filter_eps)
    options = _Options(int(ignore_index), config, bool(interpret), eps, bool(filter_separate_targets))
    return _loss(hidden, weight, labels, options)


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
