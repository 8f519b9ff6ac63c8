"""SimCSE stage then multi-task stage: checkpoints per stage, exported encoders, resume, results."""
import json

import torch
from transformers import AutoModel

from mtkit.pipeline import run_pipeline

from conftest import CONFIGS


def overrides(root, cache):
    o = {"data.root": str(root), "data.cache_dir": str(cache)}
    for t in ("sst", "quora", "sts"):
        o[f"multitask.tasks.{t}.max_train"] = None
        o[f"multitask.tasks.{t}.max_eval"] = None
    return o


def test_two_stage_pipeline(toy_root, tmp_path):
    out = tmp_path / "pipe"
    summary = run_pipeline(CONFIGS / "debug_tiny_simcse.yaml", out, overrides(toy_root, tmp_path / "c"))
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert list(saved["stages"]) == ["simcse", "multitask"]
    simcse = saved["stages"]["simcse"]
    assert simcse["select_metric"] == "nli.triplet_acc" and "triplet_acc" in simcse["dev"]["nli"]
    assert set(saved["dev"]) == {"sst", "quora", "sts", "overall"}
    for stage in ("simcse", "multitask"):
        folder = out / stage / "encoder"
        assert saved["stages"][stage]["exported_encoder"] == str(folder)
        assert AutoModel.from_pretrained(folder).config.hidden_size == 32
    # Stage 2 started from stage 1's best encoder.
    stage2 = json.loads((out / "multitask" / "results.json").read_text())
    assert stage2["config"]["model"]["name_or_path"] == str(out / "simcse" / "encoder")
    assert stage2["config"]["model"]["random_init"] is False
    # Resume: finished stages are kept as they are.
    before = (out / "simcse" / "results.json").read_text()
    again = run_pipeline(CONFIGS / "debug_tiny_simcse.yaml", out, overrides(toy_root, tmp_path / "c"),
                         resume="auto")
    assert (out / "simcse" / "results.json").read_text() == before
    assert again["stages"]["simcse"] == saved["stages"]["simcse"]


def test_exported_encoder_reproduces_the_trained_embeddings(toy_root, tmp_path):
    out = tmp_path / "pipe"
    run_pipeline(CONFIGS / "debug_tiny_simcse.yaml", out, overrides(toy_root, tmp_path / "c"))
    best = torch.load(out / "simcse" / "best" / "model.pt")
    hf = AutoModel.from_pretrained(out / "simcse" / "encoder", add_pooling_layer=False).state_dict()
    trained = {k[len("encoder.bert."):]: v for k, v in best.items() if k.startswith("encoder.bert.")}
    assert trained.keys() == hf.keys()
    for k, v in hf.items():
        assert torch.equal(v, trained[k]), k
