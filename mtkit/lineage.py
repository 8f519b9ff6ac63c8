"""Which processes launched this one, read from /proc, and whether they are still there.

A rank started by a launcher must stop when the launcher is killed, or it trains on, orphaned, to the end
of the run. `AT_START` is the launcher chain as this module first saw it: the entry points' shared parser
(`mtkit.args`) imports it before any slow import (torch, transformers, DeepSpeed take seconds), so a
launcher killed while the rank starts up is noticed too. No torch here, for that reason.
"""
from __future__ import annotations

import os
from pathlib import Path


def _parent_of(pid: int) -> int | None:
    """The parent pid of `pid` from /proc (None when gone or without /proc)."""
    if pid == os.getpid():
        return os.getppid()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"; comm may hold spaces


def _argv(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def is_deepspeed_launch(pid: int) -> bool:
    """DeepSpeed's per-node `launch.py`, the direct parent of its ranks."""
    return b"deepspeed.launcher.launch" in _argv(pid)


def _is_deepspeed_command(pid: int) -> bool:
    return any(os.path.basename(a) == b"deepspeed" or a == b"deepspeed.launcher.runner" for a in _argv(pid))


def ancestors(n: int) -> tuple[int, ...]:
    """This process's parent, grandparent, ... (at most n)."""
    chain, pid = [], os.getpid()
    for _ in range(n):
        pid = _parent_of(pid)
        if pid is None:
            break
        chain.append(pid)
    return tuple(chain)


def launcher_chain() -> tuple[int, ...]:
    """The processes whose death orphans this rank: its launcher (torchrun, DeepSpeed's per-node
    `launch.py`), and above DeepSpeed's `launch.py` the `deepspeed` command itself, which a user or a
    scheduler kills without `launch.py` noticing."""
    parent = os.getppid()
    return ancestors(2) if is_deepspeed_launch(parent) else (parent,)


def launcher_gone(chain: tuple[int, ...]) -> bool:
    """Whether a launcher of `chain` (from `launcher_chain`) has exited since, or had before it was taken.

    The second case: the `deepspeed` command killed while DeepSpeed's `launch.py` was still starting, before
    it started this rank. `launch.py` then belongs to init (pid 1) already, which no later look would see
    change. Unless init is the `deepspeed` command itself, as in a container started with it."""
    if not chain:
        return False
    if ancestors(len(chain)) != chain:
        return True
    return len(chain) == 2 and chain[1] == 1 and is_deepspeed_launch(chain[0]) and not _is_deepspeed_command(1)


AT_START = launcher_chain()
