"""Linear cross-entropy on the GPU with our own Pallas kernels.

Read top to bottom: block sizes, the kernels, the public function under ``jax.custom_vjp``,
its forward and backward rules.

Two forward kernels give the same per-split partials: on a Hopper GPU for 16-bit inputs, the
Mosaic GPU kernel of :mod:`jax_heads.mgpu_lce` (TMA loads, WGMMA, a warp-specialised loader; ~15 %
faster at the Gemma-2 head); elsewhere the Triton-backend kernel below (``BlockSizes.forward_kernel``).
The backward kernels are Triton-backend kernels.

Forward (``lce_forward``, Triton kernel): a grid of (token block × vocabulary split). Each program walks the
vocabulary tiles of its split, computes a ``(block_n, block_v)`` tile of logits over all of ``D``
in ``block_d`` steps (float32 accumulation), and keeps an online log-sum-exp (running max and
sum of exponentials) and the target logit. The partial results of the splits are combined
stably in XLA. Splitting the vocabulary fills the GPU when there are few token blocks.

Backward: per vocabulary chunk of ``chunk_v`` rows, the ``lce_grad_logits`` kernel recomputes the
logits tile by tile and writes ``g * (softmax - onehot)`` for that chunk (``(N, chunk_v)`` in the
input dtype, with the chunk's weight-gradient rows at most ``chunk_bytes``, 50 MiB by default); two
matrix products in XLA then add the
chunk's share to ``d_hidden`` (a float32 ``(N, D)`` accumulator) and give ``d_weight`` for the
chunk's rows. 8·N·D·V FLOPs in all (forward + backward), no tokens × vocabulary buffer, no atomics.
See ``docs/kernel-notes.md`` for why this split and what it measured.

Shapes are padded to whole blocks where needed (tokens with ignored labels, ``D`` with zeros,
vocabulary rows masked to ``-inf``), so any ``N``, ``V``, ``D`` works; at aligned shapes (e.g. the
Gemma-2 and Llama-3 heads) nothing is copied. Index arithmetic: kernels index rows and columns,
never ``N × V`` flat offsets; the largest flat offset is into the ``(V, D)`` weight.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jax_heads import mgpu_lce
from jax_heads.mgpu_lce import DEFAULT_MGPU_CONFIG, MOSAIC_DTYPES, MgpuConfig

_NEG_INF = float("-inf")
FORWARD_KERNELS = ("auto", "mosaic", "triton")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile shapes and launch options of the kernels.

    Attributes:
        block_n: tokens per program of the Triton forward (the gradient-logits kernel has
            ``bwd_block_n``; the Mosaic forward ``mosaic.block_n``).
        block_v: vocabulary rows per tile of the Triton forward.
        block_d: hidden-dimension step of the inner product loop (a divisor of the padded ``D``).
        num_warps, num_stages: Triton launch options.
        flat_loop: the Triton forward runs one loop over (vocabulary tile, D step) pairs rather than
            two nested loops (see ``_forward_kernel``).
        min_programs, programs_per_sm: the Triton forward splits the vocabulary until the grid has at
            least ``min_programs`` programs (4 per multiprocessor on a 132-SM Hopper part), then
            picks the split count by whole waves of ``programs_per_sm`` × multiprocessors
            programs (:func:`choose_splits`). ``sm_count``: None asks the first GPU.
        chunk_bytes: the most bytes the buffers of one backward chunk may take: its gradient
            logits ``(N, chunk_v)`` and, twice, its ``(chunk_v, D)`` weight-gradient rows.
        mm_block_d, mm_block_rows, mm_block_k, mm_num_warps, mm_num_stages: tiles and launch
            options of the two block-sparse products of the filtered backward (``d_hidden``:
            ``bwd_block_n × mm_block_d`` per program; ``d_weight``: ``mm_block_rows × mm_block_d``;
            both step through a flagged tile ``mm_block_k`` at a time).
        forward_kernel: ``"triton"`` (the Pallas Triton kernel below), ``"mosaic"`` (the Pallas
            Mosaic GPU kernel of :mod:`jax_heads.mgpu_lce`: TMA, WGMMA, a warp-specialised loader;
            Hopper, bfloat16/float16) or ``"auto"``: Mosaic on a Hopper GPU for 16-bit inputs whose
            padded shapes fit its tiles, outside interpret mode; Triton otherwise. Naming
            ``"mosaic"`` for inputs it cannot take raises. The backward is the same for both.
        mosaic: tiles and pipeline of the Mosaic forward (:class:`jax_heads.mgpu_lce.MgpuConfig`).
        filter_dense_above: filtered backward only. A chunk whose predecessor had more than this
            fraction of its tiles flagged (counting the token blocks that hold a counted row) forms its two products densely (cuBLAS through XLA, the
            unflagged tiles written as zeros) instead of block-sparse: the same values, at the
            dense rate where filtering skips little (peaked softmax). ``0`` makes every chunk dense,
            ``None`` none.
    """

    block_n: int = 128
    block_v: int = 256
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3
    bwd_block_n: int = 128
    bwd_block_v: int = 256
    bwd_block_d: int = 64
    bwd_num_warps: int = 8
    bwd_num_stages: int = 3
    min_programs: int = 528
    programs_per_sm: int = 1
    sm_count: int | None = None
    flat_loop: bool = True
    chunk_bytes: int = 50 * 2**20
    mm_block_d: int = 128
    mm_block_rows: int = 128
    mm_block_k: int = 64
    mm_num_warps: int = 8
    mm_num_stages: int = 3
    filter_dense_above: float | None = 0.5
    forward_kernel: str = "auto"
    mosaic: MgpuConfig = DEFAULT_MGPU_CONFIG


    def __post_init__(self):
        powers = ("block_n", "block_v", "block_d", "bwd_block_n", "bwd_block_v", "bwd_block_d", "mm_block_d",
                  "mm_block_rows", "mm_block_k")
        for name in powers:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"BlockSizes.{name} must be a power of two >= 16, got {value!r}")
        for name in ("num_warps", "num_stages", "bwd_num_warps", "bwd_num_stages", "mm_num_warps", "mm_num_stages",
                     "min_programs", "programs_per_sm", "chunk_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")
        if self.sm_count is not None and (not isinstance(self.sm_count, int) or self.sm_count < 1):
            raise ValueError(f"BlockSizes.sm_count must be None or a positive int, got {self.sm_count!r}")
        dense = self.filter_dense_above
        if dense is not None and (isinstance(dense, bool) or not isinstance(dense, (int, float)) or not 0 <= dense <= 1):
            raise ValueError(f"BlockSizes.filter_dense_above must be None or a number in [0, 1], got {dense!r}")
        if self.forward_kernel not in FORWARD_KERNELS:
            raise ValueError(f"BlockSizes.forward_kernel must be one of {FORWARD_KERNELS}, got {self.forward_kernel!r}")
        if not isinstance(self.mosaic, MgpuConfig):
            raise ValueError(f"BlockSizes.mosaic must be an MgpuConfig, got {type(self.mosaic).__name__}")


DEFAULT_BLOCK_SIZES = BlockSizes()


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _precision(dtype) -> lax.Precision | None:
    # float32 inputs get true float32 products (no tf32), matching the reference to ~1e-6.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _logits_tile(h_ref, w_ref, n0, v0, *, block_n, block_v, block_d, precision):
    """float32 ``(block_n, block_v)`` logits of rows ``n0:`` against vocabulary rows ``v0:``."""
    num_d = h_ref.shape[1] // block_d

    def step(k, acc):
        d0 = pl.multiple_of(k * block_d, block_d)
        h = h_ref[pl.ds(n0, block_n), pl.ds(d0, block_d)]
        w = w_ref[pl.ds(v0, block_v), pl.ds(d0, block_d)]
        return acc + lax.dot_general(
            h, w, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )

    return lax.fori_loop(0, num_d, step, jnp.zeros((block_n, block_v), jnp.float32))


def _forward_kernel(
    h_ref, w_ref, y_ref, m_ref, s_ref, t_ref, *, block_n, block_v, block_d, tiles_per_split, num_tiles,
    vocab_size, precision, flat_loop
):
    """One (token block, vocabulary split): partial max, sum of exp and target logit per token.

    ``flat_loop``: one loop over (tile, D step) pairs instead of a loop over tiles around a loop
    over D steps, so that the compiler's software pipeline does not drain at every tile boundary;
    the online log-sum-exp update runs (under a condition) after each tile's last D step.
    """
    i, split = pl.program_id(0), pl.program_id(1)
    n0 = pl.multiple_of(i * block_n, block_n)
    labels = y_ref[pl.ds(n0, block_n)]
    first = split * tiles_per_split
    count = jnp.minimum(tiles_per_split, num_tiles - first)

    def update(t, logits, m, s, target):
        v0 = (first + t) * block_v
        cols = v0 + lax.broadcasted_iota(jnp.int32, (block_n, block_v), 1)
        if vocab_size % block_v:  # padded vocabulary rows never count
            logits = jnp.where(cols < vocab_size, logits, _NEG_INF)
        target = target + jnp.sum(jnp.where(cols == labels[:, None], logits, 0.0), axis=1)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=1)
        return m_new, s, target

    init = (
        jnp.full((block_n,), _NEG_INF, jnp.float32),
        jnp.zeros((block_n,), jnp.float32),
        jnp.zeros((block_n,), jnp.float32),
    )
    if flat_loop:
        num_d = h_ref.shape[1] // block_d
        zeros = jnp.zeros((block_n, block_v), jnp.float32)

        def step(k, carry):
            acc, m, s, target = carry
            t = k // num_d
            dd = k - t * num_d
            v0 = pl.multiple_of((first + t) * block_v, block_v)
            d0 = pl.multiple_of(dd * block_d, block_d)
            h = h_ref[pl.ds(n0, block_n), pl.ds(d0, block_d)]
            w = w_ref[pl.ds(v0, block_v), pl.ds(d0, block_d)]
            acc = acc + lax.dot_general(
                h, w, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
            )

            def finish(args):
                acc, m, s, target = args
                return (zeros, *update(t, acc, m, s, target))

            return lax.cond(dd == num_d - 1, finish, lambda args: args, (acc, m, s, target))

        _, m, s, target = lax.fori_loop(0, count * num_d, step, (zeros, *init))
    else:

        def tile(t, carry):
            v0 = pl.multiple_of((first + t) * block_v, block_v)
            logits = _logits_tile(
                h_ref, w_ref, n0, v0, block_n=block_n, block_v=block_v, block_d=block_d, precision=precision
            )
            return update(t, logits, *carry)

        m, s, target = lax.fori_loop(0, count, tile, init)
    m_ref[split, pl.ds(n0, block_n)] = m
    s_ref[split, pl.ds(n0, block_n)] = s
    t_ref[split, pl.ds(n0, block_n)] = target


def _grad_logits_kernel(
    bounds_ref, h_ref, w_ref, y_ref, lse_ref, g_ref, *out_refs, block_n, block_v, block_d, vocab_size, precision,
    filter_eps, separate_targets=False,
):
    """One (token block, vocabulary tile) of a chunk: ``g * (softmax - onehot)``.

    The chunk covers vocabulary rows ``start : start + chunk_v`` with ``(lo, start, dense) = bounds_ref``;
    columns below ``lo`` (done by the previous chunk) and at or past the real vocabulary size are
    written as zeros.

    With ``filter_eps`` (gradient filtering) a second output flags the tiles that matter: a tile
    whose ``|softmax - onehot|`` is below ``filter_eps`` everywhere on counted rows (``g != 0``) —
    so it holds no target of a counted row — gets flag 0 and is not written at all; the two
    filtered products read only flagged tiles. With ``separate_targets`` the test is on the
    probabilities alone (``|softmax|`` below ``filter_eps``): a tile holding targets but only small
    probabilities is skipped too, and the caller adds those targets' ``−g`` entries exactly. With
    ``dense`` set, an unflagged tile is written as zeros instead, so that dense products of the
    chunk give the filtered values.
    """
    i, j = pl.program_id(0), pl.program_id(1)
    lo, start = bounds_ref[0], bounds_ref[1]
    n0 = pl.multiple_of(i * block_n, block_n)
    c0 = pl.multiple_of(j * block_v, block_v)
    v0 = start + c0
    logits = _logits_tile(h_ref, w_ref, n0, v0, block_n=block_n, block_v=block_v, block_d=block_d, precision=precision)
    lse = lse_ref[pl.ds(n0, block_n)]
    g = g_ref[pl.ds(n0, block_n)]
    labels = y_ref[pl.ds(n0, block_n)]
    cols = v0 + lax.broadcasted_iota(jnp.int32, (block_n, block_v), 1)
    probs = jnp.exp(logits - lse[:, None])
    diff = probs - jnp.where(cols == labels[:, None], 1.0, 0.0)
    in_vocab = (cols >= lo) & (cols < vocab_size)
    grad = jnp.where(in_vocab, diff * g[:, None], 0.0).astype(out_refs[0].dtype)
    if filter_eps is None:
        out_refs[0][pl.ds(n0, block_n), pl.ds(c0, block_v)] = grad
        return
    out_ref, flag_ref = out_refs
    counted = in_vocab & (g != 0.0)[:, None]  # a NaN upstream gradient counts (NaN != 0)
    value = probs if separate_targets else jnp.abs(diff)
    # "not below eps" rather than ">= eps": a NaN (a non-finite hidden state or upstream gradient)
    # keeps its tile, so it reaches the gradients as in the exact path instead of being skipped.
    big = counted & jnp.logical_not((value < filter_eps) & (g == g)[:, None])
    flag = jnp.max(jnp.where(big, jnp.int32(1), jnp.int32(0)))
    keep = flag > 0
    flag_ref[i, j] = flag

    @pl.when(keep | (bounds_ref[2] != 0))
    def _():
        out_ref[pl.ds(n0, block_n), pl.ds(c0, block_v)] = jnp.where(keep, grad, jnp.zeros_like(grad))


def _filtered_dh_kernel(
    bounds_ref, flag_ref, gl_ref, w_ref, acc_ref, out_ref, *, block_n, block_v, block_k, block_dd, num_tiles,
    precision
):
    """``d_hidden[n-block, d-block] += Σ_tiles G[n-block, tile] @ W[tile, d-block]`` over flagged tiles.

    The accumulator block is read and written only when some tile of the chunk is flagged for this
    token block (the output aliases the accumulator, so an untouched block keeps its value).
    """
    i, k = pl.program_id(0), pl.program_id(1)
    start = bounds_ref[1]
    n0 = pl.multiple_of(i * block_n, block_n)
    d0 = pl.multiple_of(k * block_dd, block_dd)

    def tile(t, acc):
        def add(acc):
            def step(kk, acc):
                c0 = pl.multiple_of(t * block_v + kk * block_k, block_k)
                gt = gl_ref[pl.ds(n0, block_n), pl.ds(c0, block_k)]
                wt = w_ref[pl.ds(pl.multiple_of(start + c0, block_k), block_k), pl.ds(d0, block_dd)]
                return acc + lax.dot_general(
                    gt, wt, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
                )

            return lax.fori_loop(0, block_v // block_k, step, acc)

        return lax.cond(flag_ref[i, t] != 0, add, lambda acc: acc, acc)

    any_flag = lax.fori_loop(0, num_tiles, lambda t, a: jnp.maximum(a, flag_ref[i, t]), jnp.int32(0))

    @pl.when(any_flag != 0)
    def _():
        acc = acc_ref[pl.ds(n0, block_n), pl.ds(d0, block_dd)]
        out_ref[pl.ds(n0, block_n), pl.ds(d0, block_dd)] = lax.fori_loop(0, num_tiles, tile, acc)


def _filtered_dw_kernel(
    flag_ref, gl_ref, h_ref, out_ref, *, block_n, block_rows, block_v, block_k, block_dd, num_blocks, precision
):
    """``d_weight[rows, d-block] = Σ_token-blocks G[block, rows]ᵀ @ H[block, d-block]`` over flagged tiles."""
    r, k = pl.program_id(0), pl.program_id(1)
    c0 = pl.multiple_of(r * block_rows, block_rows)
    d0 = pl.multiple_of(k * block_dd, block_dd)
    t = c0 // block_v

    def block(i, acc):
        def add(acc):
            def step(kk, acc):
                n0 = pl.multiple_of(i * block_n + kk * block_k, block_k)
                gt = gl_ref[pl.ds(n0, block_k), pl.ds(c0, block_rows)]
                ht = h_ref[pl.ds(n0, block_k), pl.ds(d0, block_dd)]
                return acc + lax.dot_general(
                    gt, ht, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
                )

            return lax.fori_loop(0, block_n // block_k, step, acc)

        return lax.cond(flag_ref[i, t] != 0, add, lambda acc: acc, acc)

    acc = lax.fori_loop(0, num_blocks, block, jnp.zeros((block_rows, block_dd), jnp.float32))
    out_ref[pl.ds(c0, block_rows), pl.ds(d0, block_dd)] = acc.astype(out_ref.dtype)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _pick_block_d(d: int, block_d: int) -> int:
    """The largest power of two <= block_d (>= 16) dividing ``d``; ``d`` is padded to 16 first."""
    b = block_d
    while b > 16 and d % b:
        b //= 2
    return b


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static padded geometry of one call."""

    n: int
    v: int
    d: int
    n_pad: int
    v_pad: int
    d_pad: int
    block_n: int
    block_v: int
    block_d: int
    bwd_block_d: int


def plan_for(n: int, v: int, d: int, bs: BlockSizes) -> _Plan:
    block_n = max(bs.block_n, bs.bwd_block_n)
    block_v = max(bs.block_v, bs.bwd_block_v)
    d_pad = _round_up(d, 16)
    if bs.forward_kernel == "mosaic":  # named: pad to its tiles too (multiples of 64, not always powers of two)
        block_n = math.lcm(block_n, bs.mosaic.block_n)
        block_v = math.lcm(block_v, bs.mosaic.block_v)
        d_pad = _round_up(d, math.lcm(16, bs.mosaic.block_k))
    return _Plan(
        n=n,
        v=v,
        d=d,
        n_pad=_round_up(n, block_n),
        v_pad=_round_up(v, block_v),
        d_pad=d_pad,
        block_n=block_n,
        block_v=block_v,
        block_d=_pick_block_d(d_pad, bs.block_d),
        bwd_block_d=_pick_block_d(d_pad, bs.bwd_block_d),
    )


def pad_inputs(hidden, weight, labels, plan: _Plan):
    if plan.n_pad != plan.n or plan.d_pad != plan.d:
        hidden = jnp.pad(hidden, ((0, plan.n_pad - plan.n), (0, plan.d_pad - plan.d)))
    if plan.v_pad != plan.v or plan.d_pad != plan.d:
        weight = jnp.pad(weight, ((0, plan.v_pad - plan.v), (0, plan.d_pad - plan.d)))
    if plan.n_pad != plan.n:
        labels = jnp.pad(labels, (0, plan.n_pad - plan.n), constant_values=-1)
    return hidden, weight, labels


@functools.cache
def _sm_count() -> int:
    """Multiprocessors of the first GPU (132 on an H100/H200 SXM when JAX has no GPU to ask)."""
    try:
        return int(jax.devices("gpu")[0].core_count)
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return 132


def _concurrent_programs(bs: BlockSizes) -> int:
    return bs.programs_per_sm * (bs.sm_count or _sm_count())


def choose_splits(n_blocks: int, num_tiles: int, min_programs: int, slots: int) -> tuple[int, int]:
    """``(splits, tiles_per_split)`` of the forward grid.

    About ``min_programs`` programs where the vocabulary allows (the count of splits is rounded so
    that none is empty, which can land a little below); then, among up to 8× as many
    splits, the fewest whose wave-quantised work ``ceil(programs / slots) · tiles_per_split`` is
    within 2 % of the best (``slots`` programs run at once). Whole waves matter: 576 programs of
    112 tiles on 132 multiprocessors run as 5 waves where 4.4 would do (tile work 15 % above the
    ideal), 2 112 programs of 31 tiles as 16 waves (2 % above).
    """
    lo = max(1, min(num_tiles, -(-min_programs // n_blocks)))

    def cost(s):
        tiles = -(-num_tiles // s)
        s = -(-num_tiles // tiles)  # no empty split
        return -(-(n_blocks * s) // slots) * tiles, s, tiles

    options = [cost(s) for s in range(lo, min(num_tiles, 8 * lo) + 1)]
    best = min(c[0] for c in options)
    _, splits, tiles = min((c for c in options if c[0] <= 1.02 * best), key=lambda c: c[1])
    return splits, tiles


@functools.cache
def _gpu_capabilities() -> tuple[str, ...]:
    """Compute capabilities of JAX's local GPUs (empty without a GPU backend)."""
    try:
        return tuple(str(gpu.compute_capability) for gpu in jax.local_devices(backend="gpu"))
    except (RuntimeError, AttributeError):
        return ()


def _is_hopper() -> bool:
    """Whether JAX has GPUs and every one is a Hopper part (compute capability 9.x): on a host with
    mixed GPUs ``"auto"`` keeps the Triton forward, which runs on any of them."""
    caps = _gpu_capabilities()
    return bool(caps) and all(c.startswith("9") for c in caps)


def _mosaic_reason(dtype, plan: _Plan, bs: BlockSizes) -> str | None:
    """Why the Mosaic forward cannot take these padded inputs, or None."""
    m = bs.mosaic
    if jnp.dtype(dtype) not in MOSAIC_DTYPES:
        return f"it takes bfloat16 or float16 (WGMMA), got {jnp.dtype(dtype).name}"
    if plan.n_pad % m.block_n or plan.v_pad % m.block_v or plan.d_pad % m.block_k:
        return (f"the padded shape (N {plan.n_pad}, V {plan.v_pad}, D {plan.d_pad}) is not a whole number of its "
                f"tiles ({m.block_n}, {m.block_v}, {m.block_k})")
    if plan.v_pad - plan.v >= m.block_v:  # a tile of padding only would make its split's sum NaN
        return (f"the vocabulary is padded by {plan.v_pad - plan.v} rows (to {plan.v_pad}, for the other kernels' "
                f"tiles), a whole {m.block_v}-row tile of its own or more")
    caps = _gpu_capabilities()
    if caps and not _is_hopper():
        return f"it needs a Hopper GPU (compute capability 9.x), found {', '.join(caps)}"
    return None


def forward_kernel_for(dtype, plan: _Plan, bs: BlockSizes, interpret: bool) -> str:
    """The forward kernel that ``bs.forward_kernel`` resolves to for these inputs.

    Args:
        dtype: the inputs' dtype.
        plan: the call's padded geometry (:func:`plan_for`).
        bs: the block sizes; ``bs.forward_kernel`` is ``"auto"``, ``"mosaic"`` or ``"triton"``.
        interpret: Pallas interpret mode.

    Returns:
        ``"mosaic"`` or ``"triton"``. ``"auto"`` gives ``"mosaic"`` for 16-bit inputs whose padded
        shapes fit its tiles, on a host whose GPUs are all Hopper parts, outside interpret mode.

    Raises:
        ValueError: ``"mosaic"`` named for inputs it cannot take (dtype, padding) or on a GPU
            that is not a Hopper part. Without any GPU (lowering with ``jax.export``, interpret
            mode) a named ``"mosaic"`` is kept.
    """
    if bs.forward_kernel == "triton":
        return "triton"
    reason = _mosaic_reason(dtype, plan, bs)
    if bs.forward_kernel == "mosaic":
        if reason is not None:
            raise ValueError(f"forward_kernel='mosaic' cannot run on these inputs: {reason}")
        return "mosaic"
    return "mosaic" if reason is None and not interpret and _is_hopper() else "triton"


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


def _mosaic_interpret_params():
    """Mosaic GPU's interpret-mode parameters (public in jax 0.11, private in 0.10)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def combine_partials(m, s, t):
    """Per-token ``(lse, target logit)`` from the forward's per-split partials ``(splits, n_pad)``.

    The maximum is exact in any order; the two sums run in a fixed order (:func:`_sum_in_fixed_order`).
    """
    m_max = jnp.max(m, axis=0)
    lse = m_max + jnp.log(_sum_in_fixed_order(s * jnp.exp(m - m_max[None, :])))
    return lse, _sum_in_fixed_order(t)


def lce_forward(hidden, weight, labels, *, block_sizes: BlockSizes, plan: _Plan, interpret: bool):
    """Per-token log-sum-exp and target logit of padded inputs, each ``(n_pad,)`` float32.

    The kernel is the Mosaic GPU one or the Triton one (:func:`forward_kernel_for`).
    """
    bs = block_sizes
    if forward_kernel_for(hidden.dtype, plan, bs, interpret) == "mosaic":
        splits, tiles_per_split = mgpu_lce.choose_grid(plan.n_pad, plan.v_pad, bs.mosaic, bs.sm_count or _sm_count())
        mosaic_interpret = _mosaic_interpret_params() if interpret else None
        return combine_partials(*mgpu_lce.mgpu_forward_partials(
            hidden, weight, labels, vocab_size=plan.v, splits=splits, tiles_per_split=tiles_per_split,
            config=bs.mosaic, interpret=mosaic_interpret,
        ))
    n_blocks = plan.n_pad // bs.block_n
    num_tiles = plan.v_pad // bs.block_v
    splits, tiles_per_split = choose_splits(n_blocks, num_tiles, bs.min_programs, _concurrent_programs(bs))
    kernel = functools.partial(
        _forward_kernel,
        block_n=bs.block_n,
        block_v=bs.block_v,
        block_d=plan.block_d,
        tiles_per_split=tiles_per_split,
        num_tiles=num_tiles,
        vocab_size=plan.v,
        precision=_precision(hidden.dtype),
        flat_loop=bs.flat_loop,
    )
    part = jax.ShapeDtypeStruct((splits, plan.n_pad), jnp.float32)
    m, s, t = pl.pallas_call(
        kernel,
        out_shape=(part, part, part),
        grid=(n_blocks, splits),
        compiler_params=_compiler_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="lce_forward",
    )(hidden, weight, labels)
    return combine_partials(m, s, t)


def _chunk_v(plan: _Plan, bs: BlockSizes, itemsize: int) -> int:
    # Per vocabulary row of a chunk: its gradient-logits column (N_pad values) and its d_weight row
    # twice (the chunk's product and the rows it is added to).
    per_row = (plan.n_pad + 2 * plan.d_pad) * itemsize
    rows = (bs.chunk_bytes // per_row) // plan.block_v * plan.block_v
    return int(min(plan.v_pad, max(plan.block_v, rows)))


def lce_backward(
    hidden, weight, labels, lse, g, *, block_sizes: BlockSizes, plan: _Plan, interpret: bool,
    filter_eps: float | None = None, separate_targets: bool = False,
):
    """``(d_hidden, d_weight)`` of padded inputs for per-token upstream gradient ``g`` (0 where ignored).

    The vocabulary is walked in ``ceil(v_pad / chunk_v)`` chunks of ``chunk_v`` rows: per chunk,
    the gradient logits ``G_c`` ``(N_pad, chunk_v)`` in the input dtype, ``d_hidden += G_c @ W_c``
    into a float32 accumulator and ``d_weight[c] += G_cᵀ @ H`` in the weight dtype (the product
    accumulates in float32 and is complete for its rows: every token is in it; the rows start at
    zero, so the addition is exact). When ``chunk_v`` does not divide the vocabulary, the last chunk
    is placed at ``v_pad − chunk_v``, overlapping the one before: its kernel writes zeros for the
    columns already done, which then add nothing to either gradient. Every chunk has one shape, so
    the loop's buffers are all there is (no separate tail buffers).

    Exact (``filter_eps`` None): the two products are XLA (cuBLAS) matrix products. Filtered: the
    gradient-logits kernel also flags the tiles that hold a value ≥ ``filter_eps``, and two Pallas
    kernels form the products from flagged tiles only (block-sparse), skipping the rest; a chunk
    after one with more than ``filter_dense_above`` of its tiles flagged uses the dense products on
    a gradient-logits block whose unflagged tiles are zeros (the same values, the cuBLAS rate). With
    ``separate_targets`` a tile is flagged on its probabilities alone, and the targets that fell in
    unflagged tiles get their ``−g`` entries afterwards, exactly (:func:`_add_skipped_targets`).
    """
    bs = block_sizes
    separate_targets = bool(separate_targets) and filter_eps is not None
    dtype = hidden.dtype
    precision = _precision(dtype)
    chunk_v = _chunk_v(plan, bs, jnp.dtype(dtype).itemsize)
    num_chunks = -(-plan.v_pad // chunk_v)
    tiles = chunk_v // bs.bwd_block_v
    block_dd = _pick_block_d(plan.d_pad, bs.mm_block_d)
    block_rows = min(bs.mm_block_rows, bs.bwd_block_v)
    block_k = min(bs.mm_block_k, bs.bwd_block_v, bs.bwd_block_n)
    n_blocks = plan.n_pad // bs.bwd_block_n

    grad_logits = pl.pallas_call(
        functools.partial(
            _grad_logits_kernel, block_n=bs.bwd_block_n, block_v=bs.bwd_block_v, block_d=plan.bwd_block_d,
            vocab_size=plan.v, precision=precision, filter_eps=filter_eps, separate_targets=separate_targets,
        ),
        out_shape=(
            jax.ShapeDtypeStruct((plan.n_pad, chunk_v), dtype),
            *(() if filter_eps is None else (jax.ShapeDtypeStruct((n_blocks, tiles), jnp.int32),)),
        ),
        grid=(n_blocks, tiles),
        compiler_params=_compiler_params(bs.bwd_num_warps, bs.bwd_num_stages),
        interpret=interpret,
        name="lce_grad_logits" if filter_eps is None else "lce_grad_logits_filtered",
    )
    if filter_eps is not None:
        d_hidden_product = pl.pallas_call(
            functools.partial(
                _filtered_dh_kernel, block_n=bs.bwd_block_n, block_v=bs.bwd_block_v, block_k=block_k,
                block_dd=block_dd, num_tiles=tiles, precision=precision,
            ),
            out_shape=jax.ShapeDtypeStruct((plan.n_pad, plan.d_pad), jnp.float32),
            grid=(n_blocks, plan.d_pad // block_dd),
            input_output_aliases={4: 0},
            compiler_params=_compiler_params(bs.mm_num_warps, bs.mm_num_stages),
            interpret=interpret,
            name="lce_filtered_d_hidden",
        )
        d_weight_product = pl.pallas_call(
            functools.partial(
                _filtered_dw_kernel, block_n=bs.bwd_block_n, block_rows=block_rows, block_v=bs.bwd_block_v,
                block_k=block_k, block_dd=block_dd, num_blocks=n_blocks, precision=precision,
            ),
            out_shape=jax.ShapeDtypeStruct((chunk_v, plan.d_pad), weight.dtype),
            grid=(chunk_v // block_rows, plan.d_pad // block_dd),
            compiler_params=_compiler_params(bs.mm_num_warps, bs.mm_num_stages),
            interpret=interpret,
            name="lce_filtered_d_weight",
        )

    row_block = lax.broadcasted_iota(jnp.int32, labels.shape, 0) // bs.bwd_block_n  # each token's flag row
    dense_above = None if filter_eps is None else bs.filter_dense_above
    if dense_above:  # chunks choose between dense and sparse products at run time
        # Token blocks holding a counted row: the share of flagged tiles is taken over these only (a
        # block of ignored or padding rows is never flagged, and would otherwise dilute the share).
        active_blocks = jnp.any((g != 0).reshape(n_blocks, bs.bwd_block_n), axis=1)
        active_tiles = jnp.maximum(jnp.sum(active_blocks.astype(jnp.float32)), 1.0) * tiles

    def dense_products(gl, start, d_hidden):
        w_chunk = lax.dynamic_slice_in_dim(weight, start, chunk_v, axis=0)
        d_hidden = d_hidden + jnp.dot(gl, w_chunk, preferred_element_type=jnp.float32, precision=precision)
        dw_chunk = lax.dot_general(
            gl, hidden, (((0,), (0,)), ((), ())), preferred_element_type=weight.dtype, precision=precision
        )
        return d_hidden, dw_chunk

    def sparse_products(gl, flags, d_hidden, bounds):
        return d_hidden_product(bounds, flags, gl, weight, d_hidden), d_weight_product(flags, gl, hidden)

    def body(k, carry):
        d_hidden, d_weight, target_kept, dense = carry
        lo = k * chunk_v
        start = jnp.minimum(lo, plan.v_pad - chunk_v)  # the last chunk may overlap the one before
        bounds = jnp.stack([lo, start, dense]).astype(jnp.int32)
        if filter_eps is None:
            (gl,) = grad_logits(bounds, hidden, weight, labels, lse, g)
            d_hidden, dw_chunk = dense_products(gl, start, d_hidden)
        else:
            gl, flags = grad_logits(bounds, hidden, weight, labels, lse, g)
            if dense_above is None:
                d_hidden, dw_chunk = sparse_products(gl, flags, d_hidden, bounds)
            elif dense_above == 0:
                d_hidden, dw_chunk = dense_products(gl, start, d_hidden)
            else:  # chosen from the previous chunk's share of flagged tiles (this one's G is written for it)
                d_hidden, dw_chunk = lax.cond(
                    dense != 0,
                    lambda: dense_products(gl, start, d_hidden),
                    lambda: sparse_products(gl, flags, d_hidden, bounds),
                )
                dense = (jnp.sum(flags.astype(jnp.float32)) / active_tiles > dense_above).astype(jnp.int32)
            if separate_targets:  # was each token's target tile (if in this chunk's new columns) flagged?
                in_chunk = (labels >= lo) & (labels < start + chunk_v)
                tile = jnp.clip((labels - start) // bs.bwd_block_v, 0, tiles - 1)
                target_kept = jnp.where(in_chunk, flags[row_block, tile], target_kept)
        # Rows below `lo` got zero columns of G (done by the previous chunk): adding leaves them as they are.
        old = lax.dynamic_slice_in_dim(d_weight, start, chunk_v, axis=0)
        d_weight = lax.dynamic_update_slice_in_dim(d_weight, old + dw_chunk, start, axis=0)
        return d_hidden, d_weight, target_kept, dense

    init = (
        jnp.zeros((plan.n_pad, plan.d_pad), jnp.float32),
        jnp.zeros((plan.v_pad, plan.d_pad), weight.dtype),
        jnp.ones(labels.shape, jnp.int32),
        jnp.int32(dense_above == 0),  # the first chunk: sparse unless every chunk is dense
    )
    d_hidden, d_weight, target_kept, _ = lax.fori_loop(0, num_chunks, body, init)
    if separate_targets:
        skipped = (labels >= 0) & (labels < plan.v) & (g != 0) & (target_kept == 0)
        d_hidden, d_weight = _add_skipped_targets(
            hidden, weight, labels, jnp.where(skipped, g, 0.0), d_hidden, d_weight, plan, precision
        )
    return d_hidden.astype(dtype), d_weight


def _add_skipped_targets(hidden, weight, labels, g_skipped, d_hidden, d_weight, plan: _Plan, precision, rows=1024):
    """Add ``−g`` at each target whose tile the filter skipped: ``d_hidden[n] −= g_n · W[y_n]``
    (float32 accumulator) and ``d_weight[y_n] −= g_n · h_n``.

    Tokens sharing a target are summed in float32 before the weight row is touched: the tokens are
    sorted by target and walked ``rows`` at a time, each chunk's equal targets segment-summed, and
    each touched row rounded to the weight dtype once per chunk it appears in (a target's tokens are
    contiguous after the sort, so at most ``ceil(count / rows) + 1`` times).
    """
    safe = jnp.clip(labels, 0, plan.v - 1)
    d_hidden = d_hidden - g_skipped[:, None] * weight[safe].astype(jnp.float32)
    sentinel = plan.v_pad  # out of range: dropped by the scatter
    key = jnp.where(g_skipped != 0, safe, sentinel)
    order = jnp.argsort(key)
    pad = -labels.shape[0] % rows
    order = jnp.pad(order, (0, pad))
    keys = jnp.pad(key[order[: labels.shape[0]]], (0, pad), constant_values=sentinel)
    num = order.shape[0] // rows

    def chunk(c, d_weight):
        idx = lax.dynamic_slice_in_dim(order, c * rows, rows)
        k = lax.dynamic_slice_in_dim(keys, c * rows, rows)
        upd = -(g_skipped[idx][:, None] * hidden[idx].astype(jnp.float32))
        first = jnp.concatenate([jnp.ones((1,), bool), k[1:] != k[:-1]])
        seg = jnp.cumsum(first) - 1
        sums = jax.ops.segment_sum(upd, seg, num_segments=rows)
        seg_key = jnp.full((rows,), sentinel, k.dtype).at[seg].set(k)
        current = d_weight.at[seg_key].get(mode="fill", fill_value=0).astype(jnp.float32)
        return d_weight.at[seg_key].set((current + sums).astype(d_weight.dtype), mode="drop")

    return d_hidden, lax.fori_loop(0, num, chunk, d_weight)


def _compiler_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# --------------------------------------------------------------------------------------------
# Public function under custom_vjp
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
    """Static (hashable) options of one call: ignore index, tiles, interpret mode and padded geometry."""

    ignore_index: int
    block_sizes: BlockSizes
    interpret: bool
    plan: _Plan
    filter_eps: float | None = None
    filter_separate_targets: bool = True


def options_for(
    hidden_shape, weight_shape, ignore_index: int, *, interpret: bool = False,
    block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES, filter_eps: float | None = None,
    filter_separate_targets: bool = True,
) -> Options:
    """The :class:`Options` for hidden ``(N, D)`` and weight ``(V, D)`` shapes."""
    plan = plan_for(hidden_shape[0], weight_shape[0], hidden_shape[1], block_sizes)
    eps = None if filter_eps is None else float(filter_eps)
    return Options(int(ignore_index), block_sizes, bool(interpret), plan, eps, bool(filter_separate_targets))


def forward_with_lse(hidden, weight, labels, options: Options):
    """Per-token loss ``(N,)`` and the padded per-token log-sum-exp ``(N_pad,)`` (float32 both).

    The log-sum-exp is all :func:`backward_from_lse` needs besides the inputs.
    """
    plan = options.plan
    hp, wp, yp = pad_inputs(hidden, weight, labels.astype(jnp.int32), plan)
    lse, target = lce_forward(hp, wp, yp, block_sizes=options.block_sizes, plan=plan, interpret=options.interpret)
    loss = jnp.where(labels != options.ignore_index, lse[: plan.n] - target[: plan.n], 0.0)
    return loss, lse


def backward_from_lse(hidden, weight, labels, lse, grad_loss, options: Options):
    """``(d_hidden, d_weight)`` of ``sum(grad_loss * loss)``, from the forward's log-sum-exp.

    The inputs are padded again (a no-op at aligned shapes) rather than kept padded from the
    forward, so no padded copy lives between the two passes.
    """
    plan = options.plan
    hp, wp, yp = pad_inputs(hidden, weight, labels.astype(jnp.int32), plan)
    # Ignored rows get zero gradient whatever the upstream gradient holds (even NaN).
    g = jnp.where(labels != options.ignore_index, grad_loss.astype(jnp.float32), 0.0)
    g = jnp.pad(g, (0, plan.n_pad - plan.n))
    d_hidden, d_weight = lce_backward(
        hp, wp, yp, lse, g, block_sizes=options.block_sizes, plan=plan, interpret=options.interpret,
        filter_eps=options.filter_eps, separate_targets=options.filter_separate_targets,
    )
    return d_hidden[: plan.n, : plan.d], d_weight[: plan.v, : plan.d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lce(hidden, weight, labels, options: Options):
    return forward_with_lse(hidden, weight, labels, options)[0]


def _lce_fwd(hidden, weight, labels, options: Options):
    loss, lse = forward_with_lse(hidden, weight, labels, options)
    return loss, (hidden, weight, labels, lse)


def _lce_bwd(options: Options, residuals, grad_loss):
    hidden, weight, labels, lse = residuals
    return (*backward_from_lse(hidden, weight, labels, lse, grad_loss, options), None)


_lce.defvjp(_lce_fwd, _lce_bwd)


def pallas_loss(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    ignore_index: int,
    *,
    interpret: bool = False,
    block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES,
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
        block_sizes: tile shapes and launch options.
        filter_eps: None for exact gradients (default). A float in (0, 1) turns on gradient
            filtering: backward tiles whose ``|softmax - onehot|`` is below it everywhere (no
            target of a counted token in them) are skipped, as cut-cross-entropy's filter does
            (its default is ``finfo(dtype).eps / 32``: 2⁻¹² for bfloat16). The loss is unchanged;
            the gradients drop those contributions.
        filter_separate_targets: with ``filter_eps``, judge a tile by its probabilities alone
            and add the skipped tiles' target entries (``−g``) exactly afterwards, so a tile that
            holds targets but only small probabilities is skipped as well (on near-uniform
            batches, nearly every tile): the default. False: cut-cross-entropy's rule (a tile
            holding a target is always kept). Gemma-2 head on an H200, near-uniform: 40.3 ms
            forward+backward against 50.1 ms with False and CCE's 47.2 ms (``docs/benchmarks.md``).

    Returns:
        ``(N,)`` float32 loss, differentiable in ``hidden`` and ``weight`` (gradients in their dtype).
    """
    if hidden.shape[0] == 0:
        # No tokens: no grid to launch (and no block count to divide by). The gradients of an
        # empty loss are zeros of the inputs' shapes and dtypes.
        return jnp.zeros((0,), jnp.float32)
    options = options_for(
        hidden.shape, weight.shape, ignore_index, interpret=interpret, block_sizes=block_sizes, filter_eps=filter_eps,
        filter_separate_targets=filter_separate_targets,
    )
    return _lce(hidden, weight, labels, options)


def unsupported_reason(hidden: jax.Array, *, interpret: bool = False) -> str | None:
    """Why the Pallas kernel cannot run on ``hidden``'s platform and dtype, or None."""
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
