"""Checkpoint folders that survive a crash mid-save.

A checkpoint is written into `ckpt/step_N.tmp`, renamed to `ckpt/step_N` when complete, and only then
does `ckpt/latest` (written atomically) point at it. A crash at any moment leaves `latest` naming a
complete checkpoint. Older checkpoints beyond `keep` are removed after the new one is in place.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, root: Path, step: int, client: dict, dist, keep: int = 2) -> Path:
    """Collective: every rank calls it. `client` holds loop state (step, sampler, config)."""
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    if dist.is_main and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    engine.save(tmp)
    # Each rank keeps its own RNG streams (dropout differs per rank).
    torch.save({"client": client, "rng": rng_state()}, tmp / f"client_rank{dist.rank}.pt")
    dist.barrier()
    if dist.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / "latest", final.name)
        steps = sorted(int(p.name[5:]) for p in root.glob("step_*") if p.name[5:].isdigit())
        for old in steps[:-keep]:
            shutil.rmtree(root / f"step_{old}", ignore_errors=True)
    dist.barrier()
    return final


def latest(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if path.exists() else None


def load(engine, path: Path, dist) -> dict:
    engine.load(path)
    state = torch.load(path / f"client_rank{dist.rank}.pt", weights_only=False)
    set_rng_state(state["rng"])
    return state["client"]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    _write_atomic(path, json.dumps(obj, indent=2, default=str))
