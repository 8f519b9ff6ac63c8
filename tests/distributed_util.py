"""Launch real multi-process DeepSpeed runs on CPU ranks from tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import REPO

TIMEOUT_S = 300  # a hung collective fails the test instead of CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
