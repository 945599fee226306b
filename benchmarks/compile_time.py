"""First-call (compile) and steady-state time of torch ``impl="pallas"``, per shape, on a GPU.

    python benchmarks/compile_time.py [--out DIR]

JAX's import and GPU backend start are timed apart from the first call. Shapes: the Gemma-2 head,
then half the tokens (a new shape: compiles again), then the Gemma-2 head again (cached: no
compile). Forward + backward, bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import torch_heads  # noqa: E402


def step(h, w, y):
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss = torch_heads.linear_cross_entropy(hh, ww, y, impl="pallas")
    loss.backward(torch.ones_like(loss))
    torch.cuda.synchronize()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=".")
    args = p.parse_args()
    t0 = time.perf_counter()
    import jax

    jax.devices("gpu")
    result = {"card": torch.cuda.get_device_name(), "jax_import_and_backend_s": time.perf_counter() - t0, "shapes": []}
    for n, d, v in ((8192, 2304, 256_000), (4096, 2304, 256_000), (8192, 2304, 256_000)):
        g = torch.Generator(device="cuda").manual_seed(0)
        h = torch.randn(n, d, device="cuda", generator=g).bfloat16()
        w = (torch.randn(v, d, device="cuda", generator=g) * d**-0.5).bfloat16()
        y = torch.randint(0, v, (n,), device="cuda", generator=g)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(h, w, y)
        first = time.perf_counter() - t0
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            step(h, w, y)
            times.append(time.perf_counter() - t0)
        row = {"shape": [n, d, v], "first_call_s": first, "steady_ms": 1e3 * statistics.median(times)}
        result["shapes"].append(row)
        print(row, flush=True)
    print(json.dumps(result, indent=1))
    with open(os.path.join(args.out, "compile_time.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
