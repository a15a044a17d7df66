"""Run by test_train_distributed.py under `torchrun --nproc_per_node 2`: DDP training on CPU (gloo).

Each rank takes its half of every global batch; rank 0 saves the trained weights to argv[1].
"""

import sys

import torch

from safesail.train.distributed import DistContext
from safesail.train.trainer import TrainOptions, train_saes


def global_batches(n_batches=12, batch=64, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d, generator=g) * 3 + 1 for _ in range(n_batches)]


CONFIGS = [dict(arch="topk", k=4, d_in=16, n_latents=64, lr=3e-3, seed=1),
           dict(arch="relu", l1_coef=0.01, d_in=16, n_latents=64, lr=3e-3, seed=2)]
OPTS = dict(lr_warmup_steps=3, dead_tokens=128, progress=False)

if __name__ == "__main__":
    torch.set_num_threads(1)
    ctx = DistContext.from_env("ddp", "cpu")
    half = 64 // ctx.world_size
    mine = [b[ctx.rank * half:(ctx.rank + 1) * half] for b in global_batches()]
    trained = train_saes(mine, CONFIGS, TrainOptions(**OPTS), ctx=ctx)
    if ctx.rank == 0:
        torch.save({t.name: t.sae.state_dict() for t in trained}, sys.argv[1])
