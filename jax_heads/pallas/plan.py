"""The padded geometry of one call, the forward's grid policy and the GPU queries (plain Python).

Shapes are padded to whole blocks where needed, so any ``N``, ``V``, ``D`` works: tokens with the
label -1 (no target), ``D`` with zeros, vocabulary rows that the kernels mask to ``-inf``. At
aligned shapes (e.g. the Gemma-2 and Llama-3 heads) nothing is copied.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jax_heads.pallas.config import BlockSizes


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def pick_block_d(d: int, block_d: int) -> int:
    """The largest power of two <= ``block_d`` (>= 16) dividing ``d``; ``d`` is padded to 16 first."""
    b = block_d
    while b > 16 and d % b:
        b //= 2
    return b


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static padded geometry of one call.

    Attributes:
        n, v, d: the real token count, vocabulary size and hidden size.
        n_pad, v_pad, d_pad: the padded ones (multiples of ``block_n``, ``block_v`` and 16).
        block_n, block_v: the tiles that every kernel's tiles divide.
        block_d: the Triton forward's ``D`` step; ``bwd_block_d`` the gradient-logits kernel's.
    """

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


def plan_for(n: int, v: int, d: int, config: BlockSizes) -> Plan:
    """The :class:`Plan` for hidden ``(n, d)`` and weight ``(v, d)`` under ``config``.

    ``N`` and ``V`` are padded to the larger of the Triton forward's and the backward's tiles (powers
    of two, so one divides the other) and ``D`` to 16. A named Mosaic forward or backward pads to
    their tiles (``config.mosaic``) too: to a common multiple (they are multiples of 64, not always
    powers of two) and ``D`` to ``block_k``.
    """
    block_n = max(config.triton.block_n, config.backward.block_n)
    block_v = max(config.triton.block_v, config.backward.block_v)
    d_pad = round_up(d, 16)
    if "mosaic" in (config.forward_kernel, config.backward_kernel):
        block_n = math.lcm(block_n, config.mosaic.block_n)
        block_v = math.lcm(block_v, config.mosaic.block_v)
        d_pad = round_up(d, math.lcm(16, config.mosaic.block_k))
    return Plan(
        n=n,
        v=v,
        d=d,
        n_pad=round_up(n, block_n),
        v_pad=round_up(v, block_v),
        d_pad=d_pad,
        block_n=block_n,
        block_v=block_v,
        block_d=pick_block_d(d_pad, config.triton.block_d),
        bwd_block_d=pick_block_d(d_pad, config.backward.block_d),
    )


def pad_inputs(hidden: jax.Array, weight: jax.Array, labels: jax.Array, plan: Plan):
    """``(hidden, weight, labels)`` padded to ``plan``'s shapes: zeros, and the label -1 for padded tokens.

    Arrays already of the padded shape are returned as they are (no copy).
    """
    if plan.n_pad != plan.n or plan.d_pad != plan.d:
        hidden = jnp.pad(hidden, ((0, plan.n_pad - plan.n), (0, plan.d_pad - plan.d)))
    if plan.v_pad != plan.v or plan.d_pad != plan.d:
        weight = jnp.pad(weight, ((0, plan.v_pad - plan.v), (0, plan.d_pad - plan.d)))
    if plan.n_pad != plan.n:
        labels = jnp.pad(labels, (0, plan.n_pad - plan.n), constant_values=-1)
    return hidden, weight, labels


def choose_splits(n_blocks: int, num_tiles: int, min_programs: int, slots: int) -> tuple[int, int]:
    """``(splits, tiles_per_split)`` of a forward grid of ``n_blocks`` token blocks × splits.

    About ``min_programs`` programs where the vocabulary allows (the count of splits is rounded so
    that none is empty, which can land a little below); then, among up to 8× as many splits, the
    fewest whose wave-quantised work ``ceil(programs / slots) · tiles_per_split`` is within 2 % of
    the best (``slots`` programs run at once). Whole waves matter: 576 programs of 112 tiles on 132
    multiprocessors run as 5 waves where 4.4 would do (tile work 15 % above the ideal), 2 112
    programs of 31 tiles as 16 waves (2 % above).
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
def sm_count() -> int:
    """Multiprocessors of the first GPU (132, an H100/H200 SXM's count, when JAX has no GPU to ask)."""
    try:
        return int(jax.devices("gpu")[0].core_count)
    except (RuntimeError, AttributeError, TypeError, ValueError):
        return 132


@functools.cache
def gpu_capabilities() -> tuple[str, ...]:
    """Compute capabilities of JAX's local GPUs (empty without a GPU backend)."""
    try:
        return tuple(str(gpu.compute_capability) for gpu in jax.local_devices(backend="gpu"))
    except (RuntimeError, AttributeError):
        return ()


def is_hopper() -> bool:
    """Whether JAX has GPUs and every one is a Hopper part (compute capability 9.x): on a host with
    mixed GPUs ``"auto"`` keeps the Triton forward, which runs on any of them."""
    caps = gpu_capabilities()
    return bool(caps) and all(c.startswith("9") for c in caps)


def hopper_reason() -> str | None:
    """Why a Mosaic GPU kernel cannot run on this host's GPUs (one is not a Hopper part), or None
    (all are, or there is no GPU: lowering with ``jax.export`` and interpret mode need none)."""
    caps = gpu_capabilities()
    if caps and not is_hopper():
        return f"it needs a Hopper GPU (compute capability 9.x), found {', '.join(caps)}"
    return None


def resolve_kernel(option: str, choice: str, reason, interpret: bool, other: str) -> str:
    """What a kernel choice of ``"auto"``, ``"mosaic"`` or ``other`` resolves to.

    Args:
        option: the configuration field's name, for the error message.
        choice: its value.
        reason: a callable giving why the Mosaic GPU kernel cannot take the inputs, or None.
        interpret: Pallas interpret mode (``"auto"`` then gives ``other``).
        other: the alternative kernel's name (``"triton"`` or ``"xla"``).

    Returns:
        ``other`` where chosen; ``"mosaic"`` where named and possible, or where ``"auto"`` and possible
        outside interpret mode on a host whose GPUs are all Hopper parts; ``other`` otherwise.

    Raises:
        ValueError: ``"mosaic"`` named where ``reason()`` says it cannot run.
    """
    if choice == other:
        return other
    why = reason()
    if choice == "mosaic":
        if why is not None:
            raise ValueError(f"{option}='mosaic' cannot run on these inputs: {why}")
        return "mosaic"
    return "mosaic" if why is None and not interpret and is_hopper() else other
