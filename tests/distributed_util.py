"""Multi-process helpers for tests: gloo workers spawned in-process, and real DeepSpeed launches."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import REPO

TIMEOUT_S = 300  # a hung collective fails the test instead of CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, out_dir: Path, world: int, timeout_s: float = 90) -> list[dict]:
    """Run `worker(rank, port, out_dir)` on `world` spawned processes; each saves `out_dir/rank{r}.pt`.

    A hang kills the workers and fails the test instead of blocking the suite."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned workers
        context = mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=world, join=False,
                                     start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("distributed workers hung")
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def env() -> dict:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def deepspeed(script: str, *args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env(), timeout=TIMEOUT_S)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def train(out: Path, *overrides: str, ranks: int = 2, resume: str | None = None):
    args = ["--config", "configs/debug_tiny.yaml", "--out", str(out), *overrides]
    if resume:
        args += ["--resume", resume]
    if ranks == 1:
        cmd = [sys.executable, "launchers/train.py", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env(), timeout=TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc
    return deepspeed("launchers/train.py", *args, ranks=ranks)
