"""One forward and backward of our Pallas kernels at a ragged shape, for compute-sanitizer.

    XLA_PYTHON_CLIENT_PREALLOCATE=false compute-sanitizer --tool memcheck --target-processes all \\
        python -m benchmarks.sanitize_pallas

Ragged everywhere: N not a multiple of the token block, V not a multiple of the vocabulary tile or
of the backward chunk (so the last chunk overlaps the one before), D not a multiple of the D step.
Exact gradients, then gradient filtering (the block-sparse products, both target rules), with the
Triton forward and the Triton gradient-logits kernel; then exact gradients with the Mosaic GPU
gradient-logits kernel, after the Triton forward and after the Mosaic GPU forward (both pad D to
their 64-wide K step).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import IGNORE, make_inputs  # noqa: E402
from jax_heads.pallas import BackwardConfig, BlockSizes, pallas_loss  # noqa: E402

N, D, V = 333, 200, 5_003
# Chunks of 1536 vocabulary rows (the budget counts the gradient logits and twice the chunk's
# weight-gradient rows, D padded to 16, or to 64 for a Mosaic kernel) over V padded to 5120: the last
# chunk overlaps the one before.
CHUNK_BYTES = {208: 1536 * (384 + 2 * 208) * 2, 256: 1536 * (384 + 2 * 256) * 2}
# (forward kernel, backward kernel, filter_eps, filter_separate_targets)
RUNS = (("triton", "triton", None, True), ("triton", "triton", 2.0**-12, False), ("triton", "triton", 2.0**-12, True),
        ("triton", "mosaic", None, True), ("mosaic", "mosaic", None, True))


def main() -> None:
    # Drawn on the CPU (no torch CUDA kernels under the sanitizer), handed to JAX as float32 arrays.
    inputs = make_inputs(N, D, V, dtype=torch.float32, device="cpu")
    h = jnp.asarray(inputs.hidden.numpy(), jnp.bfloat16)
    w = jnp.asarray(inputs.weight.numpy(), jnp.bfloat16)
    y = jnp.asarray(inputs.labels.numpy(), jnp.int32)
    for kernel, bwd_kernel, eps, separate in RUNS:
        config = BlockSizes(forward_kernel=kernel, backward_kernel=bwd_kernel,
                            backward=BackwardConfig(chunk_bytes=CHUNK_BYTES[256 if "mosaic" in (kernel, bwd_kernel)
                                                                            else 208]))

        def loss_fn(a, b, config=config, eps=eps, separate=separate):
            return pallas_loss(a, b, y, IGNORE, config=config, filter_eps=eps, filter_separate_targets=separate)

        loss, vjp = jax.vjp(loss_fn, h, w)
        dh, dw = vjp(jnp.ones((N,), jnp.float32))
        jax.block_until_ready((loss, dh, dw))
        finite = bool(jnp.isfinite(loss).all() & jnp.isfinite(dh).all() & jnp.isfinite(dw).all())
        print(f"forward {kernel}, backward {bwd_kernel}, filter_eps={eps} separate_targets={separate}: "
              f"loss sum {float(loss.sum()):.4f}, finite: {finite}", flush=True)


if __name__ == "__main__":
    main()
