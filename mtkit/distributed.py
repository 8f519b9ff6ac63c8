"""Process-group set-up shared by every launch path: python, torchrun and the deepspeed launcher.

The launchers export WORLD_SIZE / RANK / LOCAL_RANK (deepspeed also appends --local_rank, which the CLI
accepts and ignores in favour of the environment). A world of 1 initialises nothing, unless a process group
is asked for: the DeepSpeed engine needs one even alone.

Failure handling: `StopRequest` turns SIGTERM, SIGINT and the death of the launcher into a request to stop
after the current optimizer step (the loop checkpoints and exits). Collectives time out after
`train.collective_timeout_s` so a hung rank ends the others; barriers, where ranks legitimately wait for
one rank's file writes, get the longer `train.barrier_timeout_s`.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

from mtkit import lineage


@dataclass
class Dist:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    launcher: tuple[int, ...] = ()  # this rank's parent, grandparent...: the launcher chain to watch

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

    def any(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise logical OR of an integer tensor of 0/1 flags across ranks (an all-reduce MAX)."""
        if self.world_size > 1:
            tdist.all_reduce(flags, op=tdist.ReduceOp.MAX)
        return flags

    def barrier(self) -> None:
        """Wait for every rank, as long as `train.barrier_timeout_s`: barriers are where ranks wait for
        rank 0 to write a checkpoint or the best model, which can outlast the collective timeout. A rank
        that dies still ends the wait at once (its connections close)."""
        if self.world_size > 1:
            tdist.barrier(group=_barrier_group)

    def barrier_ranks(self, flag: bool) -> list[int]:
        """A barrier that also tells every rank which ranks raised `flag`, in rank order: how ranks agree
        on whether each wrote its part of a checkpoint, with the barrier's patience for a slow writer."""
        flags = torch.zeros(self.world_size, dtype=torch.int32)
        flags[self.rank] = int(flag)
        if self.world_size > 1:
            # The barriers' group is gloo (CPU tensors); without one, the default group's device.
            flags = flags.to("cpu" if _barrier_group is not None else self.device)
            tdist.all_reduce(flags, group=_barrier_group)
        return flags.nonzero().flatten().tolist()

    def all_gather_object(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out


_barrier_group = None  # Dist.barrier's process group; the default one until init_distributed makes one


def init_distributed(device: str = "auto", timeout_s: float | None = None, barrier_timeout_s: float = 1800.0,
                     group: bool = False, init_method: str = "env://") -> Dist:
    """The launch's ranks and device; with `group`, a process group even for a single process.
    `timeout_s` bounds every collective (None: 60 s over gloo on CPU, 600 s over NCCL). `init_method` is
    how W > 1 ranks meet: a launcher's MASTER_ADDR/PORT by default, or e.g. `file:///shared/fs/rendezvous`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    global _barrier_group
    if timeout_s is None:
        timeout_s = 600 if use_cuda else 60
    backend, timeout = "nccl" if use_cuda else "gloo", datetime.timedelta(seconds=timeout_s)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world, timeout=timeout)
        # A timeout is fixed per process group, and gloo's monitored_barrier applies its own only to rank
        # 0's wait (the others' sends still time out with the group): barriers get a group of their own.
        _barrier_group = tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=barrier_timeout_s))
    elif world == 1 and group and not tdist.is_initialized():
        _init_one_rank_group(backend, timeout)
    launched = world > 1 or lineage.is_deepspeed_launch(os.getppid())
    return Dist(world, rank, local_rank, dev, lineage.AT_START if launched else ())


# ---------------------------------------------------------------- stopping

class StopRequest:
    """Set by SIGTERM, SIGINT or the launcher's death; the loop reads `reason` once per optimizer step,
    agrees with the other ranks, checkpoints and exits.

    Signals received after the first are ignored: the DeepSpeed launcher, signalled with its ranks, sends
    them a second SIGTERM at once, and aborting the checkpoint would throw the request away (an abort
    could not corrupt it: checkpoints are written atomically). The handlers only set a flag; printing
    from a signal handler can fail when the main thread is in the middle of a write.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, launcher: tuple[int, ...] = (), poll_s: float = 1.0):
        self.reason: str | None = None
        self.launcher, self.poll_s = launcher, poll_s
        self._previous: dict = {}
        self._previous_mask: set | None = None
        self._done = threading.Event()

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            # A blocked mask is inherited through fork and exec: a job runner or a parent that blocks
            # these signals would otherwise leave the run unstoppable except by SIGKILL.
            self._previous_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        if self.launcher:
            threading.Thread(target=self._watch_launcher, name="mtkit-launcher-watch", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._previous_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)

    def _on_signal(self, signum, frame) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name

    def _watch_launcher(self) -> None:
        # Polling, not PR_SET_PDEATHSIG: that signal covers only the direct parent, not the `deepspeed`
        # command above DeepSpeed's launch.py.
        while not self._done.wait(self.poll_s):
            if lineage.launcher_gone(self.launcher):
                self.reason = self.reason or f"the launcher exited (pid {' or '.join(map(str, self.launcher))})"
                return


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


# DeepSpeed's CPU shared-memory all-reduce (ops/csrc/cpu/comm/shm.cpp) maps one ~70 MB POSIX workspace per
# rank and never unlinks it, which keeps that RAM until reboot. mtkit's engine does not build the op; other
# DeepSpeed programs on the machine still leave these files behind.
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def stale_shm_workspaces() -> list[Path]:
    """This user's DeepSpeed workspaces that no live process maps: left by DeepSpeed programs (other than
    mtkit, whose engine does not build the op that maps them) and by earlier mtkit versions."""
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
