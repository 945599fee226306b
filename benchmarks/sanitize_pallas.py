"""One forward and backward of our Pallas kernels at a ragged shape, for compute-sanitizer.

    XLA_PYTHON_CLIENT_PREALLOCATE=false compute-sanitizer --tool memcheck --target-processes all \\
        python -m benchmarks.sanitize_pallas [--only PART ...] [--match TEXT]

Ragged everywhere: N not a multiple of the token block, V not a multiple of the vocabulary tile or
of the backward chunk (so the last chunk overlaps the one before), D not a multiple of the D step.
Exact gradients, then gradient filtering (the block-sparse products, both target rules), with the
Triton forward and the Triton gradient-logits kernel; then exact gradients with the Mosaic GPU
gradient-logits kernel, after the Triton forward and after the Mosaic GPU forward (both pad D to
their 64-wide K step). Then every loss option at once (bias, softcap, label smoothing, z-loss) on
both kernel pairs, and the gradient-in-forward path of the mean (chunks of 128 tokens, the partial
one first), plain and with every option.

Parts (``--only``): ``exact``, ``options``, ``gif`` as above; ``gif-kernels``: one chunk of the
gradient-in-forward path (``chunk_gradients``: its kernels and products) outside its loop, with the XLA
and with the Mosaic logits, plain and with every option. The default is all four.
``--list`` prints the chosen cases' names; ``--match TEXT`` runs only those whose name contains TEXT.

compute-sanitizer 2025.3.1 ends with a segmentation fault and no report in many runs of a few seconds,
on any case (``docs/robustness.md``), so one process per case, run again where the tool crashed, is
what completes them all: ``bash benchmarks/gpu_checks.sh OUT sanitize`` does that.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import IGNORE, make_inputs  # noqa: E402
from jax_heads.pallas import (  # noqa: E402
    BackwardConfig,
    BlockSizes,
    GradientInForwardConfig,
    gradient_in_forward_grads,
    pallas_loss,
)
from jax_heads.pallas import gradient_in_forward as gif_path  # noqa: E402

N, D, V = 333, 200, 5_003
# Chunks of 1536 vocabulary rows (the budget counts the gradient logits and one (chunk_v, D) buffer, D
# padded to 16, or to 64 for a Mosaic kernel; whole tiles, no larger multiple) over V padded to 5120:
# the last chunk overlaps the one before.
CHUNK_BYTES = {208: 1536 * (384 + 208) * 2, 256: 1536 * (384 + 256) * 2}


def _backward(d_pad: int) -> BackwardConfig:
    return BackwardConfig(chunk_bytes=CHUNK_BYTES[d_pad], chunk_multiple=256)


# (forward kernel, backward kernel, filter_eps, filter_separate_targets)
RUNS = (("triton", "triton", None, True), ("triton", "triton", 2.0**-12, False), ("triton", "triton", 2.0**-12, True),
        ("triton", "mosaic", None, True), ("mosaic", "mosaic", None, True))
OPTIONS = {"softcap": 30.0, "label_smoothing": 0.1, "lse_square_scale": 1e-4}


def _report(what: str, *arrays) -> None:
    arrays = [a for a in arrays if a is not None]
    jax.block_until_ready(arrays)
    finite = all(bool(jnp.isfinite(a).all()) for a in arrays)
    print(f"{what}: loss sum {float(arrays[0].sum()):.4f}, finite: {finite}", flush=True)


PARTS = ("exact", "options", "gif-kernels", "gif")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                        help="the parts to run: the exact and filtered runs, every option on both kernel "
                             "pairs, the gradient-in-forward kernels on one chunk, the gradient-in-forward "
                             "mean (default: all)")
    parser.add_argument("--match", default=None,
                        help="of the chosen parts' cases, only those whose name contains this text "
                             "(one case per process: the tool's intermittent crash then loses one case)")
    parser.add_argument("--list", action="store_true", help="print the chosen cases' names and run nothing")
    args = parser.parse_args(argv)
    cases = [(name, run) for name, run in _cases(set(args.only))
             if args.match is None or args.match in name]
    if not cases:
        parser.error(f"no case of the parts {args.only} matches {args.match!r}")
    for name, run in cases:
        if args.list:
            print(name)
        else:
            _report(name, *run())


def _cases(parts):
    """``(name, thunk)`` of each case of ``parts``; a thunk returns the arrays :func:`_report` checks."""
    # Drawn on the CPU (no torch CUDA kernels under the sanitizer), handed to JAX as float32 arrays.
    inputs = make_inputs(N, D, V, dtype=torch.float32, device="cpu")
    h = jnp.asarray(inputs.hidden.numpy(), jnp.bfloat16)
    w = jnp.asarray(inputs.weight.numpy(), jnp.bfloat16)
    y = jnp.asarray(inputs.labels.numpy(), jnp.int32)
    bias = jnp.asarray(torch.randn(V, generator=torch.Generator().manual_seed(1)).numpy())
    upstream = jnp.ones((N,), jnp.float32)

    def with_vjp(loss_fn, *primals):
        loss, vjp = jax.vjp(loss_fn, *primals)
        return (loss, *vjp(upstream))

    for kernel, bwd_kernel, eps, separate in RUNS if "exact" in parts else ():
        config = BlockSizes(forward_kernel=kernel, backward_kernel=bwd_kernel,
                            backward=_backward(256 if "mosaic" in (kernel, bwd_kernel) else 208))

        def loss_fn(a, b, config=config, eps=eps, separate=separate):
            return pallas_loss(a, b, y, IGNORE, config=config, filter_eps=eps, filter_separate_targets=separate)

        yield (f"forward {kernel}, backward {bwd_kernel}, filter_eps={eps} separate_targets={separate}",
               lambda loss_fn=loss_fn: with_vjp(loss_fn, h, w))
    for kernel in ("triton", "mosaic") if "options" in parts else ():
        config = BlockSizes(forward_kernel=kernel, backward_kernel=kernel,
                            backward=_backward(256 if kernel == "mosaic" else 208))

        def loss_fn(a, b, c, config=config):
            return pallas_loss(a, b, y, IGNORE, bias=c, config=config, **OPTIONS)

        yield f"forward and backward {kernel}, every option", lambda loss_fn=loss_fn: with_vjp(loss_fn, h, w, bias)
    gif = BlockSizes(gradient_in_forward=GradientInForwardConfig(logits_budget_bytes=128 * 5_120 * 2))
    gif_mosaic = BlockSizes(gradient_in_forward=dataclasses.replace(gif.gradient_in_forward, logits_kernel="mosaic"))
    for config, logits in ((gif, "XLA"), (gif_mosaic, "Mosaic")) if "gif-kernels" in parts else ():
        for options in ({}, {"bias": bias, **OPTIONS}):
            yield (f"gradient-in-forward chunk, {logits} logits, options {sorted(options)}",
                   lambda config=config, options=options: _gif_kernels(h, w, y, config, **options))
    for options in ({}, {"bias": bias, **OPTIONS}) if "gif" in parts else ():
        run = jax.jit(lambda a, b, options=options: gradient_in_forward_grads(a, b, y, IGNORE, "mean", config=gif,
                                                                               **options))
        yield f"gradient in forward, mean, options {sorted(options)}", lambda run=run: run(h, w)


def _gif_kernels(h, w, y, config, bias=None, softcap=None, label_smoothing=0.0, lse_square_scale=0.0,
                 interpret=False):
    """The gradient-in-forward path's chunk (``gradient_in_forward.chunk_gradients``: the logits, the
    statistics and gradient-logits kernels, the two products) on the first ``chunk_rows`` tokens, under
    ``jax.jit``, without the loop around it; ``(loss sum, d_h, d_weight part, column sums or None)``."""
    o = gif_path._options(h, w, IGNORE, "mean", config, interpret, softcap, label_smoothing, lse_square_scale,
                          bias is not None)
    rows = o.chunk_rows
    weight, bias32 = gif_path._padded_parameters(w, None if bias is None else bias.astype(jnp.float32), o)

    def run(hc, yc):
        labels = jnp.where(yc == IGNORE, -1, yc)
        scale = jnp.where(labels >= 0, 1.0 / rows, 0.0).astype(jnp.float32)
        return gif_path.chunk_gradients(hc, labels, scale, weight, bias32, o, vocab=V)

    return jax.jit(run)(h[:rows], y[:rows])


if __name__ == "__main__":
    main()
