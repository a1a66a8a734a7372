"""DistributedDataParallel (gloo, 2 CPU processes): gradients equal the single-process ones."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import reserved_kernels as rk

WORLD = 2


def _model() -> rk.ReservedEmbedding:
    torch.manual_seed(0)
    return rk.ReservedEmbedding(200, 16, reserved_ids=[5, 6, 7, 150], scale=4.0)


def _batch() -> torch.Tensor:
    ids = torch.randint(0, 200, (4, 12), generator=torch.Generator().manual_seed(1))
    ids[:, :4] = torch.tensor([5, 6, 7, 150])
    return ids


def _loss(model, ids):
    return model(ids).pow(2).mean()


def _worker(rank: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ddp = DistributedDataParallel(_model())
        ids = _batch().chunk(WORLD)[rank]
        _loss(ddp, ids).backward()
        if rank == 0:
            torch.save(ddp.module.reserved_weight.grad, out_file)
        dist.barrier()  # both ranks done before either tears down gloo
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalisation on success: gloo's worker threads can abort it with SIGABRT
    # ("terminate called without an active exception"; see pytorch/pytorch#179291).
    os._exit(0)


def test_ddp_gradients_equal_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "grad.pt")
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), out_file), nprocs=WORLD, join=True)
        ddp_grad = torch.load(out_file)
    single = _model()
    _loss(single, _batch()).backward()  # mean over the whole batch = average of the two half means
    torch.testing.assert_close(ddp_grad, single.reserved_weight.grad)
