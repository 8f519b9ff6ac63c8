"""A crash at any point of a save leaves `latest` naming a complete checkpoint."""
import pytest
import torch

from mtkit import checkpoint
from mtkit.config import Config
from mtkit.distributed import Dist
from mtkit.engine import TorchEngine
from mtkit.model import MultiTaskModel

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
