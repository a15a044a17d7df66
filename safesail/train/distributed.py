"""Process-group helpers for data-parallel SAE training (torchrun / accelerate launch).

`DistContext.from_env()` starts the process group through accelerate's `PartialState`
when launched with several processes (gloo on CPU, nccl on GPUs) and is a no-op otherwise.
Two modes (train.distributed):
- `ddp`: every rank reads its own slice of each global batch; gradients are summed over ranks
  (losses are divided by global counts), so results equal one process on the whole batch.
- `sae_parallel`: every rank reads all the data and trains its own subset of the sweep's
  SAEs (SAE i on rank i % world_size): a sweep of N SAEs uses N GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    mode: str = "ddp"          # ddp | sae_parallel
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def data_parallel(self) -> bool:
        return self.active and self.mode == "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, mode: str = "ddp", device: str | torch.device = "cpu") -> "DistContext":
        dev = torch.device(device)
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(0, 1, mode, dev)
        from accelerate import PartialState

        state = PartialState(cpu=dev.type == "cpu")
        if dev.type == "cuda":
            dev = state.device
        return cls(state.process_index, state.num_processes, mode, dev)

    # ---- collectives (no-ops in one process) ------------------------------------
    def all_reduce_(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.active:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def sum_grads_(self, params) -> None:
        """Sum the gradients of `params` over ranks in one flat all-reduce."""
        if not self.data_parallel:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()
