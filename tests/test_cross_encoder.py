"""The `cross` and `cross_cosine` pair decoders: both texts tokenized as one sequence with token types,
encoded jointly, and evaluated pair by pair; and the held-out decision threshold (`calibrate`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtkit import config as config_mod
from mtkit.data.dataset import batch_for, hold_out, load_tasks
from mtkit.evaluate import evaluate, fit_threshold, predict_task
from mtkit.model import build_model
from mtkit.model.encoder import load_tokenizer


@pytest.fixture
def cross_setup(tiny_cfg):
    cfg = tiny_cfg(**{"tasks.quora.decoder": "cross", "tasks.sts.decoder": "cross"})
    tok = load_tokenizer(cfg.model)
    return cfg, tok, load_tasks(cfg, tok, splits=("train", "dev"))


def test_joint_tokens_are_the_tokenizer_pair_encoding(cross_setup):
    cfg, tok, tasks = cross_setup
    split = tasks["quora"].splits["train"]
    assert split.segments is not None and tasks["sst"].splits["train"].segments is None
    for ex, (ids,), types in list(zip(split.examples, split.tokens, split.segments))[:5]:
        ref = tok(ex.texts[0], ex.texts[1])
        assert ids == ref["input_ids"] and types == ref["token_type_ids"]
        first_sep = ids.index(tok.sep_token_id)
        assert set(types[:first_sep + 1]) == {0} and set(types[first_sep + 1:]) == {1}


def test_joint_cache_round_trip_keeps_segments_and_is_keyed_apart(cross_setup, tiny_cfg):
    cfg, tok, tasks = cross_setup
    again = load_tasks(cfg, tok, splits=("train",))["quora"].splits["train"]  # read from the cache
    assert again.tokens == tasks["quora"].splits["train"].tokens
    assert again.segments == tasks["quora"].splits["train"].segments
    bi = load_tasks(tiny_cfg(), tok, splits=("train",))["quora"].splits["train"]  # same file, same cache dir
    assert bi.segments is None and len(bi.tokens[0]) == 2


def test_batch_carries_token_types_that_reach_the_encoder(cross_setup):
    cfg, _, tasks = cross_setup
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = batch_for(tasks["quora"], "train", [0, 1, 2, 3], pad_id=0)
    assert batch["n_texts"] == 1 and batch["token_type_ids"].shape == batch["input_ids"].shape
    assert (batch["token_type_ids"][batch["attention_mask"] == 0] == 0).all()
    emb = model.embed(batch)                                                  # [1, B, H]
    assert emb.shape == (1, 4, model.encoder.hidden_size)
    assert model.heads["quora"](emb).shape == (4, 2) and model.heads["sts"](emb).shape == (4,)
    flat = dict(batch, token_type_ids=torch.zeros_like(batch["token_type_ids"]))
    assert not torch.allclose(model.embed(flat), emb)
    loss = model("quora", batch)
    loss.backward()
    assert model.encoder.bert.embeddings.token_type_embeddings.weight.grad[1].abs().sum() > 0


def test_chunked_joint_encoding_equals_plain(cross_setup):
    cfg, _, tasks = cross_setup
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = batch_for(tasks["sts"], "train", list(range(10)), pad_id=0)
    plain = model.embed(batch)
    model.embed_chunk = 3
    assert torch.allclose(model.embed(batch), plain, atol=1e-6)


@pytest.mark.parametrize("decoder", ["cross", "cross_cosine"])
def test_evaluation_scores_every_pair_with_its_token_types(tiny_cfg, decoder):
    cfg = tiny_cfg(**{"tasks.quora.decoder": decoder, "tasks.sts.decoder": decoder})
    tasks = load_tasks(cfg, load_tokenizer(cfg.model), splits=("train", "dev"))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.pad_id = 0
    for name in ("quora", "sts"):
        n = len(tasks[name].splits["dev"])
        res = predict_task(model, tasks[name], "dev", batch_size=7, device="cpu")
        with torch.no_grad():
            ref = model.heads[name](model.embed(batch_for(tasks[name], "dev", list(range(n)), pad_id=0)))
        expected = ref.argmax(-1) if name == "quora" else ref
        assert torch.allclose(torch.as_tensor(res["pred"]).to(expected.dtype), expected, atol=1e-5)
    dev = evaluate(model, tasks, "dev", batch_size=7, device="cpu")
    cosine_metrics = {"cosine_pearson", "cosine_spearman"}
    # `cross` has no sentence embeddings to compare; `cross_cosine` does
    assert set(dev["sts"]) == {"pearson", "spearman"} | (cosine_metrics if decoder == "cross_cosine" else set())
    assert 0.0 <= dev["overall"] <= 1.0


def test_cross_cosine_batches_hold_the_pair_then_both_texts(tiny_cfg):
    cfg = tiny_cfg(**{"tasks.quora.decoder": "cross_cosine"})
    tok = load_tokenizer(cfg.model)
    split = load_tasks(cfg, tok, splits=("train",))["quora"].splits["train"]
    ex = split.examples[0]
    assert split.tokens[0] == (tok(ex.texts[0], ex.texts[1])["input_ids"], tok(ex.texts[0])["input_ids"],
                               tok(ex.texts[1])["input_ids"])
    batch = batch_for(load_tasks(cfg, tok, splits=("train",))["quora"], "train", [0, 1, 2], pad_id=0)
    assert batch["n_texts"] == 3 and batch["input_ids"].shape[0] == 9
    assert batch["token_type_ids"][:3].any() and not batch["token_type_ids"][3:].any()


def test_cross_cosine_head_starts_as_the_cosine_map_without_dropout(tiny_cfg):
    cfg = tiny_cfg(**{"tasks.quora.decoder": "cross_cosine", "tasks.quora.dropout": 0.5,
                      "tasks.sts.decoder": "cross_cosine"})
    model = build_model(cfg).train()
    emb = torch.randn(3, 6, model.encoder.hidden_size)
    cos = F.cosine_similarity(emb[1], emb[2], dim=-1)
    for name in ("quora", "sts"):
        head = model.heads[name]
        with torch.no_grad():
            head.out.weight.zero_()
            head.out.bias.zero_()
        out = head(emb)
        assert torch.equal(out, head(emb))  # dropout never touches the cosine path
        expected = 20 * (cos - 0.5) if name == "quora" else 5 * cos  # margin / score of the cosine map
        got = out[:, 1] - out[:, 0] if name == "quora" else out
        assert torch.allclose(got, expected, atol=1e-5)


def test_fit_threshold_recovers_a_shifted_boundary():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 4000)
    margin = np.where(labels == 1, 1.0, -1.0) + rng.normal(0, 0.8, 4000) + 3.0  # boundary moved to 3
    t = fit_threshold(margin, labels)
    assert t == pytest.approx(3.0, abs=0.15)
    assert ((margin > t) == labels).mean() > ((margin > 0) == labels).mean() + 0.3
    assert fit_threshold(-margin, labels) == 0.0  # anti-correlated margin: no threshold, keep argmax


def test_hold_out_is_a_seeded_disjoint_partition(cross_setup):
    _, _, tasks = cross_setup
    train = tasks["quora"].splits["train"]
    rest, held = hold_out(train, 0.25, seed=3)
    assert len(held) == round(len(train) * 0.25) and len(rest) + len(held) == len(train)
    ids = [e.id for e in train.examples]
    assert sorted(e.id for e in rest.examples + held.examples) == sorted(ids)
    assert [e.id for e in held.examples] == [i for i in ids if i in {e.id for e in held.examples}]  # file order
    assert held.segments == [train.segments[ids.index(e.id)] for e in held.examples]
    assert [e.id for e in hold_out(train, 0.25, seed=3)[1].examples] == [e.id for e in held.examples]
    assert [e.id for e in hold_out(train, 0.25, seed=4)[1].examples] != [e.id for e in held.examples]
    with pytest.raises(ValueError, match="holds out 0 of"):
        hold_out(train, 0.001, seed=0)


def test_calibrated_evaluation_uses_the_held_out_threshold(tiny_cfg):
    cfg = tiny_cfg(**{"tasks.quora.calibrate": 0.25})
    tasks = load_tasks(cfg, load_tokenizer(cfg.model), splits=("train", "dev"))
    assert len(tasks["quora"].splits["train"]) + len(tasks["quora"].splits["calib"]) == 48
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.pad_id = 0
    dev = evaluate(model, tasks, "dev", batch_size=16, device="cpu")
    held = predict_task(model, tasks["quora"], "calib", 16, "cpu")
    t = fit_threshold(held["margin"], np.array([e.label for e in tasks["quora"].splits["calib"].examples]))
    res = predict_task(model, tasks["quora"], "dev", 16, "cpu")
    labels = np.array([e.label for e in tasks["quora"].splits["dev"].examples])
    assert dev["quora"]["threshold"] == pytest.approx(t)
    assert dev["quora"]["acc"] == pytest.approx(((res["margin"] > t) == labels).mean())


@pytest.mark.parametrize("override,problem", [
    ({"tasks.sst.calibrate": 0.1}, "binary decision threshold"),
    ({"tasks.quora.calibrate": 1.0}, "share of the training set"),
])
def test_calibrate_config_errors(tiny_cfg, override, problem):
    with pytest.raises(config_mod.ConfigError, match=problem):
        tiny_cfg(**override)


def test_cli_eval_reproduces_a_calibrated_cross_cosine_run(tiny_cfg, tmp_path):
    import json
    import subprocess
    import sys
    from conftest import REPO
    from mtkit.run import run
    cfg = tiny_cfg(**{"tasks.quora.decoder": "cross_cosine", "tasks.quora.calibrate": 0.25})
    results = run(cfg, tmp_path / "run")
    assert "threshold" in results["dev"]["quora"]
    proc = subprocess.run([sys.executable, "-m", "mtkit.cli", "eval", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert again["quora"] == pytest.approx(results["dev"]["quora"], abs=1e-6)  # same held-out rows, same fit
    assert again["overall"] == pytest.approx(results["dev"]["overall"], abs=1e-6)
