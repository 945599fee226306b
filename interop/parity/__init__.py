"""Cross-framework parity: the torch and Flax language-modelling heads compute the same loss and gradients.

:func:`run_parity` builds a ``torch_heads.SplitLanguageModellingHead``, ports its weights into a
``jax_heads.SplitLanguageModellingHead``, feeds both the same hidden states and labels (with
ignored positions) and the same upstream gradient, and compares for every pair of chosen
implementations the loss and the gradients with respect to the hidden states and every split
weight. Each side is also judged against a float64 ground truth (the torch reference in float64,
on the harness device). Verdicts use the project's one tolerance table (:mod:`heads_common.tolerances`):

* float32: torch vs JAX within ``PARITY_FLOAT32`` relative error (in norm), and each side within
  the float32 bound of the ground truth (``float32-tf32`` for ``cce``, whose float32 products use
  tf32);
* bfloat16/float16: each side against the ground truth, baseline-relative to the naive
  materialised computation in that dtype; the torch-vs-JAX difference is reported for information.

Row groups: the first runs the heads with the loss options of the config (none by default; the
heads take ``softcap``, ``label_smoothing``, ``lse_square_scale`` and ``bias``, and a ``shift`` goes
to ``linear_cross_entropy`` with the head's concatenated parameters); unless
``all_options=False``, a second, "all options on" (:data:`~interop.parity.runs.ALL_OPTIONS`: softcap
30, label smoothing 0.1, lse square scale 1e-4, a bias per split, shift 1), runs every
implementation of the device's default list whose registry record supports all of them
(``REGISTRY[impl].options``). Both are judged against the float64 truth with their options.

Run ``python -m interop.parity --help`` for the command line.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from flax import nnx

import jax_heads
import torch_heads
from heads_common import LM_IGNORE_INDEX, check_hidden_size, check_split_config
from heads_common.tolerances import PARITY_FLOAT32, TOLERANCES, rel_err
from interop.dlpack import to_jax
from interop.parity.runs import (
    ALL_OPTIONS,
    LossSetup,
    ground_truth,
    jax_run,
    naive_baseline,
    output_names,
    torch_run,
)
from interop.porting import port_torch_to_flax

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class ParityConfig:
    """What to compare.

    The default is a small Gemma-like head (a 32k text vocabulary plus 3 special tokens, hidden
    size 288) that runs in seconds on a CPU.
    """

    batch: int = 2
    seq: int = 61
    hidden_size: int = 288
    splits: tuple[tuple[str, int], ...] = (("text", 32_000), ("special", 3))
    dtype: str = "float32"
    torch_impls: tuple[str, ...] | None = None  # None: every implementation that runs on the device
    jax_impls: tuple[str, ...] | None = None
    device: str = "auto"  # "cpu", "cuda" or "auto" (cuda when available)
    seed: int = 0
    ignore_fraction: float = 0.2
    # The loss options of the first row group (the heads' configuration; shift goes to the functional call).
    softcap: float | None = None
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    bias: bool = False
    shift: int = 0
    all_options: bool = True  # add the "all options on" row group

    @property
    def loss_setup(self) -> LossSetup:
        return LossSetup(self.softcap, self.label_smoothing, self.lse_square_scale, self.bias, self.shift)


@dataclasses.dataclass(frozen=True)
class Check:
    """One compared output."""

    group: str  # the row group's options, e.g. "no options" or "all options on"
    left: str  # e.g. "torch:chunked"
    right: str  # e.g. "jax:pallas" or "float64 truth"
    output: str  # "loss", "d_hidden", "d_lm_head.<split>.weight", "d_lm_head.<split>.bias"
    max_abs: float
    rel: float
    bound: float | None  # None: reported for information, not judged
    passed: bool | None


@dataclasses.dataclass
class ParityReport:
    config: ParityConfig
    device: str
    checks: list[Check]
    seconds: float

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    def table(self) -> str:
        """The report as a fixed-width text table, one row per compared output."""
        head = ("options", "left", "right", "output", "max |diff|", "rel err", "bound", "verdict")
        rows = [
            (
                c.group,
                c.left,
                c.right,
                c.output,
                f"{c.max_abs:.2e}",
                f"{c.rel:.2e}",
                "-" if c.bound is None else f"{c.bound:.2e}",
                "info" if c.passed is None else ("ok" if c.passed else "FAIL"),
            )
            for c in self.checks
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
        return "\n".join([line(head), line(tuple("-" * w for w in widths)), *map(line, rows)])


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA GPU")
    return device


def _default_impls(device: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if device == "cuda":
        return ("cce", "chunked", "reference"), ("pallas", "chunked", "reference")
    return ("chunked", "reference"), ("chunked", "reference")


def run_parity(config: ParityConfig = ParityConfig(), progress: Callable[[str], None] | None = None) -> ParityReport:
    """Compare every chosen torch implementation with every chosen JAX one on shared weights and data.

    Args:
        config: shapes, dtype, implementations, device, seed and loss options.
        progress: called with a short message before each step (the CLI prints them).

    Returns:
        A :class:`ParityReport`; ``report.passed`` is False if any judged output is out of bounds.

    Raises:
        TypeError, ValueError: a field of ``config`` is out of range (sizes below 1, a negative
            seed, ``ignore_fraction`` outside [0, 1], a bad split, a loss option out of its range
            or a ``shift`` not below ``seq``) or names an unknown dtype, device or implementation,
            or an implementation that does not support the loss options given.
    """
    start = time.perf_counter()
    say = progress or (lambda _msg: None)
    _check_numbers(config)
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {config.dtype!r}")
    device = _resolve_device(config.device)
    layout = check_split_config(dict(config.splits), [name for name, _ in config.splits])
    default_torch, default_jax = _default_impls(device)
    setup = config.loss_setup
    groups = [(setup.describe(), setup, _chosen(torch_heads, "torch", config.torch_impls, default_torch, setup),
               _chosen(jax_heads, "JAX", config.jax_impls, default_jax, setup))]
    if config.all_options:
        groups.append(("all options on", ALL_OPTIONS, _chosen(torch_heads, "torch", None, default_torch, ALL_OPTIONS),
                       _chosen(jax_heads, "JAX", None, default_jax, ALL_OPTIONS)))

    dtype = DTYPES[config.dtype]
    gen = torch.Generator().manual_seed(config.seed)
    shape = (config.batch, config.seq)
    hidden = torch.randn(*shape, config.hidden_size, generator=gen).to(device=device, dtype=dtype)
    labels = torch.randint(0, layout.total, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < config.ignore_fraction] = LM_IGNORE_INDEX
    labels = labels.to(device)
    upstream = torch.randn(shape, generator=gen).to(device)
    checks = []
    for group in groups:
        checks += _run_group(config, device, *group, hidden, labels, upstream, say)
    return ParityReport(config=config, device=device, checks=checks, seconds=time.perf_counter() - start)


def _chosen(package, framework: str, named: Sequence[str] | None, default: Sequence[str], setup: LossSetup):
    """The implementations of one framework for a row group: the named ones (each must exist and support
    the options), or those of the device's default list that support them."""
    registry = package.functional.REGISTRY
    if named is None:
        return tuple(impl for impl in default if setup.registry_options <= registry[impl].options)
    for impl in named:
        if impl not in registry.names:
            raise ValueError(f"unknown {framework} implementation {impl!r}; choose from {registry.names}")
        missing = sorted(setup.registry_options - registry[impl].options)
        if missing:
            supporting = {option: ", ".join(registry.supporting(option)) or "none" for option in missing}
            raise ValueError(
                f"{framework} implementation {impl!r} does not support "
                + "; ".join(f"{option} (implementations that do: {names})" for option, names in supporting.items())
            )
    return tuple(named)


def _run_group(config, device, label, setup, torch_impls, jax_impls, hidden, labels, upstream, say) -> list[Check]:
    """Build the two heads with ``setup``'s options on shared weights, run every implementation, judge."""
    split_sizes, order = dict(config.splits), [name for name, _ in config.splits]
    torch.manual_seed(config.seed)
    torch_head = torch_heads.SplitLanguageModellingHead(split_sizes, order, config.hidden_size, **setup.head_options)
    torch_head = torch_head.to(device=device, dtype=DTYPES[config.dtype])
    flax_head = jax_heads.SplitLanguageModellingHead(
        split_sizes, order, config.hidden_size, rngs=nnx.Rngs(config.seed), param_dtype=_jax_dtype(config.dtype),
        **setup.head_options,
    )
    port_torch_to_flax(torch_head, flax_head)
    upstream = upstream[..., : upstream.shape[-1] - setup.shift].contiguous()  # the loss keeps labels[..., k:]'s shape
    j_hidden, j_labels, j_upstream = to_jax(hidden), to_jax(labels), to_jax(upstream)
    names = output_names(order, setup.bias)

    say(f"float64 ground truth ({label})")
    truth = ground_truth(torch_head, hidden, labels, upstream, setup)
    # float16/bfloat16 results are judged relative to the naive computation's error (float32: a fixed bound).
    relative = TOLERANCES[config.dtype].baseline_relative
    naive = naive_baseline(torch_head, hidden, labels, upstream, setup) if relative else None
    results = {}
    for impl in torch_impls:
        say(f"torch:{impl} ({label})")
        results[f"torch:{impl}"] = torch_run(torch_head, hidden, labels, upstream, impl, setup.shift)
    for impl in jax_impls:
        say(f"jax:{impl} ({label})")
        results[f"jax:{impl}"] = jax_run(flax_head, j_hidden, j_labels, j_upstream, impl, setup.shift, order)

    checks = []
    for side, values in results.items():
        key = config.dtype
        if key == "float32" and device == "cuda" and side == "torch:cce":
            key = "float32-tf32"
        tol = TOLERANCES[key]
        for i, (name, value, t) in enumerate(zip(names, values, truth, strict=True)):
            bound = rel_err(naive[i], t) + tol.bound if tol.baseline_relative else tol.bound
            checks.append(_check(label, side, "float64 truth", name, value, t, bound))
    for t_impl in torch_impls:
        for j_impl in jax_impls:
            left, right = f"torch:{t_impl}", f"jax:{j_impl}"
            judged = config.dtype == "float32" and not (device == "cuda" and t_impl == "cce")
            for name, a, b in zip(names, results[left], results[right], strict=True):
                checks.append(_check(label, left, right, name, a, b, PARITY_FLOAT32 if judged else None))
    return checks


def _check_numbers(config: ParityConfig) -> None:
    """The numeric fields are in range: sizes >= 1, a 64-bit seed >= 0, ``ignore_fraction`` in [0, 1],
    the loss options (``heads_common.options``), ``shift`` below ``seq``."""
    for name in ("batch", "seq", "hidden_size"):
        check_hidden_size(getattr(config, name), name)
    seed = config.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63 - 1], got {seed!r}")
    fraction = config.ignore_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"ignore_fraction must be a number in [0, 1], got {fraction!r}")
    config.loss_setup.check(config.seq)


def _check(group, left, right, output, value, truth, bound) -> Check:
    err = rel_err(value, truth)
    max_abs = float(np.max(np.abs(value - truth))) if np.size(value) else 0.0
    return Check(group, left, right, output, max_abs, err, bound, None if bound is None else bool(err <= bound))


def _jax_dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


__all__ = ["Check", "ParityConfig", "ParityReport", "run_parity"]
