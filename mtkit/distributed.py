"""Process-group set-up shared by every launch path: python, torchrun and the deepspeed launcher.

The launchers export WORLD_SIZE / RANK / LOCAL_RANK (deepspeed also appends --local_rank, which the CLI
accepts and ignores in favour of the environment). A world of 1 initialises nothing.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def world_rank(self) -> tuple[int, int]:
        return self.world_size, self.rank

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.to(self.device)
            tdist.all_reduce(t)
            t = t.cpu()
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            tdist.barrier()

    def all_gather_object(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out


def init_distributed(device: str = "auto", timeout_s: int = 600) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group("nccl" if use_cuda else "gloo",
                                 timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(world, rank, local_rank, dev)
