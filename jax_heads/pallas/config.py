"""Tile shapes and launch options of the Pallas kernels: one frozen dataclass per kernel.

Every class validates itself on construction (``ValueError`` naming the class, the field and the
value). The defaults are the tuned ones (``docs/kernel-notes.md``). :class:`BlockSizes` bundles the
four with the choice of forward kernel; it is hashable, so it can be a static argument of ``jit``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

FORWARD_KERNELS = ("auto", "mosaic", "triton")
BACKWARD_KERNELS = FORWARD_KERNELS
LOGITS_KERNELS = ("auto", "mosaic", "xla")
# The Mosaic forward runs two compute warpgroups per CTA, plus one that issues the TMA loads.
COMPUTE_WARPGROUPS = 2
# Shared memory per block on Hopper (227 KiB usable by one CTA).
SMEM_LIMIT = 227 * 1024


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_powers_of_two(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not _is_int(value) or value < 16 or value & (value - 1):
            raise ValueError(f"{type(config).__name__}.{name} must be a power of two >= 16, got {value!r}")


def _check_positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            raise ValueError(f"{type(config).__name__}.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class LogitOptions:
    """Static options of the logits inside the kernels; the defaults are the plain logits ``h · wᵀ (+ bias)``.

    Attributes:
        softcap: None, or ``c > 0``: every kernel uses ``c·tanh(z / c)`` of the logits ``z`` (after the bias).
        row_sum: the forward also returns each row's sum of the (transformed) logits over the
            vocabulary (label smoothing needs it), accumulated in the same pass.
    """

    softcap: float | None = None
    row_sum: bool = False

    def __post_init__(self):
        c = self.softcap
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < float("inf")):
            raise ValueError(f"LogitOptions.softcap must be None or a finite float > 0, got {c!r}")
        if not isinstance(self.row_sum, bool):
            raise ValueError(f"LogitOptions.row_sum must be a bool, got {self.row_sum!r}")
        if c is not None:
            object.__setattr__(self, "softcap", float(c))


PLAIN_LOGITS = LogitOptions()


@dataclasses.dataclass(frozen=True)
class TritonForwardConfig:
    """The Triton-backend forward (``triton_forward.py``).

    Attributes:
        block_n: tokens per program.
        block_v: vocabulary rows per tile.
        block_d: hidden-dimension step of the product loop (a divisor of the padded ``D`` is used).
        num_warps, num_stages: Triton launch options.
        min_programs, programs_per_sm: the vocabulary is split until the grid has at least
            ``min_programs`` programs, then the split count is picked by whole waves of
            ``programs_per_sm`` × multiprocessors programs (:func:`jax_heads.pallas.plan.choose_splits`).
    """

    block_n: int = 128
    block_v: int = 256
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3
    min_programs: int = 528
    programs_per_sm: int = 1

    def __post_init__(self):
        _check_powers_of_two(self, "block_n", "block_v", "block_d")
        _check_positive(self, "num_warps", "num_stages", "min_programs", "programs_per_sm")


@dataclasses.dataclass(frozen=True)
class MosaicForwardConfig:
    """The Mosaic GPU forward (``mosaic_forward.py``; Hopper, TMA + WGMMA, warp specialised).

    Attributes:
        block_n: tokens per CTA; each of the two compute warpgroups owns ``block_n // 2`` rows (a
            multiple of 64: that many ``m64`` WGMMA row blocks, within the register budget).
        block_v: vocabulary rows per tile (the WGMMA ``N``; a multiple of 64, at most 256).
        block_k: hidden-dimension step of the pipeline (a multiple of 64; ``D`` is padded to it).
        max_concurrent_steps: shared-memory slots of the TMA pipeline (>= 2).
        compute_registers, memory_registers: ``setmaxnreg`` targets of the two kinds of warpgroup.
        approx_math: fast approximate ``ex2`` / reciprocal (``CompilerParams.approx_math``).
        min_programs: :func:`jax_heads.pallas.mosaic_forward.choose_grid` splits the vocabulary until
            the grid has at least this many CTAs (one CTA per multiprocessor fits in shared memory).
    """

    block_n: int = 128
    block_v: int = 256
    block_k: int = 64
    max_concurrent_steps: int = 3
    compute_registers: int = 232
    memory_registers: int = 40
    approx_math: bool = True
    min_programs: int = 132

    def __post_init__(self):
        name = type(self).__name__
        _check_positive(self, "block_n", "block_v", "block_k", "max_concurrent_steps", "compute_registers",
                        "memory_registers", "min_programs")
        if self.block_n % (64 * COMPUTE_WARPGROUPS):
            raise ValueError(f"{name}.block_n must be a multiple of {64 * COMPUTE_WARPGROUPS}, got {self.block_n}")
        if self.block_v % 64 or self.block_v > 256:
            raise ValueError(f"{name}.block_v must be a multiple of 64 and at most 256, got {self.block_v}")
        if self.block_k % 64:
            raise ValueError(f"{name}.block_k must be a multiple of 64, got {self.block_k}")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"{name}.max_concurrent_steps must be >= 2, got {self.max_concurrent_steps}")
        if self.wg_rows * self.block_v > 128 * 128:
            raise ValueError(
                f"{name}.block_n, block_v: the float32 accumulator of a compute warpgroup, ({self.wg_rows}, "
                f"{self.block_v}), exceeds 128 registers per thread (rows * block_v must be <= 16384)")
        for field in ("compute_registers", "memory_registers"):
            value = getattr(self, field)
            if value % 8 or not 24 <= value <= 256:
                raise ValueError(f"{name}.{field} must be a multiple of 8 in [24, 256], got {value}")
        total = 128 * (COMPUTE_WARPGROUPS * self.compute_registers + self.memory_registers)
        if total > 65536:
            raise ValueError(
                f"{name}.compute_registers, memory_registers: {COMPUTE_WARPGROUPS} x {self.compute_registers} + "
                f"{self.memory_registers} registers per thread exceed the 64K register file ({total} > 65536)")
        if self.smem_bytes(jnp.bfloat16) > SMEM_LIMIT:
            raise ValueError(
                f"{name}.max_concurrent_steps: {self.max_concurrent_steps} pipeline slots of ({self.block_n} + "
                f"{self.block_v}) x {self.block_k} bf16 need {self.smem_bytes(jnp.bfloat16)} bytes of shared "
                f"memory (> {SMEM_LIMIT}); lower max_concurrent_steps or the tiles")

    @property
    def wg_rows(self) -> int:
        """Token rows per compute warpgroup."""
        return self.block_n // COMPUTE_WARPGROUPS

    def smem_bytes(self, dtype) -> int:
        """Shared memory of one CTA: pipeline slots, labels and the three output row vectors."""
        item = jnp.dtype(dtype).itemsize
        slots = self.max_concurrent_steps * (self.block_n + self.block_v) * self.block_k * item
        return slots + 4 * self.block_n * 4 + 1024


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """The gradient-logits kernel and its chunk loop (``backward.py``).

    Attributes:
        block_n, block_v: tokens and vocabulary rows per program (one tile of gradient logits).
        block_d: hidden-dimension step of the logits recompute (a divisor of the padded ``D`` is used).
        num_warps, num_stages: Triton launch options.
        chunk_bytes: the most bytes the buffers of one vocabulary chunk may take: its gradient
            logits ``(N, chunk_v)`` and one ``(chunk_v, D)`` buffer (the weight rows' copy read by
            the ``d_hidden`` product, then the chunk's ``d_weight`` product: the two products are
            ordered so that they share it).
        chunk_multiple: ``chunk_v`` is rounded down to a multiple of this where it is whole tiles
            and the budget holds one (:func:`jax_heads.pallas.backward.chunk_v_for`): the kernel's
            grid per chunk is then whole waves more often (``docs/kernel-notes.md`` has the measurement).
    """

    block_n: int = 128
    block_v: int = 256
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3
    chunk_bytes: int = 56 * 2**20
    chunk_multiple: int = 1024

    def __post_init__(self):
        _check_powers_of_two(self, "block_n", "block_v", "block_d")
        _check_positive(self, "num_warps", "num_stages", "chunk_bytes", "chunk_multiple")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """The two block-sparse products of the filtered backward (``filtered.py``).

    Attributes:
        block_d: hidden-dimension columns per program of both products.
        block_rows: weight-gradient rows per program of the ``d_weight`` product.
        block_k: both products step through a flagged tile this many rows/columns at a time.
        num_warps, num_stages: Triton launch options.
        dense_above: a chunk whose predecessor had more than this fraction of its tiles flagged
            (counting the token blocks that hold a counted row) forms its two products densely
            (XLA products, the unflagged tiles written as zeros) instead of block-sparse: the same
            values, at the dense rate where filtering skips little. ``0`` makes every chunk dense,
            ``None`` none.
    """

    block_d: int = 128
    block_rows: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    dense_above: float | None = 0.5

    def __post_init__(self):
        _check_powers_of_two(self, "block_d", "block_rows", "block_k")
        _check_positive(self, "num_warps", "num_stages")
        dense = self.dense_above
        number = isinstance(dense, (int, float)) and not isinstance(dense, bool)
        if dense is not None and not (number and 0 <= dense <= 1):
            raise ValueError(f"FilterConfig.dense_above must be None or a number in [0, 1], got {dense!r}")


@dataclasses.dataclass(frozen=True)
class GradientInForwardConfig:
    """The gradient-in-forward path of the reductions ``"sum"``/``"mean"`` (``gradient_in_forward.py``).

    Attributes:
        logits_budget_bytes: the most bytes of one token chunk's logits buffer, ``(chunk_rows, V)``
            in the input dtype (the one extra buffer of the size of the vocabulary times tokens; the
            gradient-logits kernel overwrites it in place). The rows per chunk are the fewest equal
            chunks that fit, rounded up to ``block_n``; at least ``block_n`` rows whatever the budget.
        block_n: token rows per program of both kernels.
        block_v: vocabulary columns per tile of both kernels.
        num_warps, num_stages: Triton launch options of both kernels.
        min_programs: the statistics kernel splits the vocabulary until its grid has at least this
            many programs (:func:`jax_heads.pallas.plan.choose_splits`).
        min_chunks: the tokens are split into at least this many chunks (as far as chunks of
            ``block_n`` rows allow), so the logits buffer holds at most about ``1/min_chunks`` of the
            tokens × vocabulary logits even where the budget would take more.
        logits_kernel: what forms a chunk's logits and their statistics: ``"xla"`` (an XLA product,
            then the Pallas statistics kernel reads the logits once), ``"mosaic"`` (the Mosaic GPU
            forward stores the logits while it forms the statistics: Hopper, bfloat16/float16, its
            tiles are ``BlockSizes.mosaic``'s; no bias in interpret mode) or ``"auto"`` (Mosaic where
            it can run, outside interpret mode; XLA otherwise). Naming ``"mosaic"`` where it cannot
            run raises. The default is ``"xla"``: the Mosaic store measured slower
            (``docs/kernel-notes.md``).
        tail_steps: only the counted (non-ignored) tokens are multiplied: whole chunks of them, and
            one partial chunk whose size is rounded up to a multiple of ``chunk_rows / tail_steps``
            (whole ``block_n``). That many sizes of the chunk step are compiled (``lax.switch``); at
            most that fraction of a chunk is ignored rows.
    """

    logits_budget_bytes: int = 896 * 2**20
    block_n: int = 16
    block_v: int = 512
    num_warps: int = 4
    num_stages: int = 2
    min_programs: int = 1056
    min_chunks: int = 4
    logits_kernel: str = "xla"
    tail_steps: int = 8

    def __post_init__(self):
        if self.logits_kernel not in LOGITS_KERNELS:
            raise ValueError(
                f"GradientInForwardConfig.logits_kernel must be one of {LOGITS_KERNELS}, got {self.logits_kernel!r}")
        _check_powers_of_two(self, "block_n", "block_v")
        _check_positive(self, "logits_budget_bytes", "num_warps", "num_stages", "min_programs", "min_chunks",
                        "tail_steps")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """The configuration of every kernel of one call.

    Attributes:
        forward_kernel: ``"triton"``, ``"mosaic"`` (Hopper, bfloat16/float16) or ``"auto"``: Mosaic on
            a Hopper GPU for 16-bit inputs whose padded shapes fit its tiles, outside interpret mode;
            Triton otherwise. Naming ``"mosaic"`` for inputs it cannot take raises. The backward is
            the same for both.
        backward_kernel: the gradient-logits kernel of the backward, chosen the same way:
            ``"triton"``, ``"mosaic"`` (Hopper, bfloat16/float16, exact gradients; its tiles are
            ``mosaic``'s) or ``"auto"`` (Mosaic where it can run, outside interpret mode).
        triton: :class:`TritonForwardConfig`.
        mosaic: :class:`MosaicForwardConfig`.
        backward: :class:`BackwardConfig`.
        filtered: :class:`FilterConfig` (used only with gradient filtering).
        gradient_in_forward: :class:`GradientInForwardConfig` (reductions ``"sum"``/``"mean"``).
        sm_count: multiprocessors the forward grids are sized for; None asks the first GPU.
    """

    forward_kernel: str = "auto"
    backward_kernel: str = "auto"
    triton: TritonForwardConfig = TritonForwardConfig()
    mosaic: MosaicForwardConfig = MosaicForwardConfig()
    backward: BackwardConfig = BackwardConfig()
    filtered: FilterConfig = FilterConfig()
    gradient_in_forward: GradientInForwardConfig = GradientInForwardConfig()
    sm_count: int | None = None

    def __post_init__(self):
        if self.forward_kernel not in FORWARD_KERNELS:
            raise ValueError(f"BlockSizes.forward_kernel must be one of {FORWARD_KERNELS}, got {self.forward_kernel!r}")
        if self.backward_kernel not in BACKWARD_KERNELS:
            raise ValueError(
                f"BlockSizes.backward_kernel must be one of {BACKWARD_KERNELS}, got {self.backward_kernel!r}")
        for name, cls in (("triton", TritonForwardConfig), ("mosaic", MosaicForwardConfig),
                          ("backward", BackwardConfig), ("filtered", FilterConfig),
                          ("gradient_in_forward", GradientInForwardConfig)):
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise ValueError(f"BlockSizes.{name} must be a {cls.__name__}, got {type(value).__name__}")
        if self.sm_count is not None and (not _is_int(self.sm_count) or self.sm_count < 1):
            raise ValueError(f"BlockSizes.sm_count must be None or a positive int, got {self.sm_count!r}")


DEFAULT_BLOCK_SIZES = BlockSizes()


def matmul_precision(dtype) -> lax.Precision | None:
    """float32 inputs get true float32 products (no tf32), matching the reference to ~1e-6."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def triton_params(config: TritonForwardConfig | BackwardConfig | FilterConfig | GradientInForwardConfig):
    """The Triton ``CompilerParams`` of a kernel configured by ``config``."""
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
