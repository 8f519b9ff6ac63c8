"""The `cross` pair decoder: both texts tokenized as one sequence with token types, encoded jointly,
and evaluated pair by pair."""
from __future__ import annotations

import pytest
import torch

from mtkit.data.dataset import batch_for, load_tasks
from mtkit.evaluate import evaluate, predict_task
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


def test_evaluation_scores_every_pair_with_its_token_types(cross_setup):
    cfg, _, tasks = cross_setup
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
    assert set(dev["sts"]) == {"pearson", "spearman"}  # no sentence embeddings, so no cosine metrics
    assert 0.0 <= dev["overall"] <= 1.0
