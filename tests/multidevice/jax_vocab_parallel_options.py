"""Run in a fresh process with 4 fake CPU devices (tests/test_jax_loss_options.py starts it).

The vocabulary-parallel op with the loss options (bias split with the weight, soft-capping, label
smoothing, z-loss, shift, returned log-sum-exp) on 1 x 4 and 2 x 2 meshes, chunked and reference
shards (and Pallas shards in interpret mode on the 2 x 2 mesh, every option), under ``jit``, against
the float64 ground truth: loss, lse, d_hidden, d_weight, d_bias, and each device holding only its
shard of ``d_bias``. Prints one JSON report as its last line.
"""

import json
import os
import sys
import zlib

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repository root first: this checkout's packages, not those of another install.
sys.path[:0] = [os.path.dirname(TESTS), TESTS]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ground_truth import shifted_options_ground_truth  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from heads_common.tolerances import TOLERANCES, rel_err  # noqa: E402
from jax_heads import linear_cross_entropy  # noqa: E402

IGNORE = -100
ALL = {"softcap": 2.5, "label_smoothing": 0.15, "lse_square_scale": 0.05}
# name: (reduction, options, shift, return_lse)
OPTION_SETS = {
    "all-none": ("none", ALL, 1, True),
    "all-mean": ("mean", ALL, 2, True),
    "bias-sum": ("sum", {}, 0, False),
}


def case(impl, mesh_shape, opts_name):
    reduction, options, shift, return_lse = OPTION_SETS[opts_name]
    name = f"{impl}-{mesh_shape[0]}x{mesh_shape[1]}-{opts_name}"
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    lead, d, v = (4, 7), 16, 4 * 29
    h = rng.standard_normal((*lead, d)).astype(np.float32)
    w = (rng.standard_normal((v, d)) * d**-0.5 * 2).astype(np.float32)
    b = (rng.standard_normal(v) * 0.5).astype(np.float32)
    y = rng.integers(0, v, lead).astype(np.int32)
    y[rng.random(lead) < 0.2] = IGNORE
    kept = (lead[0], lead[1] - shift)
    up = rng.standard_normal(kept) if reduction == "none" else None
    up_lse = rng.standard_normal(kept) if return_lse else None

    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), ("data", "vocab"))
    batch_axis = "data" if mesh_shape[0] > 1 else None
    ws = jax.device_put(w, NamedSharding(mesh, P("vocab", None)))
    bs = jax.device_put(b, NamedSharding(mesh, P("vocab")))

    def objective(a, c, e):
        out = linear_cross_entropy(a, c, jnp.asarray(y), bias=e, reduction=reduction, impl=impl, mesh=mesh,
                                   vocab_axis="vocab", batch_axis=batch_axis, shift=shift, return_lse=return_lse,
                                   interpret=impl == "pallas", **options)
        loss, lse = out if return_lse else (out, None)
        total = loss if up is None else jnp.sum(loss * jnp.asarray(up, jnp.float32))
        if lse is not None:
            total = total + jnp.sum(lse * jnp.asarray(up_lse, jnp.float32))
        return total, (loss, lse)

    (_, (loss, lse)), grads = jax.jit(jax.value_and_grad(objective, (0, 1, 2), has_aux=True))(jnp.asarray(h), ws, bs)
    want = shifted_options_ground_truth(h, w, y, up, shift=shift, reduction=reduction, upstream_lse=up_lse, bias=b,
                                        ignore_index=IGNORE, **options)
    got = (loss, lse, *grads)
    errors = {
        what: rel_err(g, t)
        for what, g, t in zip(("loss", "lse", "d_hidden", "d_weight", "d_bias"), got, want)
        if g is not None
    }
    return {
        "name": name,
        "errors": errors,
        "bound": TOLERANCES["float32"].bound,
        "d_bias_shard_rows": sorted({s.data.shape[0] for s in grads[2].addressable_shards}),
        "expected_shard_rows": [v // mesh_shape[1]],
    }


cases = [
    case(impl, mesh_shape, opts)
    for impl in ("chunked", "reference")
    for mesh_shape in ((1, 4), (2, 2))
    for opts in OPTION_SETS
]
cases.append(case("pallas", (2, 2), "all-mean"))
print(json.dumps({"devices": len(jax.devices()), "cases": cases}))
