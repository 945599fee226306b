"""Large shapes on the GPU (issue: tokens × vocabulary and weight elements beyond 2**31).

Marked ``gpu`` (skipped without CUDA) and ``large`` (minutes of GPU time and tens of GB):
run on the GPU machine with ``python -m pytest -m "gpu and large" tests/test_gpu_large.py``.
Each fast path is checked against the chunked path (float32 math) on a sample of rows: the loss
and ``d_hidden`` of sampled tokens, the ``d_weight`` of sampled vocabulary rows (including the
last ones, where a wrapped 32-bit offset would land).
"""

from __future__ import annotations

import os

import pytest
import torch

import torch_heads
from heads_common.tolerances import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.large]

SHAPES = {
    # tokens x vocabulary = 4.3e9 > 2**31
    "tokens-x-vocab": (16_384, 256, 262_144),
    # weight elements V x D = 2.1e9 > 2**31
    "weight-elements": (512, 8_192, 262_144),
}


def _run(impl, h, w, y, up):
    hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
    if impl == "jax-pallas":
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        import jax

        from interop import to_jax, to_torch
        from jax_heads.pallas import pallas_loss

        loss, vjp = jax.vjp(lambda a, b: pallas_loss(a, b, to_jax(y.int()), -100), to_jax(h), to_jax(w))
        dh, dw = vjp(to_jax(up))
        return to_torch(loss), to_torch(dh), to_torch(dw)
    kwargs = {"filter_eps": None} if impl == "cce" else {}
    loss = torch_heads.linear_cross_entropy(hh, ww, y, impl=impl, **kwargs)
    loss.backward(up)
    return loss.detach(), hh.grad, ww.grad


@pytest.mark.parametrize("impl", ["cce", "pallas", "jax-pallas"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_large_shape_matches_chunked_on_sampled_rows(shape, impl):
    n, d, v = SHAPES[shape]
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, d, device="cuda", generator=g).bfloat16()
    w = (torch.randn(v, d, device="cuda", generator=g) * d**-0.5).bfloat16()
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[torch.rand(n, device="cuda", generator=g) < 0.1] = -100
    y[-1] = v - 1  # the last vocabulary row is a target
    up = torch.randn(n, device="cuda", generator=g)
    tokens = torch.cat([torch.randint(0, n, (64,), device="cuda", generator=g), torch.tensor([n - 1], device="cuda")])
    rows = torch.cat([torch.randint(0, v, (64,), device="cuda", generator=g), torch.arange(v - 8, v, device="cuda")])

    truth = [t[idx].float().cpu() for t, idx in zip(_run("chunked", h, w, y, up), (tokens, tokens, rows))]
    got = [t[idx].float().cpu() for t, idx in zip(_run(impl, h, w, y, up), (tokens, tokens, rows))]
    # The chunked path rounds its gradients to bf16 too: compare with the bf16 rounding as the naive error.
    for name, value, t in zip(("loss", "d_hidden", "d_weight"), got, truth):
        if impl == "cce" and name == "d_hidden":  # the peer's own accumulation error (tolerances.py)
            assert_close(f"{shape}-{impl}-{name}", value.numpy(), t.numpy(), "bfloat16-cce-large-d_hidden")
            continue
        naive = t.bfloat16().float() if name != "loss" else t
        assert_close(f"{shape}-{impl}-{name}", value.numpy(), t.numpy(), "bfloat16", naive=naive.numpy())
