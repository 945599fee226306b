"""First-call (compile) and steady-state time of torch ``impl="pallas"``, per shape, on a GPU.

    python -m benchmarks.compile_time [--out DIR]

JAX's import and GPU backend start are timed apart from the first call. Shapes: the Gemma-2 head,
then half the tokens (a new shape: compiles again), then the Gemma-2 head again (cached: no
compile). Forward + backward, bf16; the steady time is ``benchmarks.common.time_ms``'s median.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import torch  # noqa: E402

import torch_heads  # noqa: E402
from benchmarks.common import cuda_sync, environment, make_inputs, time_ms, write_json  # noqa: E402

SHAPES = ((8192, 2304, 256_000), (4096, 2304, 256_000), (8192, 2304, 256_000))


def step(h, w, y):
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = torch_heads.linear_cross_entropy(hh, ww, y, impl="pallas")
    loss.backward(torch.ones_like(loss))
    return ww.grad


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    import jax

    jax.devices("gpu")
    result = {"env": environment(), "jax_import_and_backend_s": time.perf_counter() - t0, "shapes": []}
    for n, d, v in SHAPES:
        inputs = make_inputs(n, d, v)
        h, w, y = inputs.hidden, inputs.weight, inputs.labels
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        cuda_sync(step(h, w, y))
        first = time.perf_counter() - t0
        steady = time_ms(lambda h=h, w=w, y=y: step(h, w, y), sync=cuda_sync).median_ms
        row = {"shape": [n, d, v], "first_call_s": first, "steady_ms": steady}
        result["shapes"].append(row)
        print(row, flush=True)
    write_json(os.path.join(args.out, "compile_time.json"), result)


if __name__ == "__main__":
    main()
