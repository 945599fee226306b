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

Run ``python -m interop.parity --help`` for the command line.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
import torch
from flax import nnx

import jax_heads
import torch_heads
from heads_common import LM_IGNORE_INDEX, check_hidden_size, check_split_config
from heads_common.tolerances import PARITY_FLOAT32, TOLERANCES, rel_err
from interop.dlpack import to_jax
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


@dataclasses.dataclass(frozen=True)
class Check:
    """One compared output."""

    left: str  # e.g. "torch:chunked"
    right: str  # e.g. "jax:pallas" or "float64 truth"
    output: str  # "loss", "d_hidden", "d_lm_head.<split>.weight"
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
        head = ("left", "right", "output", "max |diff|", "rel err", "bound", "verdict")
        rows = [
            (
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
        line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
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


def _torch_run(head, hidden, labels, upstream, impl: str):
    """Loss and gradients (hidden, then each split weight in order) of one torch implementation."""
    head.impl = impl
    head.filter_eps = None  # exact gradients in every implementation
    h = hidden.detach().requires_grad_()
    loss = head(h, labels)
    weights = [head.lm_head[name].weight for name in head._split_order]
    grads = torch.autograd.grad(loss, [h, *weights], grad_outputs=upstream)
    return [_np(loss), *(_np(g) for g in grads)]


def _jax_run(head, hidden, labels, upstream, impl: str, order: Sequence[str]):
    """Same as :func:`_torch_run` for the Flax head; split gradients transposed to torch's layout."""
    head.impl = impl
    graphdef, params, rest = nnx.split(head, nnx.Param, ...)

    def forward(params, h):
        return nnx.merge(graphdef, params, rest)(h, labels)

    loss, vjp = jax.vjp(forward, params, hidden)
    d_params, d_hidden = vjp(upstream)
    split_grads = [np.asarray(d_params["lm_head"][name]["kernel"][...], np.float64).T for name in order]
    return [_np(loss), _np(d_hidden), *split_grads]


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().double().numpy() if x.dtype != torch.float64 else x.detach().cpu().numpy()
    return np.asarray(jax.device_get(x), np.float64)


def _ground_truth(torch_head, hidden, labels, upstream):
    """float64 results through the torch reference (on the harness's device), and the naive same-dtype baseline."""
    truth_head = _copy_head(torch_head, torch.float64, hidden.device)
    truth = _torch_run(truth_head, hidden.double(), labels, upstream.double(), "reference")

    def naive(h, w, y):  # materialised logits in the input dtype, as a plain user would write it
        return torch.nn.functional.cross_entropy((h @ w.T).float(), y, ignore_index=LM_IGNORE_INDEX, reduction="none")

    h = hidden.detach().requires_grad_()
    weights = [torch_head.lm_head[name].weight for name in torch_head._split_order]
    loss = naive(h.reshape(-1, h.shape[-1]), torch.cat(weights), labels.reshape(-1)).reshape(labels.shape)
    grads = torch.autograd.grad(loss, [h, *weights], grad_outputs=upstream)
    return truth, [_np(loss), *(_np(g) for g in grads)]


def _copy_head(head, dtype, device):
    layout = head._layout
    copy = torch_heads.SplitLanguageModellingHead(dict(zip(layout.order, layout.sizes)), layout.order, head._hidden_size)
    copy.load_state_dict(head.state_dict())
    return copy.to(device=device, dtype=dtype)


def run_parity(config: ParityConfig = ParityConfig(), progress: Callable[[str], None] | None = None) -> ParityReport:
    """Compare every chosen torch implementation with every chosen JAX one on shared weights and data.

    Args:
        config: shapes, dtype, implementations, device and seed.
        progress: called with a short message before each step (the CLI prints them).

    Returns:
        A :class:`ParityReport`; ``report.passed`` is False if any judged output is out of bounds.

    Raises:
        TypeError, ValueError: a field of ``config`` is out of range (sizes below 1, a negative
            seed, ``ignore_fraction`` outside [0, 1], a bad split) or names an unknown dtype,
            device or implementation.
    """
    start = time.perf_counter()
    say = progress or (lambda _msg: None)
    _check_numbers(config)
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {config.dtype!r}")
    device = _resolve_device(config.device)
    split_sizes = dict(config.splits)
    layout = check_split_config(split_sizes, [name for name, _ in config.splits])
    default_torch, default_jax = _default_impls(device)
    torch_impls = tuple(config.torch_impls or default_torch)
    jax_impls = tuple(config.jax_impls or default_jax)
    for impl in torch_impls:
        if impl not in torch_heads.IMPLEMENTATIONS:
            raise ValueError(f"unknown torch implementation {impl!r}; choose from {torch_heads.IMPLEMENTATIONS}")
    for impl in jax_impls:
        if impl not in jax_heads.IMPLEMENTATIONS:
            raise ValueError(f"unknown JAX implementation {impl!r}; choose from {jax_heads.IMPLEMENTATIONS}")

    dtype = DTYPES[config.dtype]
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    torch_head = torch_heads.SplitLanguageModellingHead(split_sizes, layout.order, config.hidden_size)
    torch_head = torch_head.to(device=device, dtype=dtype)
    flax_head = jax_heads.SplitLanguageModellingHead(
        split_sizes, layout.order, config.hidden_size, rngs=nnx.Rngs(config.seed), param_dtype=_jax_dtype(config.dtype)
    )
    port_torch_to_flax(torch_head, flax_head)

    shape = (config.batch, config.seq)
    hidden = torch.randn(*shape, config.hidden_size, generator=gen).to(device=device, dtype=dtype)
    labels = torch.randint(0, layout.total, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < config.ignore_fraction] = LM_IGNORE_INDEX
    labels = labels.to(device)
    upstream = torch.randn(shape, generator=gen).to(device)
    j_hidden, j_labels, j_upstream = to_jax(hidden), to_jax(labels), to_jax(upstream)
    names = ["loss", "d_hidden", *(f"d_lm_head.{n}.weight" for n in layout.order)]

    say("float64 ground truth")
    truth, naive = _ground_truth(torch_head, hidden, labels, upstream)
    results = {}
    for impl in torch_impls:
        say(f"torch:{impl}")
        results[f"torch:{impl}"] = _torch_run(torch_head, hidden, labels, upstream.to(torch.float32), impl)
    for impl in jax_impls:
        say(f"jax:{impl}")
        results[f"jax:{impl}"] = _jax_run(flax_head, j_hidden, j_labels, j_upstream, impl, layout.order)

    checks = []
    for side, values in results.items():
        key = config.dtype
        if key == "float32" and device == "cuda" and side == "torch:cce":
            key = "float32-tf32"
        tol = TOLERANCES[key]
        for name, value, t, nv in zip(names, values, truth, naive):
            bound = rel_err(nv, t) + tol.bound if tol.baseline_relative else tol.bound
            checks.append(_check(side, "float64 truth", name, value, t, bound))
    for t_impl in torch_impls:
        for j_impl in jax_impls:
            left, right = f"torch:{t_impl}", f"jax:{j_impl}"
            judged = config.dtype == "float32" and not (device == "cuda" and t_impl == "cce")
            for name, a, b in zip(names, results[left], results[right]):
                checks.append(_check(left, right, name, a, b, PARITY_FLOAT32 if judged else None))
    return ParityReport(config=config, device=device, checks=checks, seconds=time.perf_counter() - start)


def _check_numbers(config: ParityConfig) -> None:
    """The numeric fields are in range: sizes >= 1, a 64-bit seed >= 0, ``ignore_fraction`` in [0, 1]."""
    for name in ("batch", "seq", "hidden_size"):
        check_hidden_size(getattr(config, name), name)
    seed = config.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63 - 1], got {seed!r}")
    fraction = config.ignore_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"ignore_fraction must be a number in [0, 1], got {fraction!r}")


def _check(left, right, output, value, truth, bound) -> Check:
    err = rel_err(value, truth)
    max_abs = float(np.max(np.abs(value - truth))) if np.size(value) else 0.0
    return Check(left, right, output, max_abs, err, bound, None if bound is None else bool(err <= bound))


def _jax_dtype(name: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


__all__ = ["Check", "ParityConfig", "ParityReport", "run_parity"]
