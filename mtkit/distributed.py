"""Process-group set-up shared by every launch path: python, torchrun and the deepspeed launcher.

The launchers export WORLD_SIZE / RANK / LOCAL_RANK (deepspeed also appends --local_rank, which the CLI
accepts and ignores in favour of the environment). A world of 1 initialises nothing, unless a process group
is asked for: the DeepSpeed engine needs one even alone.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

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


def init_distributed(device: str = "auto", timeout_s: int = 600, group: bool = False) -> Dist:
    """The launch's ranks and device; with `group`, a process group even for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend, timeout = "nccl" if use_cuda else "gloo", datetime.timedelta(seconds=timeout_s)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=timeout)
    elif world == 1 and group and not tdist.is_initialized():
        _init_one_rank_group(backend, timeout)
    return Dist(world, rank, local_rank, dev)


_one_rank: dict = {}  # the folder and variables of the group below, while it exists


def _init_one_rank_group(backend: str, timeout: datetime.timedelta) -> None:
    """A one-rank group that meets through a file in a temporary folder: no TCP port, no launcher.

    It lives until the process exits: DeepSpeed caches its groups across engines, so a pipeline's later
    stages reuse this one rather than a destroyed one."""
    folder = tempfile.TemporaryDirectory(prefix="mtkit_pg_")
    store = tdist.FileStore(os.path.join(folder.name, "store"), 1)
    tdist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    # DeepSpeed insists on the variables a launcher would have set.
    env = {k: v for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items() if k not in os.environ}
    os.environ.update(env)
    _one_rank.update(folder=folder, env=env)
    atexit.register(close_one_rank_group)


def close_one_rank_group() -> None:
    """Destroy the group `init_distributed(group=True)` made for a single process, if any."""
    if not _one_rank:
        return
    if tdist.is_initialized():
        tdist.destroy_process_group()
    _one_rank["folder"].cleanup()
    for name in _one_rank["env"]:
        os.environ.pop(name, None)
    _one_rank.clear()
    atexit.unregister(close_one_rank_group)


# DeepSpeed's CPU all-reduce (ops/csrc/cpu/comm/shm.cpp) maps one ~70 MB POSIX shared-memory workspace per
# rank when all ranks share a machine, and never unlinks it: every launch would leave its workspaces in
# /dev/shm, which is RAM, until reboot. A few dozen runs fill a workstation.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def shm_workspace(rank: int) -> Path:
    """This launch's workspace for `rank` (named from the uid and the launcher's MASTER_ADDR/PORT)."""
    return SHM_DIR / (f"{SHM_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                      f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_workspace(dist: Dist) -> None:
    """Unlink this rank's workspace once every rank has mapped every workspace (all ranks are past
    `deepspeed.initialize`, hence the barrier). The mappings stay valid; the memory goes back when the
    processes exit, however they exit."""
    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        shm_workspace(dist.rank).unlink()


def stale_shm_workspaces() -> list[Path]:
    """This user's DeepSpeed workspaces that no live process maps: left by launches that died before
    releasing them, or by DeepSpeed programs other than mtkit."""
    mine = {p for p in SHM_DIR.glob(f"{SHM_PREFIX}_{os.getuid()}_*") if p.is_file()}
    if not mine:  # the usual case: no need to read every process's maps
        return []
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):  # processes come and go; others' maps may be unreadable
            mine -= {Path(line.split(maxsplit=5)[-1].strip()) for line in maps.read_text().splitlines()
                     if SHM_PREFIX in line}
    return sorted(mine)


def remove_stale_shm_workspaces() -> list[tuple[Path, int]]:
    """Unlink the stale workspaces; returns (path, bytes) of each one removed."""
    removed = []
    for p in stale_shm_workspaces():
        with contextlib.suppress(FileNotFoundError):
            size = p.stat().st_size
            p.unlink()
            removed.append((p, size))
    return removed
