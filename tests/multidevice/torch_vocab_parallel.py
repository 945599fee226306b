"""Run as a script: spawns gloo processes on the CPU (tests/test_torch_parallel.py starts it).

Per world size: every rank holds one shard of the weight (uneven shards for 3 ranks) and checks
the vocabulary-parallel loss and both gradients against the single-process result on the full
weight; then a SplitLanguageModellingHead under DistributedDataParallel gives the gradient of the
single-process mean; the vocabulary-parallel SplitLanguageModellingHead, loaded from a full state
dict, equals the unsharded head (and shards and gathers per-split biases); impl='pallas' (interpret
mode) per shard equals the reference; bad configurations are refused. Prints one line per rank and
case; exits 1 on a failure.
"""

import json
import os
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The repository root first: this checkout's packages, not those of another (editable) install; hence
# the imports below follow code (E402).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch_heads  # noqa: E402
from heads_common.tolerances import PARITY_FLOAT32, rel_err  # noqa: E402
from torch_heads.parallel import shard_range, vocab_parallel_linear_cross_entropy  # noqa: E402


def _inputs(seed, n=(3, 13), d=24, v=101):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*n, d, generator=g)
    w = torch.randn(v, d, generator=g) * d**-0.5 * 3
    y = torch.randint(0, v, n, generator=g)
    y[torch.rand(n, generator=g) < 0.2] = -100
    up = torch.randn(n, generator=g)
    return h, w, y, up


def _vocab_parallel_case(rank, world, reduction):
    h, w, y, up = _inputs(7)
    start, stop = shard_range(w.shape[0], rank, world)
    hh = h.clone().requires_grad_()
    ws = w[start:stop].clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(hh, ws, y, vocab_start=start, vocab_size=w.shape[0], reduction=reduction)
    (loss * up if reduction == "none" else loss).sum().backward()

    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = torch_heads.linear_cross_entropy(hr, wr, y, reduction=reduction, impl="reference")
    (ref * up if reduction == "none" else ref).sum().backward()
    errs = [rel_err(loss.detach(), ref.detach()), rel_err(hh.grad, hr.grad), rel_err(ws.grad, wr.grad[start:stop])]
    detail = f"loss {errs[0]:.1e} d_hidden {errs[1]:.1e} d_weight shard {errs[2]:.1e}"
    return all(e <= PARITY_FLOAT32 for e in errs), detail


def _options_case(rank, world):
    """Every loss option (bias sharded with the weight, softcap, label smoothing, z-loss, shift 1,
    returned lse) on uneven shards against the single-device reference on the full weight and bias."""
    h, w, y, up = _inputs(17)
    b = torch.randn(w.shape[0], generator=torch.Generator().manual_seed(17))
    options = {"softcap": 2.0, "label_smoothing": 0.2, "lse_square_scale": 0.05, "shift": 1, "return_lse": True}
    start, stop = shard_range(w.shape[0], rank, world)
    hh, ws, bs = (x.clone().requires_grad_() for x in (h, w[start:stop], b[start:stop]))
    loss, lse = vocab_parallel_linear_cross_entropy(
        hh, ws, y, vocab_start=start, vocab_size=w.shape[0], bias_shard=bs, **options
    )
    ((loss + lse) * up[:, 1:]).sum().backward()
    hr, wr, br = h.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
    ref, ref_lse = torch_heads.linear_cross_entropy(hr, wr, y, bias=br, impl="reference", **options)
    ((ref + ref_lse) * up[:, 1:]).sum().backward()
    errs = [rel_err(loss.detach(), ref.detach()), rel_err(lse.detach(), ref_lse.detach()), rel_err(hh.grad, hr.grad),
            rel_err(ws.grad, wr.grad[start:stop]), rel_err(bs.grad, br.grad[start:stop])]
    return all(e <= PARITY_FLOAT32 for e in errs), "loss, lse, d_hidden, d_weight, d_bias shards " + " ".join(
        f"{e:.1e}" for e in errs)


def _ddp_case(rank, world):
    torch.manual_seed(0)
    head = torch_heads.SplitLanguageModellingHead({"text": 90, "special": 3}, ["text", "special"], 16)
    ref_head = torch_heads.SplitLanguageModellingHead({"text": 90, "special": 3}, ["text", "special"], 16)
    ref_head.load_state_dict(head.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(head)
    g = torch.Generator().manual_seed(11)
    h = torch.randn(world, 5, 16, generator=g)
    y = torch.randint(0, 93, (world, 5), generator=g)
    ddp(h[rank : rank + 1], y[rank : rank + 1]).mean().backward()  # DDP averages over ranks
    ref_head(h, y).mean().backward()
    errs = [rel_err(head.lm_head[n].weight.grad, ref_head.lm_head[n].weight.grad) for n in ("text", "special")]
    return all(e <= PARITY_FLOAT32 for e in errs), f"split weight grads {errs[0]:.1e} {errs[1]:.1e}"


def _dtensor_case(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    h, w, y, _ = _inputs(3)
    wd = distribute_tensor(w[: 100 - 100 % world], mesh, [Shard(0)])
    try:
        torch_heads.linear_cross_entropy(h, wd, y.clamp_max(100 - 100 % world - 1))
    except TypeError as exc:
        return "DTensor" in str(exc), f"refused: {str(exc)[:70]}"
    return False, "a DTensor weight was not refused"


SPLITS, ORDER, HIDDEN = {"text": 40, "code": 9, "special": 2}, ["text", "special", "code"], 16


def _sharded_head_case(rank, world):
    """The vocabulary-parallel split head (loaded from a full d9d state dict) against the unsharded head.

    With 3 ranks, ranks 0 and 1 hold no rows of "special" and "code" (empty nn.Linear splits).
    """
    torch.manual_seed(5)
    full = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, HIDDEN, impl="reference")
    head = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, HIDDEN, vocab_parallel_group=dist.group.WORLD)
    head.load_state_dict(head.shard_state_dict(full.state_dict()))
    g = torch.Generator().manual_seed(9)
    h = torch.randn(3, 7, HIDDEN, generator=g)
    y = torch.randint(0, 51, (3, 7), generator=g)
    y[0, :2] = -100
    up = torch.randn(3, 7, generator=g)
    hh, hr = h.clone().requires_grad_(), h.clone().requires_grad_()
    loss = head(hh, y)
    (loss * up).sum().backward()
    ref = full(hr, y)
    (ref * up).sum().backward()
    start, stop = head.vocab_range
    errs = [rel_err(loss.detach(), ref.detach()), rel_err(hh.grad, hr.grad)]
    offset = 0
    for name in ORDER:  # each split's local rows are the matching rows of its full gradient
        lo, hi = max(start, offset) - offset, max(start, min(stop, offset + SPLITS[name])) - offset
        local = head.lm_head[name].weight
        full_grad = full.lm_head[name].weight.grad
        errs.append(rel_err(local.grad, full_grad[lo:hi]) if hi > lo else float(local.grad.numel()))
        offset += SPLITS[name]
    gathered = head.full_state_dict()
    full_sd = full.state_dict()
    same = list(gathered) == list(full_sd) and all(torch.equal(gathered[k], full_sd[k]) for k in gathered)
    rows = {n: head.lm_head[n].weight.shape[0] for n in ORDER}
    ok = all(e <= PARITY_FLOAT32 for e in errs) and same and head.implementation_for(h) == "chunked"
    rel_errs = " ".join(f"{e:.1e}" for e in errs)
    return ok, f"range [{start}, {stop}) rows {rows}; rel errs {rel_errs}; full_state_dict {same}"


def _sharded_bias_case(rank, world):
    """A split head with bias=True: shard_state_dict cuts each split's bias to the rank's rows with its
    weight rows, and full_state_dict gathers weights and biases back into the unsharded state dict."""
    torch.manual_seed(6)
    full = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, HIDDEN, bias=True)
    head = torch_heads.SplitLanguageModellingHead(
        SPLITS, ORDER, HIDDEN, bias=True, vocab_parallel_group=dist.group.WORLD
    )
    head.load_state_dict(head.shard_state_dict(full.state_dict()), strict=True)
    start, stop = head.vocab_range
    rows_ok = torch.equal(head.bias(), full.bias()[start:stop])
    rows_ok = rows_ok and torch.equal(head.weight(), full.weight()[start:stop])
    gathered = head.full_state_dict()
    expected = full.state_dict()
    same = list(gathered) == list(expected) and all(torch.equal(gathered[k], expected[k]) for k in expected)
    rows = {n: tuple(head.lm_head[n].bias.shape) for n in ORDER}
    return rows_ok and same, f"range [{start}, {stop}) bias rows {rows}; local rows {rows_ok}; full_state_dict {same}"


def _pallas_interpret_case(rank, world):
    """impl='pallas' per shard (our kernels through DLPack, in Pallas interpret mode) on gloo."""
    h, w, y, up = _inputs(13, n=(2, 9), d=24, v=61)
    start, stop = shard_range(w.shape[0], rank, world)
    hh, ws = h.clone().requires_grad_(), w[start:stop].clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(
        hh, ws, y, vocab_start=start, vocab_size=w.shape[0], impl="pallas", interpret=True
    )
    (loss * up).sum().backward()
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref = torch_heads.linear_cross_entropy(hr, wr, y, impl="reference")
    (ref * up).sum().backward()
    errs = [rel_err(loss.detach(), ref.detach()), rel_err(hh.grad, hr.grad), rel_err(ws.grad, wr.grad[start:stop])]
    detail = f"loss {errs[0]:.1e} d_hidden {errs[1]:.1e} d_weight shard {errs[2]:.1e}"
    return all(e <= PARITY_FLOAT32 for e in errs), detail


def _errors_case(rank, world):
    """Configurations that make no sense are refused with the error type and a message naming the problem."""
    from flax import nnx

    import jax_heads
    from interop.porting import port_torch_to_flax

    group = dist.group.WORLD
    h, w, y, _ = _inputs(3)
    start, stop = shard_range(w.shape[0], rank, world)
    head = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, HIDDEN, vocab_parallel_group=group)
    full_sd = torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, HIDDEN).state_dict()
    head_with = lambda **kw: torch_heads.SplitLanguageModellingHead(SPLITS, ORDER, HIDDEN, **kw)  # noqa: E731
    op = lambda **kw: vocab_parallel_linear_cross_entropy(  # noqa: E731
        h, w[start:stop], y, vocab_start=start, vocab_size=w.shape[0], **kw
    )
    expected = [
        (lambda: head_with(impl="cce", vocab_parallel_group=group), ValueError, "cut-cross-entropy has no vocabulary"),
        (lambda: head_with(filter_eps=1e-3, vocab_parallel_group=group), ValueError, "filter_eps=0.001"),
        (lambda: head_with(vocab_parallel_group=0), TypeError, "ProcessGroup"),
        (lambda: torch_heads.SplitLanguageModellingHead({"a": 1}, ["a"], HIDDEN, vocab_parallel_group=group),
         ValueError, "cannot be split over"),
        (lambda: head.shard_state_dict(head.state_dict()), ValueError, "must be the unsharded"),
        (lambda: head.shard_state_dict({k: v for k, v in full_sd.items() if "code" not in k}), KeyError, "code"),
        (
            lambda: port_torch_to_flax(
                head, jax_heads.SplitLanguageModellingHead(SPLITS, ORDER, HIDDEN, rngs=nnx.Rngs(0))
            ),
            ValueError,
            "vocabulary-parallel",
        ),
        (lambda: op(impl="pallas"), ValueError, "interpret=True runs the kernels"),
        (lambda: op(impl="chunked", interpret=True), ValueError, "interpret=True applies to impl='pallas' only"),
    ]
    missed = []
    for i, (fn, error, text) in enumerate(expected):
        try:
            fn()
            missed.append(f"#{i} did not raise")
        except error as exc:
            if text not in str(exc):
                missed.append(f"#{i} said {exc}")
    return not missed, f"{len(expected)} refused" if not missed else "; ".join(missed)


def _save_for_jax(rank, world, path):
    """World 2: the sharded torch results on inputs the JAX script re-runs on 4 devices."""
    h, w, y, up = _inputs(21, v=100)
    start, stop = shard_range(w.shape[0], rank, world)
    hh, ws = h.clone().requires_grad_(), w[start:stop].clone().requires_grad_()
    loss = vocab_parallel_linear_cross_entropy(hh, ws, y, vocab_start=start, vocab_size=w.shape[0])
    (loss * up).sum().backward()
    shards = [torch.empty_like(ws.grad) for _ in range(world)]
    dist.all_gather(shards, ws.grad)
    if rank == 0:
        arrays = dict(h=h, w=w, y=y, up=up, loss=loss.detach(), d_hidden=hh.grad, d_weight=torch.cat(shards))
        np.savez(path, **{k: v.numpy() for k, v in arrays.items()})
    return True, f"saved sharded results for the JAX comparison to {os.path.basename(path)}"


def _worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cases = [
            (f"vocab-parallel {r}", lambda r=r: _vocab_parallel_case(rank, world, r)) for r in ("none", "sum", "mean")
        ]
        cases.append(("vocab-parallel loss options", lambda: _options_case(rank, world)))
        cases += [
            ("DDP split head", lambda: _ddp_case(rank, world)),
            ("DTensor weight", lambda: _dtensor_case(rank, world)),
        ]
        cases += [
            ("sharded split head", lambda: _sharded_head_case(rank, world)),
            ("sharded split head biases", lambda: _sharded_bias_case(rank, world)),
            ("pallas interpret per shard", lambda: _pallas_interpret_case(rank, world)),
            ("errors", lambda: _errors_case(rank, world)),
        ]
        if world == 2 and os.environ.get("SHARDED_PARITY_FILE"):
            cases.append(("save", lambda: _save_for_jax(rank, world, os.environ["SHARDED_PARITY_FILE"])))
        for name, case in cases:
            ok, detail = case()
            results.put({"world": world, "rank": rank, "name": name, "ok": bool(ok), "detail": detail})
    finally:
        # Every rank reaches the teardown together: a rank that destroys its group while another
        # still has gloo work in flight can abort ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


def main():
    """Every case on 2 and 3 gloo ranks; one line each, and the JSON list of them in $RESULTS_JSON (for pytest)."""
    records = []
    for world in (2, 3):
        with tempfile.TemporaryDirectory() as tmp:
            ctx = mp.get_context("spawn")
            results = ctx.SimpleQueue()
            mp.start_processes(
                _worker, args=(world, os.path.join(tmp, "init"), results), nprocs=world, start_method="spawn"
            )
            while not results.empty():
                r = results.get()
                records.append(r)
                print(f"{'ok  ' if r['ok'] else 'FAIL'} world {r['world']} rank {r['rank']} {r['name']}: {r['detail']}",
                      flush=True)
    if os.environ.get("RESULTS_JSON"):
        with open(os.environ["RESULTS_JSON"], "w") as f:
            json.dump(records, f, indent=1)
    sys.exit(1 if any(not r["ok"] for r in records) else 0)


if __name__ == "__main__":
    main()
