"""Multi-process helpers for tests: gloo workers spawned in-process, and real DeepSpeed launches."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import REPO
from mtkit.distributed import SHM_DIR, SHM_PREFIX

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


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    """`subprocess.run` in its own process group: a launch that hangs is killed with all its ranks (and
    compilers), instead of leaving orphans that slow every later test."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                          env=env(), start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{' '.join(cmd)} hung for {TIMEOUT_S} s:\n{out[-4000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def shm_workspaces(port: int) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{SHM_PREFIX}_*_{port}_*"))


def deepspeed(script: str, *args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).with_name("deepspeed")
    port = free_port()
    cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(port), script, *args]
    proc = run(cmd)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    # mtkit's DeepSpeed engine releases the CPU all-reduce memory; a leak would fill the machine's RAM.
    assert not shm_workspaces(port), f"DeepSpeed shared-memory workspaces left behind: {shm_workspaces(port)}"
    return proc


def train(out: Path, *overrides: str, ranks: int = 2, resume: str | None = None):
    args = ["--config", "configs/debug_tiny.yaml", "--out", str(out), *overrides]
    if resume:
        args += ["--resume", resume]
    if ranks == 1:
        proc = run([sys.executable, "launchers/train.py", *args])
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc
    return deepspeed("launchers/train.py", *args, ranks=ranks)
