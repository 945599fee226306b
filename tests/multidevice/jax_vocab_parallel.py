"""Run in a fresh process with 4 fake CPU devices (tests/test_jax_parallel.py starts it).

Checks the vocabulary-parallel op against the unsharded reference: loss and both gradients,
vocabulary-parallel alone (1 x 4) and data x vocabulary parallel (2 x 2), under jit, and that
each device holds only its weight shard's gradient; then the same through the public
``linear_cross_entropy(mesh=..., vocab_axis=...)`` and ``SplitLanguageModellingHead(mesh=...)``
against their unsharded selves, and the configuration errors. Prints one line per case; exits 1
on a failure.
"""

import json
import os
import sys
import zlib

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repository root first: this checkout's packages, not those of another (editable) install.
sys.path[:0] = [os.path.dirname(TESTS), TESTS]
from ground_truth import lce_ground_truth  # noqa: E402

from heads_common.tolerances import PARITY_FLOAT32, rel_err  # noqa: E402
from jax_heads import SplitLanguageModellingHead, linear_cross_entropy  # noqa: E402
from jax_heads.parallel import shard_weight, vocab_parallel_linear_cross_entropy  # noqa: E402

assert len(jax.devices()) == 4, jax.devices()
failures = 0
RESULTS = []  # one {"name", "ok", "detail"} per check, written to $RESULTS_JSON at the end for pytest


def record(ok, name, detail=""):
    """Print one check's line and keep it for the JSON report."""
    global failures
    failures += not ok
    RESULTS.append({"name": name, "ok": bool(ok), "detail": detail})
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)



def check(name, impl, mesh_shape, n, d, v, reduction, interpret=False):
    global failures
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    h = rng.standard_normal((n, d)).astype(np.float32)
    w = (rng.standard_normal((v, d)) * d**-0.5 * 3).astype(np.float32)
    y = rng.integers(0, v, n).astype(np.int32)
    y[rng.random(n) < 0.2] = -100
    up = rng.standard_normal(n).astype(np.float32) if reduction == "none" else None
    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), ("data", "vocab"))
    batch_axis = "data" if mesh_shape[0] > 1 else None
    hs = jax.device_put(h, NamedSharding(mesh, P(batch_axis, None)))
    ws = jax.device_put(w, NamedSharding(mesh, P("vocab", None)))
    ys = jax.device_put(y, NamedSharding(mesh, P(batch_axis)))

    def objective(a, b, fn):
        loss = fn(a, b)
        return jnp.sum(loss * up) if up is not None else loss, loss

    par = lambda a, b: vocab_parallel_linear_cross_entropy(  # noqa: E731
        a, b, ys, mesh=mesh, vocab_axis="vocab", batch_axis=batch_axis, reduction=reduction, impl=impl,
        interpret=interpret,
    )
    ref = lambda a, b: linear_cross_entropy(a, b, jnp.asarray(y), reduction=reduction, impl="reference")  # noqa: E731
    f_par = jax.jit(jax.value_and_grad(lambda a, b: objective(a, b, par), (0, 1), has_aux=True))
    f_ref = jax.value_and_grad(lambda a, b: objective(a, b, ref), (0, 1), has_aux=True)
    (_, loss_p), (dh_p, dw_p) = f_par(hs, ws)
    (_, loss_r), (dh_r, dw_r) = f_ref(jnp.asarray(h), jnp.asarray(w))
    errs = [rel_err(loss_p, loss_r), rel_err(dh_p, dh_r), rel_err(dw_p, dw_r)]
    # and against the float64 ground truth
    g = up if up is not None else (np.ones(n) if reduction == "sum" else np.full(n, 1 / max((y != -100).sum(), 1)))
    truth = lce_ground_truth(h, w, y, g)
    errs.append(rel_err(dw_p, truth[2]))
    shard_rows = {s.data.shape[0] for s in dw_p.addressable_shards}
    ok = all(e <= PARITY_FLOAT32 for e in errs) and shard_rows == {v // mesh_shape[1]}
    record(ok, name, f"rel err loss {errs[0]:.1e} d_hidden {errs[1]:.1e} d_weight {errs[2]:.1e} "
           f"(vs float64 {errs[3]:.1e}); d_weight shard rows {sorted(shard_rows)}")


for impl, interpret in (("reference", False), ("chunked", False), ("pallas", True)):
    check(f"{impl}-1x4-none", impl, (1, 4), 37, 24, 4 * 53, "none", interpret)
    check(f"{impl}-2x2-none", impl, (2, 2), 38, 24, 2 * 61, "none", interpret)
check("reference-2x2-mean", "reference", (2, 2), 40, 16, 2 * 50, "mean")
check("reference-1x4-sum", "reference", (1, 4), 21, 8, 4 * 7, "sum")
check("default-2x2-mean", None, (2, 2), 30, 8, 2 * 9, "mean")  # impl=None: chunked on CPU

# torch-sharded (2 gloo ranks, saved by torch_vocab_parallel.py) equals JAX-sharded (4 devices).
if os.environ.get("SHARDED_PARITY_FILE"):
    saved = np.load(os.environ["SHARDED_PARITY_FILE"])
    h, w, y, up = (saved[k] for k in ("h", "w", "y", "up"))
    d = h.shape[-1]
    mesh = Mesh(np.array(jax.devices()).reshape(1, 4), ("data", "vocab"))
    ws = jax.device_put(w, NamedSharding(mesh, P("vocab", None)))
    fn = lambda a, b: jnp.sum(vocab_parallel_linear_cross_entropy(  # noqa: E731
        a, b, jnp.asarray(y.reshape(-1)), mesh=mesh, vocab_axis="vocab") * up.reshape(-1))
    loss = vocab_parallel_linear_cross_entropy(
        jnp.asarray(h.reshape(-1, d)), ws, jnp.asarray(y.reshape(-1)), mesh=mesh, vocab_axis="vocab"
    )
    dh, dw = jax.jit(jax.grad(fn, (0, 1)))(jnp.asarray(h.reshape(-1, d)), ws)
    errs = [
        rel_err(loss, saved["loss"].reshape(-1)),
        rel_err(dh, saved["d_hidden"].reshape(-1, d)),
        rel_err(dw, saved["d_weight"]),
    ]
    record(all(e <= PARITY_FLOAT32 for e in errs), "torch-sharded (2 ranks) vs JAX-sharded (4 devices)",
           f"loss {errs[0]:.1e} d_hidden {errs[1]:.1e} d_weight {errs[2]:.1e}")



def report(name, errs, extra=""):
    record(all(e <= PARITY_FLOAT32 for e in errs), name, f"rel errs {' '.join(f'{e:.1e}' for e in errs)}{extra}")


def public_op(name, mesh_shape, lead, d, v, reduction):
    """jax_heads.linear_cross_entropy(mesh=..., vocab_axis=...) on (B, S, D) inputs against the unsharded op."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    h = rng.standard_normal((*lead, d)).astype(np.float32)
    w = (rng.standard_normal((v, d)) * d**-0.5 * 3).astype(np.float32)
    y = rng.integers(0, v, lead).astype(np.int32)
    y[rng.random(lead) < 0.2] = -100
    up = rng.standard_normal(lead).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), ("data", "vocab"))
    batch_axis = "data" if mesh_shape[0] > 1 else None
    opts = dict(mesh=mesh, vocab_axis="vocab", batch_axis=batch_axis)

    def objective(a, b, **kw):
        loss = linear_cross_entropy(a, b, jnp.asarray(y), reduction=reduction, **kw)
        return jnp.sum(loss * up) if reduction == "none" else loss

    got = jax.jit(jax.value_and_grad(lambda a, b: objective(a, b, **opts), (0, 1)))(
        jnp.asarray(h), shard_weight(jnp.asarray(w), mesh, "vocab"))
    want = jax.value_and_grad(lambda a, b: objective(a, b, impl="reference"), (0, 1))(jnp.asarray(h), jnp.asarray(w))
    errs = [rel_err(got[0], want[0]), rel_err(got[1][0], want[1][0]), rel_err(got[1][1], want[1][1])]
    report(f"linear_cross_entropy(mesh) {name}", errs, " (loss, d_hidden, d_weight)")


public_op("1x4-3x8-mean", (1, 4), (3, 8), 16, 4 * 13, "mean")
public_op("2x2-4x5-none", (2, 2), (4, 5), 16, 2 * 31, "none")

# Out-of-range labels: eagerly a ValueError (as the plain op); under jit a NaN at that position only.
mesh = Mesh(np.array(jax.devices()).reshape(1, 4), ("data", "vocab"))
opts = dict(mesh=mesh, vocab_axis="vocab")
h4, w4, y4 = jnp.ones((2, 3, 8)), jnp.ones((8, 8)), jnp.array([[0, 9, 1], [2, 3, -100]], jnp.int32)
try:
    linear_cross_entropy(h4, w4, y4, **opts)
    record(False, "linear_cross_entropy(mesh) eager out-of-range label", "did not raise")
except ValueError as exc:
    record(True, "linear_cross_entropy(mesh) eager out-of-range label", str(exc))
traced = jax.jit(lambda a, b, c: linear_cross_entropy(a, b, c, **opts))(h4, w4, y4)
ok = bool(jnp.isnan(traced[0, 1])) and not bool(jnp.isnan(traced).sum() > 1) and float(traced[1, 2]) == 0.0
record(ok, "linear_cross_entropy(mesh) traced out-of-range label", f"NaN there only: {np.asarray(traced)}")


def head_case(name, mesh_shape, sizes, order, impl=None, interpret=False, lead=(4, 6), hidden=16):
    """SplitLanguageModellingHead(mesh=...) with sharded kernels against the same head unsharded."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    v = sum(sizes.values())
    h = jnp.asarray(rng.standard_normal((*lead, hidden)).astype(np.float32))
    y = rng.integers(0, v, lead).astype(np.int32)
    y[rng.random(lead) < 0.2] = -100
    y = jnp.asarray(y)
    up = jnp.asarray(rng.standard_normal(lead).astype(np.float32))
    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), ("data", "vocab"))
    batch_axis = "data" if mesh_shape[0] > 1 else None
    ref = SplitLanguageModellingHead(sizes, order, hidden, rngs=nnx.Rngs(3), impl="reference")
    par = SplitLanguageModellingHead(sizes, order, hidden, rngs=nnx.Rngs(3), impl=impl, interpret=interpret,
                                     mesh=mesh, vocab_axis="vocab", batch_axis=batch_axis)
    par.shard_kernels()

    def loss_fn(head):
        return jnp.sum(head(h, y) * up)

    loss_p, grads_p = nnx.jit(nnx.value_and_grad(loss_fn))(par)
    loss_r, grads_r = nnx.value_and_grad(loss_fn)(ref)
    errs = [rel_err(loss_p, loss_r)] + [
        rel_err(grads_p["lm_head"][n]["kernel"][...], grads_r["lm_head"][n]["kernel"][...]) for n in order
    ]
    specs = sorted({str(par.lm_head[n].kernel[...].sharding.spec) for n in order})
    report(f"head(mesh) {name}", errs, f" (loss, kernel grads per split); kernels placed {specs}")


head_case("1x4-two-splits", (1, 4), {"text": 88, "special": 8}, ["text", "special"])
head_case("2x2-two-splits", (2, 2), {"text": 37, "special": 3}, ["special", "text"])
head_case("1x4-one-split-pallas", (1, 4), {"text": 64}, ["text"], impl="pallas", interpret=True, lead=(3, 5))

# A bad configuration is a clear error.
mesh = Mesh(np.array(jax.devices()).reshape(1, 4), ("data", "vocab"))
bad_configs = [
    ("uneven vocabulary", lambda: vocab_parallel_linear_cross_entropy(
        jnp.ones((4, 8)), jnp.ones((30, 8)), jnp.zeros(4, jnp.int32), mesh=mesh, vocab_axis="vocab"), ValueError),
    ("mesh without vocab_axis", lambda: linear_cross_entropy(h4, w4, y4 % 8, mesh=mesh), ValueError),
    ("vocab_axis without mesh", lambda: linear_cross_entropy(h4, w4, y4 % 8, vocab_axis="vocab"), ValueError),
    ("batch_axis alone", lambda: linear_cross_entropy(h4, w4, y4 % 8, batch_axis="data"), ValueError),
    ("unknown axis", lambda: linear_cross_entropy(h4, w4, y4 % 8, mesh=mesh, vocab_axis="vocabulary"), ValueError),
    ("head uneven vocabulary", lambda: SplitLanguageModellingHead(
        {"a": 5, "b": 2}, ["a", "b"], 8, rngs=nnx.Rngs(0), mesh=mesh, vocab_axis="vocab"), ValueError),
    ("head shard_kernels without mesh", lambda: SplitLanguageModellingHead(
        {"a": 8}, ["a"], 8, rngs=nnx.Rngs(0)).shard_kernels(), ValueError),
]
for name, fn, error in bad_configs:
    try:
        fn()
        record(False, name, "did not raise")
    except error as exc:
        record(True, name, str(exc))
if os.environ.get("RESULTS_JSON"):
    with open(os.environ["RESULTS_JSON"], "w") as f:
        json.dump(RESULTS, f, indent=1)
sys.exit(1 if failures else 0)
