"""Run as a script: spawns gloo processes on the CPU (tests/test_torch_parallel.py starts it).

Per world size: every rank holds one shard of the weight (uneven shards for 3 ranks) and checks
the vocabulary-parallel loss and both gradients against the single-process result on the full
weight; then a SplitLanguageModellingHead under DistributedDataParallel gives the gradient of the
single-process mean. Prints one line per rank and case; exits 1 on a failure.
"""

import os
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tolerances import PARITY_FLOAT32, rel_err  # noqa: E402

import torch_heads  # noqa: E402
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
    return all(e <= PARITY_FLOAT32 for e in errs), f"loss {errs[0]:.1e} d_hidden {errs[1]:.1e} d_weight shard {errs[2]:.1e}"


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
        cases = [(f"vocab-parallel {r}", lambda r=r: _vocab_parallel_case(rank, world, r)) for r in ("none", "sum", "mean")]
        cases += [("DDP split head", lambda: _ddp_case(rank, world)), ("DTensor weight", lambda: _dtensor_case(rank, world))]
        if world == 2 and os.environ.get("SHARDED_PARITY_FILE"):
            cases.append(("save", lambda: _save_for_jax(rank, world, os.environ["SHARDED_PARITY_FILE"])))
        for name, case in cases:
            ok, detail = case()
            results.put((ok, f"{'ok  ' if ok else 'FAIL'} world {world} rank {rank} {name}: {detail}"))
    finally:
        # Every rank reaches the teardown together: a rank that destroys its group while another
        # still has gloo work in flight can abort ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


def main():
    failures = 0
    for world in (2, 3):
        with tempfile.TemporaryDirectory() as tmp:
            ctx = mp.get_context("spawn")
            results = ctx.SimpleQueue()
            mp.start_processes(_worker, args=(world, os.path.join(tmp, "init"), results), nprocs=world, start_method="spawn")
            while not results.empty():
                ok, line = results.get()
                failures += not ok
                print(line, flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
