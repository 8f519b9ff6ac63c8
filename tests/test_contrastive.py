"""Cross-rank InfoNCE, gradient caching (chunked re-encoding) and unsupervised views against their
single-process definitions."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BertConfig

from distributed_util import spawn_ranks
from mtkit.config import ModelConfig, TaskConfig
from mtkit.contrastive import distributed_info_nce, gather_with_grad, unsup_views
from mtkit.model import MultiTaskModel
from mtkit.model.encoder import Encoder
from mtkit.objectives import info_nce

WORLD = 2
B = 3            # rows per rank; the global batch is WORLD * B
TEMP = 0.05
ROLES = ("anchor", "positive", "negative")


# ---------------------------------------------------------------- 2 gloo ranks vs one process

def make_mlp() -> nn.Module:
    torch.manual_seed(0)  # every rank and the reference start from the same replica
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))


def global_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    anchor = torch.randn(WORLD * B, 4, generator=gen)
    # Positives near their anchors so the loss is neither saturated nor uniform.
    positive = anchor + 0.5 * torch.randn(WORLD * B, 4, generator=gen)
    return {"anchor": anchor, "positive": positive, "negative": torch.randn(WORLD * B, 4, generator=gen)}


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def mean_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """What DDP does to the gradients after backward."""
    out = []
    for t in tensors:
        t = t.clone()
        dist.all_reduce(t)
        out.append(t / WORLD)
    return out


def gather_as_constants(x: torch.Tensor, rank: int) -> torch.Tensor:
    """All ranks' rows with only the local slice differentiable and no cross-rank backward."""
    parts = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(parts, x.detach())
    parts[rank] = x
    return torch.cat(parts)


def rank_body(rank: int) -> dict:
    local = {role: t[rank * B:(rank + 1) * B] for role, t in global_batch().items()}
    out = {"gathered": gather_with_grad(local["positive"])}

    model = make_mlp()
    loss = distributed_info_nce(*(model(local[r]) for r in ROLES), TEMP)
    loss.backward()
    out["loss"], out["grads"] = loss.detach(), mean_over_ranks(grads(model))

    model = make_mlp()
    loss = distributed_info_nce(model(local["anchor"]), model(local["positive"]), None, TEMP)
    loss.backward()
    out["loss_no_neg"], out["grads_no_neg"] = loss.detach(), mean_over_ranks(grads(model))

    model = make_mlp()
    # Gradient caching as in MultiTaskModel: chunks of 2 and 1 rows encoded under activation
    # recomputation, then the cross-rank loss over all of them.
    loss = distributed_info_nce(*(torch.cat([checkpoint(model, c, use_reentrant=False)
                                             for c in local[r].split(2)]) for r in ROLES), TEMP)
    loss.backward()
    out["cached_loss"], out["cached_grads"] = loss.detach(), mean_over_ranks(grads(model))

    model = make_mlp()
    a, p, n = (model(local[r]) for r in ROLES)
    candidates = torch.cat([gather_as_constants(p, rank), gather_as_constants(n, rank)])
    sim = F.cosine_similarity(a[:, None], candidates[None], dim=-1) / TEMP
    F.cross_entropy(sim, rank * B + torch.arange(B)).backward()
    out["constant_grads"] = mean_over_ranks(grads(model))

    try:
        gather_with_grad(torch.zeros(B + rank, 5))
    except ValueError as err:
        out["uneven_error"] = str(err)
    try:
        gather_with_grad(torch.zeros(B, 5, 1) if rank else torch.zeros(B, 5))
    except ValueError as err:
        out["ndim_error"] = str(err)
    return out


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    return spawn_ranks(rank_body, tmp_path_factory.mktemp("ranks"), WORLD)


def reference(with_negatives: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One process, the whole global batch, objectives.info_nce."""
    model = make_mlp()
    batch = global_batch()
    negative = model(batch["negative"]) if with_negatives else None
    loss = info_nce(model(batch["anchor"]), model(batch["positive"]), negative, TEMP)
    loss.backward()
    return loss.detach(), grads(model)


def assert_all_close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_gather_puts_every_rank_rows_in_rank_order(rank_results):
    for results in rank_results:
        torch.testing.assert_close(results["gathered"], global_batch()["positive"], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("with_negatives", [True, False])
def test_distributed_loss_and_averaged_grads_equal_single_process(rank_results, with_negatives):
    suffix = "" if with_negatives else "_no_neg"
    expected_loss, expected_grads = reference(with_negatives)
    losses = torch.stack([r["loss" + suffix] for r in rank_results])
    torch.testing.assert_close(losses.mean(), expected_loss, rtol=0, atol=1e-6)
    assert not torch.allclose(losses[0], losses[1])  # each rank scores its own anchors
    for results in rank_results:
        assert_all_close(results["grads" + suffix], expected_grads)


@pytest.mark.slow
def test_each_rank_loss_is_its_shard_of_the_global_loss(rank_results):
    model = make_mlp()
    batch = global_batch()
    with torch.no_grad():
        a, p, n = (model(batch[r]) for r in ROLES)
        for rank, results in enumerate(rank_results):
            shard = distributed_info_nce(a[rank * B:(rank + 1) * B], p, n, TEMP, rank_offset=rank * B)
            torch.testing.assert_close(results["loss"], shard, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_distributed_grad_cache_equals_single_process(rank_results):
    expected_loss, expected_grads = reference()
    losses = torch.stack([r["cached_loss"] for r in rank_results])
    torch.testing.assert_close(losses.mean(), expected_loss, rtol=0, atol=1e-6)
    for results in rank_results:
        assert_all_close(results["cached_grads"], expected_grads)


@pytest.mark.slow
def test_candidates_as_plain_constants_miss_the_cross_rank_gradient(rank_results):
    _, expected_grads = reference()
    gap = max((g - e).abs().max().item() for g, e in zip(rank_results[0]["constant_grads"], expected_grads))
    assert gap > 1e-3


@pytest.mark.slow
def test_mismatched_shapes_raise_on_every_rank(rank_results):
    for results in rank_results:
        assert "same [B, H] tensor on every rank" in results["uneven_error"]
        assert "[(2, 3, 5), (2, 4, 5)]" in results["uneven_error"]
        assert "[(2, 3, 5), (3, 3, 5)]" in results["ndim_error"]


# ---------------------------------------------------------------- single process

def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4)
    assert not dist.is_initialized()
    assert gather_with_grad(x) is x


@pytest.mark.parametrize("with_negatives", [True, False])
def test_distributed_info_nce_equals_info_nce_in_one_process(with_negatives):
    gen = torch.Generator().manual_seed(1)
    a, p, n = (torch.randn(5, 8, generator=gen) for _ in range(3))
    n = n if with_negatives else None
    expected = info_nce(a, p, n, TEMP)
    torch.testing.assert_close(distributed_info_nce(a, p, n, TEMP), expected, rtol=0, atol=1e-6)


def test_rank_offset_outside_the_candidates_raises():
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match="outside the 6 gathered positives"):
        distributed_info_nce(a, torch.randn(6, 4), None, TEMP, rank_offset=4)


# ---------------------------------------------------------------- gradient cache on a tiny BERT

N_TRIPLES, LENGTH, CHUNK = 8, 7, 2


def tiny_encoder(tmp_path: Path, dropout: float) -> Encoder:
    BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               vocab_size=100, max_position_embeddings=16, hidden_dropout_prob=dropout,
               attention_probs_dropout_prob=dropout).save_pretrained(tmp_path)
    torch.manual_seed(0)
    return Encoder(ModelConfig(name_or_path=str(tmp_path), pooling="mean", random_init=True)).train()


def token_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, LENGTH), generator=gen)
    lengths = torch.randint(2, LENGTH + 1, (n,), generator=gen)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()     # right padding, varied lengths
    return ids * mask, mask


def triple_batch() -> dict:
    """Anchor, positive and negative token rows, text-major as the collate function lays them out."""
    parts = [token_batch(N_TRIPLES, seed) for seed in range(3)]
    return {"input_ids": torch.cat([p[0] for p in parts]), "attention_mask": torch.cat([p[1] for p in parts]),
            "n_texts": 3}


def nli_model(tmp_path: Path, dropout: float, chunk: int | None) -> MultiTaskModel:
    task = TaskConfig(name="nli", kind="contrastive", temperature=TEMP)
    return MultiTaskModel(tiny_encoder(tmp_path, dropout), [task], embed_chunk=chunk).train()


def step(model: MultiTaskModel, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model("nli", triple_batch())
    loss.backward()
    return loss.detach(), grads(model)


def plain_chunked_step(model: MultiTaskModel, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same chunks encoded with a full graph kept in memory: what the cache must reproduce."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    b = triple_batch()
    emb = torch.cat([model.encoder(i, m) for i, m in zip(b["input_ids"].split(CHUNK),
                                                        b["attention_mask"].split(CHUNK))])
    loss = model.loss("nli", emb.view(3, N_TRIPLES, -1), b)
    loss.backward()
    return loss.detach(), grads(model)


def max_gap(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    return max((a - e).abs().max().item() for a, e in zip(actual, expected, strict=True))


def test_chunked_encoding_equals_one_call_without_dropout(tmp_path):
    expected_loss, expected = step(nli_model(tmp_path, 0.0, None), seed=0)
    loss, cached = step(nli_model(tmp_path, 0.0, CHUNK), seed=0)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
    assert max_gap(cached, expected) < 1e-5


def test_chunked_encoding_replays_dropout(tmp_path):
    model = nli_model(tmp_path, 0.1, CHUNK)
    expected_loss, expected = plain_chunked_step(model, seed=3)
    after_plain = torch.rand(4)
    loss, cached = step(model, seed=3)
    after_cached = torch.rand(4)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-5)
    assert max_gap(cached, expected) < 1e-5
    # Recomputation restores its RNG: training continues on the same random stream as without the cache.
    assert torch.equal(after_cached, after_plain)
    # The masks matter: another draw of dropout gives a visibly different gradient.
    assert max_gap(plain_chunked_step(model, seed=4)[1], expected) > 1e-3


# ---------------------------------------------------------------- unsupervised SimCSE views

def test_unsup_views_layout_and_dropout_views(tmp_path):
    ids, mask = token_batch(4, seed=5)
    view_ids, view_mask = unsup_views(ids, mask)
    assert view_ids.shape == view_mask.shape == (8, LENGTH)
    for half in (slice(0, 4), slice(4, 8)):
        assert torch.equal(view_ids[half], ids) and torch.equal(view_mask[half], mask)

    model = tiny_encoder(tmp_path, dropout=0.1)
    torch.manual_seed(0)
    views = model(view_ids, view_mask).view(2, 4, -1)                    # [2, B, H]
    assert not torch.allclose(views[0], views[1])  # two dropout draws
    assert torch.isfinite(info_nce(views[0], views[1], None, TEMP))
    model.eval()
    views = model(view_ids, view_mask).view(2, 4, -1)
    torch.testing.assert_close(views[0], views[1])                       # no dropout: no signal
