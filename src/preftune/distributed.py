"""Process groups: one process, or torchrun's N processes with DDP.

`setup_distributed` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts the
process group: nccl on CUDA, gloo on CPU. `wrap_policy` returns the module that computes the
policy's completion log-probs, wrapped for the chosen strategy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from preftune.logprobs import CompletionLogps


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    strategy: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def all_reduce_sum(self, value: float) -> float:
        if not self.active:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return t.item()

    def shutdown(self) -> None:
        if self.active and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def setup_distributed(config) -> DistContext:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend)
    strategy = config.train.distributed if config.train.distributed != "auto" else "ddp"
    return DistContext(rank, world_size, local_rank, device, strategy)


def wrap_policy(policy, config, dist: DistContext):
    """(module computing policy log-probs, the wrapper that owns gradient sync)."""
    module = CompletionLogps(policy, config.train.logprob_chunk_size)
    if config.model.compile:
        module = torch.compile(module)
    if dist.active and dist.strategy in ("ddp", "auto"):
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=ids)
    return module, module


def save_policy(policy, folder, dist: DistContext) -> None:
    """Full, HF-loadable weights, written once by rank 0."""
    policy.save_pretrained(folder, safe_serialization=True)
