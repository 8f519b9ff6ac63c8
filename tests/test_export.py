"""Exported encoders as sentence-transformers folders, checked against mtkit's own embeddings.

The reference is the run's encoder in eval mode on the input mtkit's data layer builds (tokenized with
truncation at model.max_length, padded by `collate`); `SentenceTransformer(folder).encode` has to give the
same vectors, for every pooling. One case is a real training run with `train.export_encoder`. Pushing to the
Hub is checked offline: `HfApi.create_repo` and `HfApi.upload_folder` are replaced by recorders (the network
is never reached), and the test checks which repository and which files the upload would get.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

from conftest import REPO, tiny_config, write_toy_data
from mtkit import config as config_mod
from mtkit.checkpoint import model_weights
from mtkit.cli import CLI
from mtkit.data.dataset import collate
from mtkit.export import ExportError, export_encoder, push_to_hub
from mtkit.model import build_model
from mtkit.model.encoder import load_tokenizer
from mtkit.run import run

MAX_LENGTH = 12
SENTENCES = ["a good film", "the plot was very dull and the actor was not funny at all, a long and awful story "
             "that is not short", "great", "the movie is fine"]  # the second is cut at MAX_LENGTH tokens


def reference(model, tokenizer, cfg, group=None) -> torch.Tensor:
    ids = tokenizer(SENTENCES, truncation=True, max_length=cfg.model.max_length)["input_ids"]
    assert max(len(i) for i in ids) == cfg.model.max_length  # truncation matters for this input
    batch = collate([(i,) for i in ids], [], tokenizer.pad_token_id, torch.long)
    with torch.no_grad():
        return model.encoder.eval()(batch["input_ids"], batch["attention_mask"], group=group)


def st_embeddings(folder) -> torch.Tensor:
    return SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_tensor=True, batch_size=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (cls pooling, diagnostics on) that exported its encoder while training."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_config(write_toy_data(tmp / "data"), tmp / "cache", **{
        "train.export_encoder": True, "model.pooling": "cls", "model.max_length": MAX_LENGTH})
    run(cfg, tmp / "run")
    return tmp / "run", cfg


def test_training_run_exports_a_sentence_transformer_with_its_pooling_and_length(trained):
    out, cfg = trained
    folder = out / "encoder"
    model = build_model(cfg)
    model.load_state_dict(model_weights(out / "best" / "model.pt"))
    want = reference(model, load_tokenizer(cfg.model), cfg)

    st = SentenceTransformer(str(folder), device="cpu")
    assert st.max_seq_length == MAX_LENGTH
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling"] and st[1].pooling_mode == "cls"
    assert torch.allclose(st_embeddings(folder), want, atol=1e-5)
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json", "mtkit_encoder.json", "README.md"):
        assert (folder / name).is_file(), name

    # The transformer at the top level is a plain HF model too, with the trained weights.
    hf = AutoModel.from_pretrained(folder).eval()
    trained_weights = {k[len("encoder.bert."):]: v for k, v in model.state_dict().items()
                       if k.startswith("encoder.bert.")}
    for k, v in trained_weights.items():
        assert torch.equal(hf.state_dict()[k], v), k


def test_model_card_reports_metrics_conflicts_and_a_config_that_reproduces_the_run(trained, tmp_path):
    out, cfg = trained
    card = (out / "encoder" / "README.md").read_text()
    results = json.loads((out / "results.json").read_text())
    for task in ("sst", "quora", "sts"):
        for metric, value in results["dev"][task].items():
            assert f"| {task} | {metric} | {value:.4f} |" in card
        assert f"`{cfg.task(task).train}`" in card and f"`{cfg.task(task).dev}`" in card
    assert f"| all tasks of the run | CS224N overall | {results['dev']['overall']:.4f} |" in card
    from diagnostics.report import format_table, summarize_run
    assert format_table(summarize_run(out)) in card
    assert f"step {results['best_step']} of {results['steps']}" in card
    assert "max_seq_length | 12 tokens" in card and "all-MiniLM-L6-v2, was itself trained" not in card
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "sentence-transformers" and "base_model" not in front  # random weights
    # The config block loads as an mtkit config equal to the run's.
    block = card.split("```yaml\n")[1].split("\n```")[0]
    (tmp_path / "config.yaml").write_text(block)
    assert config_mod.load(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("pooling, normalize", [("mean", False), ("pooler", False), ("mean", True)])
def test_each_pooling_encodes_like_the_mtkit_encoder(tmp_path, pooling, normalize):
    cfg = tiny_config(tmp_path / "data", tmp_path / "cache", **{"model.pooling": pooling,
                                                                  "model.max_length": MAX_LENGTH})
    torch.manual_seed(0)
    model = build_model(cfg)
    if pooling == "pooler":  # a random init pooler is nearly zero; make it matter
        torch.nn.init.normal_(model.encoder.bert.pooler.dense.weight, std=0.3)
        torch.nn.init.normal_(model.encoder.bert.pooler.dense.bias, std=0.3)
    tokenizer = load_tokenizer(cfg.model)
    folder = export_encoder(model, tokenizer, cfg, tmp_path / "encoder", normalize=normalize)
    want = reference(model, tokenizer, cfg)
    if normalize:
        want = F.normalize(want, dim=-1)
    assert torch.allclose(st_embeddings(folder), want, atol=1e-5)
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling"] + ["Dense"] * (pooling == "pooler") + ["Normalize"] * normalize
    hf = AutoModel.from_pretrained(folder).eval()
    if pooling == "pooler":  # the HF model's own pooler keeps the trained weights
        ids = tokenizer(SENTENCES[:1], return_tensors="pt")
        with torch.no_grad():
            assert torch.allclose(hf(**ids).pooler_output, model.encoder(ids["input_ids"], ids["attention_mask"]),
                                  atol=1e-5)
    assert "run has no `results.json`" in (folder / "README.md").read_text()  # no run folder given


def test_task_groups_export_one_sentence_transformer_each(tmp_path):
    cfg = tiny_config(tmp_path / "data", tmp_path / "cache", **{
        "model.pooling": "pooler", "model.max_length": MAX_LENGTH, "model.task_layers": 1,
        "model.task_groups": {"pairs": ["quora", "sts"]}})
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # make the two tops differ
        for p in model.encoder.tops["sst"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokenizer = load_tokenizer(cfg.model)
    path = export_encoder(model, tokenizer, cfg, tmp_path / "encoder")
    assert json.loads((path / "groups.json").read_text()) == {"sst": ["sst"], "pairs": ["quora", "sts"]}
    got = {}
    for group in ("pairs", "sst"):
        got[group] = st_embeddings(path / group)
        assert torch.allclose(got[group], reference(model, tokenizer, cfg, group), atol=1e-5), group
        assert "(pairs group)" in (path / "pairs" / "README.md").read_text()
    assert not torch.allclose(got["pairs"], got["sst"], atol=1e-3)


class Recorder:
    """Stands in for the two HfApi calls that reach the network; keeps their arguments."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi
        self.calls = []
        monkeypatch.setattr(HfApi, "create_repo", lambda api, *a, **kw: self.calls.append(("create_repo", a, kw)))
        monkeypatch.setattr(HfApi, "upload_folder", lambda api, *a, **kw:
                            self.calls.append(("upload_folder", a, kw)) or "https://hub.example/commit/1")


def files(folder) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_cli_export_pushes_exactly_the_exported_folder(trained, tmp_path, monkeypatch, capsys):
    out, _ = trained
    target = tmp_path / "export"
    target.mkdir()
    (target / "mtkit_encoder.json").write_text("{}")  # an earlier export ...
    (target / "stale.bin").write_text("old")          # ... with a file the new one does not write
    hub = Recorder(monkeypatch)
    CLI().export(str(out), out=str(target), push_to_hub="someone/tiny", private=True)
    assert capsys.readouterr().out.split() == [str(target), "https://hub.example/commit/1"]

    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1:] == (("someone/tiny",), {"repo_type": "model", "private": True, "exist_ok": True})
    upload = hub.calls[1][2]
    assert upload["repo_id"] == "someone/tiny" and upload["repo_type"] == "model"
    assert upload["folder_path"] == str(target)
    assert not {"allow_patterns", "ignore_patterns", "path_in_repo", "delete_patterns"} & upload.keys()
    # upload_folder sends every file of the folder: these, and nothing left over from before.
    weights = {"model.safetensors"}
    assert files(target) == weights | {
        "config.json", "tokenizer.json", "tokenizer_config.json", "modules.json", "sentence_bert_config.json",
        "config_sentence_transformers.json", "1_Pooling/config.json", "mtkit_encoder.json", "README.md"}
    assert torch.allclose(st_embeddings(target), st_embeddings(out / "encoder"), atol=0)


def test_push_of_grouped_export_needs_a_group_and_refusals_name_the_folder(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "data", tmp_path / "cache", **{"model.task_layers": 1})
    model = build_model(cfg)
    path = export_encoder(model, load_tokenizer(cfg.model), cfg, tmp_path / "encoder")
    hub = Recorder(monkeypatch)
    with pytest.raises(ExportError, match="one encoder per task group .*pass --group"):
        push_to_hub(path, "someone/tiny")
    push_to_hub(path, "someone/tiny-sts", group="sts")
    assert hub.calls[1][2]["folder_path"] == str(path / "sts")
    assert hub.calls[0][2]["private"] is False

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match=f"{other} is not empty and holds no earlier mtkit export"):
        export_encoder(model, load_tokenizer(cfg.model), cfg, other)
    assert (other / "todo.txt").read_text() == "keep me"


def test_importing_mtkit_does_not_import_sentence_transformers():
    code = ("import sys, mtkit, mtkit.run, mtkit.cli, mtkit.export; "
            "sys.exit('sentence_transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_card_of_the_bundled_model_names_it_and_carries_its_caveat(tmp_path):
    from mtkit.export import model_card
    cfg = config_mod.load(None, {"tasks": [{"name": "sts", "kind": "pair_regression", "train": "sts/sts-train.csv",
                                            "dev": "sts/sts-dev.csv", "label_range": [0, 5]}]})
    card = model_card(cfg, ["sts"], {"run_dir": tmp_path})
    assert yaml.safe_load(card.split("---")[1])["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "trained by sentence-transformers on about 1B sentence pairs, among them Quora duplicate" in card
    random = model_card(config_mod.load(None, {**config_mod.to_dict(cfg), "model.random_init": True}), ["sts"], {})
    assert "base_model" not in random and "Quora duplicate" not in random
