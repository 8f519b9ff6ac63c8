"""Progress bars and log level of the command line: one `--quiet` switch, bars on rank 0 only.

The switch is the environment variable MTKIT_QUIET (set by `--quiet`), so every module, and any process a
run starts, reads the same setting without passing it around.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

from tqdm import tqdm

QUIET_ENV = "MTKIT_QUIET"


def quiet() -> bool:
    return os.environ.get(QUIET_ENV, "") not in ("", "0")


def set_quiet(on: bool) -> None:
    os.environ[QUIET_ENV] = "1" if on else "0"


def setup_logging(quiet_: bool = False) -> None:
    """INFO logs on stderr, or warnings and errors only when quiet (`--quiet`, or MTKIT_QUIET=1 already set).
    For a process's entry point: the setting stays for the rest of the process."""
    if quiet_:
        set_quiet(True)
    level = logging.WARNING if quiet() else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    if quiet():
        # DeepSpeed's logger has its own handler and resets its level to INFO when imported; a filter stays.
        logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.WARNING)


def _rank() -> int:
    import torch.distributed as tdist
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank()
    return int(os.environ.get("RANK", "0"))


def bar(iterable: Iterable | None = None, desc: str | None = None, total: int | None = None, **kwargs) -> tqdm:
    """A tqdm bar on rank 0 unless quiet; elsewhere a disabled one that still iterates and updates."""
    return tqdm(iterable, desc=desc, total=total, disable=quiet() or _rank() != 0, dynamic_ncols=True, **kwargs)
