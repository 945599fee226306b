"""One forward and backward of our Pallas kernel at a ragged shape, for compute-sanitizer.

    XLA_PYTHON_CLIENT_PREALLOCATE=false compute-sanitizer --tool memcheck --target-processes all \\
        python benchmarks/sanitize_pallas.py

Ragged everywhere: N not a multiple of the token block, V not a multiple of the vocabulary tile or
of the backward chunk (so the last chunk overlaps the one before), D not a multiple of the D
step. Exact gradients, then gradient filtering (the block-sparse products), with the Triton
forward; then exact gradients with the Mosaic GPU forward (D padded to its 64-wide K step).
"""

import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jax_heads.pallas_lce import BlockSizes, pallas_loss  # noqa: E402

n, d, v = 333, 200, 5_003
rng = np.random.default_rng(0)
h = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
w = jnp.asarray(rng.standard_normal((v, d)) * d**-0.5, jnp.bfloat16)
y = rng.integers(0, v, n).astype(np.int32)
y[::7] = -100
chunk = 1536 * (384 + 2 * 208) * 2  # chunks of 1536 rows over V padded to 5120: the last overlaps
for kernel, eps, separate in (("triton", None, False), ("triton", 2.0**-12, False), ("triton", 2.0**-12, True),
                              ("mosaic", None, False)):
    bs = BlockSizes(chunk_bytes=chunk, forward_kernel=kernel)
    loss, vjp = jax.vjp(
        lambda a, b: pallas_loss(a, b, jnp.asarray(y), -100, block_sizes=bs, filter_eps=eps, filter_separate_targets=separate),
        h, w,
    )
    dh, dw = vjp(jnp.ones((n,), jnp.float32))
    jax.block_until_ready((loss, dh, dw))
    finite = bool(jnp.isfinite(loss).all() & jnp.isfinite(dh).all() & jnp.isfinite(dw).all())
    print(f"forward {kernel}, filter_eps={eps} separate_targets={separate}: loss sum {float(loss.sum()):.4f}, finite: {finite}", flush=True)
