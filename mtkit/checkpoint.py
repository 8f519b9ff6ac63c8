"""Checkpoint folders that survive a crash mid-save, and say when they are damaged.

A checkpoint is written into `ckpt/step_N.tmp`; its last file is `manifest.json`, listing every file with
its size and CRC-32. The folder is then renamed to `ckpt/step_N`, and only then does `ckpt/latest` (written
atomically) point at it. A crash at any moment leaves a complete checkpoint to resume from. A file
truncated or lost later (a full disk, a partial copy) shows as a size mismatch without reading the
weights; damage that keeps the size (a flipped bit, a block of zeros) shows in the checksum, which is
read only for the checkpoint a resume chooses. Older checkpoints beyond `keep` are removed after the new
one is in place.

Each checkpoint also carries the run's `config.json` (and `config_changes.json`, when a resume was allowed
to change settings), so a resume can check it continues under the settings it was trained with.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("mtkit")

MANIFEST = "manifest.json"
RUN_FILES = ("config.json", "config_changes.json")  # copied from the run folder into every checkpoint


class RunFolderError(Exception):
    """A run folder, checkpoint or weights file that cannot be used as asked; the message names the path
    and the cause."""


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
    """Collective: every rank calls it. `client` holds loop state (step, sampler, best).

    The ranks agree that each wrote its part before rank 0 publishes the checkpoint: when one rank's write
    fails, every rank raises at once, instead of the others waiting for it at a barrier (or, were it to
    carry on, rank 0 publishing a checkpoint without its part)."""
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp"
    try:
        if dist.is_main and tmp.exists():
            shutil.rmtree(tmp)
        dist.barrier()
        failure = None
        try:
            engine.save(tmp)
            # Each rank keeps its own RNG streams (dropout differs per rank).
            torch.save({"client": client, "rng": rng_state()}, tmp / f"client_rank{dist.rank}.pt")
        except (OSError, RuntimeError) as e:  # torch reports a failed write (a full disk) as RuntimeError
            failure = e
        failed = dist.barrier_ranks(failure is not None)
        if failure is not None:
            raise failure
        if failed:
            raise RuntimeError(f"rank(s) {', '.join(map(str, failed))} could not write their part (their own "
                               "error names the cause)")
        if dist.is_main:
            for name in RUN_FILES:
                if (root.parent / name).exists():
                    shutil.copyfile(root.parent / name, tmp / name)
            _write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            point_latest(root, final)
    except (OSError, RuntimeError) as e:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial copy took
        kept = latest(root)
        raise RunFolderError(f"cannot write checkpoint {tmp}: {_cause(e)}; "
                             + (f"the last complete checkpoint, {kept}, is intact" if kept else
                                "there is no earlier complete checkpoint")) from e
    if dist.is_main:
        # Only this run's timeline: a resume removed any checkpoint past the one it continued from.
        for old in [s for s in steps(root) if s < step][:-(keep - 1) or None]:
            shutil.rmtree(root / f"step_{old}", ignore_errors=True)
    dist.barrier()
    return final


def steps(root: Path) -> list[int]:
    """Step numbers of the `step_N` folders under `root`, ascending (complete or not)."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name)))


def problem(path: Path, contents: bool = False) -> str | None:
    """Why the folder `path` is not a complete checkpoint, or None when it is. Sizes only, unless `contents`:
    then every file is read and checked against its checksum too."""
    if not path.is_dir():
        return "no such folder"
    manifest = path / MANIFEST
    if not manifest.exists():
        if (path / "client_rank0.pt").exists():
            return None  # written before manifests existed; complete because it was renamed from .tmp
        return f"it has no {MANIFEST} (not a checkpoint, or an interrupted copy)"
    try:
        written = json.loads(manifest.read_text())
        files, crcs = written["files"], written.get("crc32", {})  # no checksums in older checkpoints
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{manifest} is unreadable ({e})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} is truncated or damaged ({f.stat().st_size} bytes, {size} written)"
    for name, crc in crcs.items() if contents else ():
        if _crc32(path / name) != crc:
            return f"{path / name} is damaged (same size as written, different contents: its CRC-32 differs)"
    return None


def ranks_of(path: Path) -> int:
    """How many ranks wrote the checkpoint `path`: each writes its own client file."""
    return len(list(path.glob("client_rank*.pt")))


def latest(root: Path, contents: bool = False) -> Path | None:
    """The newest complete checkpoint under `root`; damaged or partial ones are named in a warning and
    skipped, so the run continues from the one before. `contents`: check the chosen one's checksums too
    (reads it whole), as a resume does."""
    pointer = root / "latest"
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if not named.exists():
            log.warning("%s names %s, which does not exist; looking for the newest complete checkpoint",
                        pointer, named)
    for step in reversed(steps(root)):
        path = root / f"step_{step}"
        why = problem(path, contents)
        if why is None:
            return path
        log.warning("checkpoint %s is incomplete or damaged: %s; trying the one before", path, why)
    return None


def step_of(path: Path) -> int:
    m = re.fullmatch(r"step_(\d+)", path.name)
    if m:
        return int(m.group(1))
    return _load(path / "client_rank0.pt")["client"]["step"]


def load(engine, path: Path, dist) -> dict:
    try:
        engine.load(path)
    except Exception as e:  # torch, pickle and DeepSpeed raise many types; the cause is kept below
        raise RunFolderError(f"cannot load checkpoint {path}: {_cause(e)}") from e
    state = _load(path / f"client_rank{dist.rank}.pt")
    set_rng_state(state["rng"])
    return state["client"]


def model_weights(path: Path) -> dict:
    """A model state dict from a weights file (best/model.pt) or a checkpoint folder of either engine."""
    path = Path(path)
    if path.is_dir():
        if (path / "engine.pt").exists():
            return _load(path / "engine.pt")["model"]
        ds = path / "mp_rank_00_model_states.pt"
        if ds.exists():
            return _load(ds)["module"]
        raise RunFolderError(f"{path} holds no model weights (engine.pt or mp_rank_00_model_states.pt)")
    if not path.exists():
        raise RunFolderError(f"{path}: no such weights file")
    return _load(path)


def save_file(obj, path: Path) -> None:
    """torch.save through a temporary file, so `path` is always either the old or the new whole file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise RunFolderError(f"cannot write {path}: {_cause(e)}; the previous file, if any, is intact") from e


def _load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise RunFolderError(f"{path} is missing") from None
    except Exception as e:
        raise RunFolderError(f"{path} is unreadable (truncated or corrupt): {_cause(e)}") from e


def _cause(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f" ({e.filename})" if e.filename else "")
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _write_manifest(folder: Path) -> None:
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    files = {str(p.relative_to(folder)): p.stat().st_size for p in paths}
    crcs = {str(p.relative_to(folder)): _crc32(p) for p in paths}  # just written: read from the page cache
    _write_atomic(folder / MANIFEST, json.dumps({"files": files, "crc32": crcs}, indent=1))


def _crc32(path: Path, chunk: int = 1 << 24) -> int:
    # CRC-32 finds accidental damage (it is no defence against tampering) at about twice SHA-256's speed.
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunFolderError(f"cannot write {path}: {_cause(e)}; the previous file, if any, is intact") from e


def point_latest(root: Path, path: Path) -> None:
    """Name `path` in `root/latest`: the bare folder name, as DeepSpeed's own tools (zero_to_fp32.py) read it."""
    _write_atomic(root / "latest", path.name)


def write_json(path: Path, obj) -> None:
    _write_atomic(path, json.dumps(obj, indent=2, default=str))


def truncate_jsonl(path: Path, keep) -> int:
    """Rewrite a JSONL file atomically with only the records for which `keep(record)` is true; returns
    how many were dropped. Used on resume, so steps past the checkpoint are not logged twice."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _parses(line) and keep(json.loads(line))]
    if len(kept) != len(lines):
        _write_atomic(path, "".join(kept))
    return len(lines) - len(kept)


def _parses(line: str) -> bool:
    """False for a blank line or the partial last line of a process killed mid-write."""
    try:
        json.loads(line)
    except ValueError:
        return False
    return bool(line.strip())
