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


def test_unsupervised_simcse_on_plain_sentences(toy_root, tmp_path):
    from mtkit import config as config_mod
    from mtkit.run import run
    lines = toy_root / "sentences.txt"
    lines.write_text("".join(f"sentence number {i} is about {w}\n" for i, w in enumerate(["films", "plots"] * 24)))
    cfg = config_mod.load(CONFIGS / "debug_tiny_nli.yaml", {
        "data.root": str(toy_root), "data.cache_dir": str(tmp_path / "c"),
        "tasks": [{"name": "unsup", "kind": "sentences", "train": "sentences.txt"}],
        "train.select_metric": "overall", "train.eval_every": 1000, "model.embed_chunk": 8})
    results = run(cfg, tmp_path / "unsup")
    assert results["steps"] == 2 and results["dev"] == {}  # 48 sentences / batch 32, no dev split
    from test_smoke import scalars
    losses = [v for _, v in scalars(tmp_path / "unsup", "train/loss/unsup")["train/loss/unsup"]]
    assert losses and all(0 < v < 10 for v in losses)
