"""Training modes and precisions on the tiny model: linear probing freezes the encoder, lp_ft unfreezes it
after lp_steps, leave-one-out keeps a task's loss off the encoder, bf16 autocast runs."""
import json

import pytest
import torch

from mtkit.run import run


def encoder_state(path):
    return {k: v for k, v in torch.load(path).items() if k.startswith("encoder.")}


@pytest.fixture
def initial_encoder(tiny_cfg, tmp_path):
    from mtkit.model import build_model
    cfg = tiny_cfg()
    torch.manual_seed(cfg.train.seed)
    return {k: v for k, v in build_model(cfg).state_dict().items() if k.startswith("encoder.")}


@pytest.fixture
def initial_heads(tiny_cfg):
    from mtkit.model import build_model
    cfg = tiny_cfg()
    torch.manual_seed(cfg.train.seed)
    return {k: v for k, v in build_model(cfg).state_dict().items() if k.startswith("heads.")}


def test_linear_probe_never_moves_the_encoder(tiny_cfg, tmp_path, initial_encoder, initial_heads):
    out = tmp_path / "lp"
    run(tiny_cfg(**{"train.mode": "linear_probe"}), out)
    after = encoder_state(out / "best" / "model.pt")
    assert all(torch.equal(after[k], initial_encoder[k]) for k in initial_encoder)
    heads = {k: v for k, v in torch.load(out / "best" / "model.pt").items() if k.startswith("heads.")}
    assert heads.keys() == initial_heads.keys()
    assert any(not torch.equal(heads[k], initial_heads[k]) for k in heads)  # while the heads trained


def test_lp_ft_probes_then_fine_tunes(tiny_cfg, tmp_path, initial_encoder):
    out = tmp_path / "lpft"
    run(tiny_cfg(**{"train.mode": "lp_ft", "train.lp_steps": 6, "train.epochs": 2}), out)
    final = torch.load(out / "checkpoints" / "step_18" / "engine.pt", weights_only=False)["model"]
    assert any(not torch.equal(final[k], initial_encoder[k]) for k in initial_encoder)
    from test_smoke import scalars
    # lr/<group> at step s is the rate of the next step; the encoder's schedule starts at step 6.
    lr = dict(scalars(out, "lr/encoder")["lr/encoder"])
    assert lr[2] == lr[4] == 0.0 and lr[6] > 0
    head_lr = dict(scalars(out, "lr/head.sst")["lr/head.sst"])
    assert head_lr[2] > 0


def test_leave_out_task_keeps_training_its_head(tiny_cfg, tmp_path):
    out = tmp_path / "loo"
    results = run(tiny_cfg(**{"tasks.sst.leave_out": True}), out)
    assert results["config"]["tasks"][0]["leave_out"] is True
    assert "sst" in results["dev"]


def test_bf16_autocast_trains(tiny_cfg, tmp_path):
    out = tmp_path / "bf16"
    results = run(tiny_cfg(**{"train.precision": "bf16"}), out)
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["train"]["precision"] == "bf16"
    assert 0 <= results["dev"]["overall"] <= 1
