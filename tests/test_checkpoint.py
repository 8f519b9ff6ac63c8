"""A crash at any point of a save leaves `latest` naming a complete checkpoint; a damaged one is named
and skipped; a write that fails on one of two ranks stops both, and nothing is published."""
import errno
import functools
import json
import time
from pathlib import Path

import pytest
import torch

from mtkit import checkpoint
from mtkit.config import Config
from mtkit.distributed import Dist
from mtkit.engine import TorchEngine
from mtkit.model import MultiTaskModel

from distributed_util import spawn_ranks
from test_model import tasks, tiny_encoder


def engine():
    cfg = Config(tasks=tasks())
    return TorchEngine(MultiTaskModel(tiny_encoder(), cfg.tasks), cfg, 10, Dist())


def test_crash_mid_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    e = engine()
    root = tmp_path / "ckpt"
    checkpoint.save(e, root, 1, {"step": 1}, Dist())
    assert checkpoint.latest(root) == root / "step_1"

    def crash(path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "engine.pt").write_bytes(b"half a file")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(e, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(e, root, 2, {"step": 2}, Dist())
    assert checkpoint.latest(root) == root / "step_1"
    assert (root / "step_2.tmp").exists() and not (root / "step_2").exists()
    monkeypatch.undo()

    fresh = engine()
    client = checkpoint.load(fresh, checkpoint.latest(root), Dist())
    assert client == {"step": 1}
    # The next save replaces the debris of the crashed one.
    checkpoint.save(fresh, root, 2, {"step": 2}, Dist())
    assert checkpoint.latest(root) == root / "step_2" and not (root / "step_2.tmp").exists()


class ShardEngine:
    """Writes one file per rank, as DeepSpeed's ZeRO engine writes its optimizer shards."""

    def __init__(self, rank: int):
        self.rank = rank

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"shard": torch.full((4,), float(self.rank))}, path / f"shard_rank{self.rank}.pt")


def _rank_with_a_full_disk(root: str, rank: int) -> dict:
    """Two checkpoints; rank 1 cannot write its part of the second (a full disk on its node)."""
    root, dist, e = Path(root), Dist(world_size=2, rank=rank), ShardEngine(rank)
    checkpoint.save(e, root, 1, {"step": 1}, dist)
    if rank == 1:
        real_save = torch.save

        def full_disk(obj, f, *args, **kwargs):
            if "client_rank1" in str(f):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *args, **kwargs)

        torch.save = full_disk
    start = time.monotonic()
    try:
        checkpoint.save(e, root, 2, {"step": 2}, dist)
        error = None
    except checkpoint.RunFolderError as err:
        error = str(err)
    return {"error": error, "waited_s": time.monotonic() - start}


@pytest.mark.slow
def test_a_write_failing_on_one_rank_stops_every_rank_at_once_and_publishes_nothing(tmp_path):
    root = tmp_path / "ckpt"
    ranks = spawn_ranks(functools.partial(_rank_with_a_full_disk, str(root)), tmp_path / "ranks", world=2)
    intact = f"the last complete checkpoint, {root / 'step_1'}, is intact"
    assert ranks[1]["error"] == f"cannot write checkpoint {root / 'step_2.tmp'}: No space left on device; {intact}"
    # Rank 0 wrote its part, and does not publish the checkpoint without rank 1's, nor wait for it.
    assert ranks[0]["error"] == (f"cannot write checkpoint {root / 'step_2.tmp'}: rank(s) 1 could not write "
                                 f"their part (their own error names the cause); {intact}")
    assert all(r["waited_s"] < 60 for r in ranks), ranks  # well inside the helper's 90 s collective timeout
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_1"]
    assert checkpoint.latest(root, contents=True) == root / "step_1"


def test_keeps_the_newest_two(tmp_path):
    e = engine()
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        checkpoint.save(e, root, step, {"step": step}, Dist())
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2", "step_3"]


def test_rng_states_round_trip(tmp_path):
    e = engine()
    torch.manual_seed(5)
    checkpoint.save(e, tmp_path, 1, {}, Dist())
    expected = torch.rand(3)
    torch.manual_seed(99)
    checkpoint.load(engine(), tmp_path / "step_1", Dist())
    assert torch.equal(torch.rand(3), expected)


def test_a_checkpoint_missing_a_file_is_skipped_with_a_warning(tmp_path, caplog):
    e = engine()
    root = tmp_path / "ckpt"
    for step in (1, 2):
        checkpoint.save(e, root, step, {"step": step}, Dist())
    assert checkpoint.problem(root / "step_2") is None
    (root / "step_2" / "client_rank0.pt").unlink()
    assert checkpoint.latest(root) == root / "step_1"
    assert f"{root / 'step_2' / 'client_rank0.pt'} is missing" in caplog.text
    assert checkpoint.load(engine(), checkpoint.latest(root), Dist()) == {"step": 1}


def test_latest_naming_a_missing_folder_falls_back_to_the_newest_complete(tmp_path, caplog):
    e = engine()
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        checkpoint.save(e, root, step, {"step": step}, Dist(), keep=3)
    (root / "latest").write_text("step_9")
    assert checkpoint.latest(root) == root / "step_3"
    assert "names" in caplog.text and "step_9, which does not exist" in caplog.text
    (root / "step_3" / "engine.pt").write_bytes(b"")
    assert checkpoint.latest(root) == root / "step_2"
    assert "engine.pt is truncated or damaged (0 bytes" in caplog.text


def test_damage_that_keeps_the_size_is_found_by_the_checksum_a_resume_reads(tmp_path, caplog):
    e = engine()
    root = tmp_path / "ckpt"
    for step in (1, 2):
        checkpoint.save(e, root, step, {"step": step}, Dist())
    weights = root / "step_2" / "engine.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, inside the tensor data: torch.load would not notice
    weights.write_bytes(bytes(data))
    assert checkpoint.problem(root / "step_2") is None  # the size check alone passes it
    assert checkpoint.latest(root, contents=True) == root / "step_1"
    assert f"{weights} is damaged (same size as written, different contents" in caplog.text


def test_a_truncated_checkpoint_loaded_by_path_names_the_file(tmp_path):
    e = engine()
    checkpoint.save(e, tmp_path, 1, {"step": 1}, Dist())
    client = tmp_path / "step_1" / "client_rank0.pt"
    client.write_bytes(client.read_bytes()[:100])
    with pytest.raises(checkpoint.RunFolderError, match=f"{client} is unreadable \\(truncated or corrupt\\)"):
        checkpoint.load(engine(), tmp_path / "step_1", Dist())


def test_a_failed_weights_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    checkpoint.save_file({"w": torch.ones(2)}, path)

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(checkpoint.RunFolderError, match=f"cannot write {path}: No space left on device"):
        checkpoint.save_file({"w": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["w"], torch.ones(2)) and sorted(tmp_path.iterdir()) == [path]


def test_truncate_jsonl_keeps_earlier_records_and_drops_a_partial_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "co')
    assert checkpoint.truncate_jsonl(path, lambda r: r["step"] <= 2) == 2
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
