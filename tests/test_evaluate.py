import numpy as np
import pytest
import torch
from scipy import stats

from mtkit.evaluate import metrics_for, primary, write_predictions


def test_regression_metrics_match_scipy():
    rng = np.random.default_rng(0)
    labels = rng.uniform(0, 5, 50)
    pred = labels + rng.normal(0, 1, 50)
    cos = rng.uniform(-1, 1, 50)
    m = metrics_for("pair_regression", {"pred": pred, "cosine": cos}, labels)
    assert m["pearson"] == pytest.approx(stats.pearsonr(pred, labels)[0])
    assert m["spearman"] == pytest.approx(stats.spearmanr(pred, labels)[0])
    assert m["cosine_pearson"] == pytest.approx(stats.pearsonr(cos, labels)[0])
    assert m["cosine_spearman"] == pytest.approx(stats.spearmanr(cos, labels)[0])
    assert primary("pair_regression", m) == pytest.approx((m["pearson"] + 1) / 2)


def test_classification_accuracy_and_f1():
    labels = np.array([1, 0, 1, 1, 0, 0])
    pred = np.array([1, 0, 0, 1, 1, 0])
    m = metrics_for("pair_classification", {"pred": pred}, labels)
    assert m["acc"] == pytest.approx(4 / 6)
    # tp = 2, fp = 1, fn = 1
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    five = metrics_for("classification", {"pred": np.array([0, 4, 3])}, np.array([0, 4, 2]))
    assert five == {"acc": pytest.approx(2 / 3)}


def test_constant_predictions_do_not_crash():
    labels = np.array([0.0, 1.0, 2.0])
    m = metrics_for("pair_regression", {"pred": np.ones(3), "cosine": np.ones(3)}, labels)
    assert m["pearson"] == 0.0


def test_prediction_file_format(tmp_path):
    path = tmp_path / "p" / "sts-dev-output.csv"
    write_predictions(path, "pair_regression", {"ids": ["a", "b"], "pred": np.array([1.5, 2.0])})
    assert path.read_text() == "id \t Predicted_Similiarity \na , 1.5 \nb , 2.0 \n"
    path = tmp_path / "sst-dev-output.csv"
    write_predictions(path, "classification", {"ids": ["x"], "pred": np.array([3])})
    assert path.read_text() == "id \t Predicted_Sentiment \nx , 3 \n"


# ---------------------------------------------------------------- embedding a split

def _build(cfg):
    from mtkit.distributed import Dist
    from mtkit.run import build
    _, tasks, model = build(cfg, Dist())
    return tasks, model.eval()


class _Batches:
    """A forward pre-hook on the encoder that records the [rows, width] of every batch it encodes."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.encoder.register_forward_pre_hook(
            lambda module, args: self.shapes.append(tuple(args[0].shape)))

    def rows(self) -> int:
        return sum(r for r, _ in self.shapes)


def _one_at_a_time(model, task, split) -> torch.Tensor:
    """The reference: every text encoded alone, without padding, [n_texts, N, H]."""
    s = task.splits[split]
    out = []
    for i, texts in enumerate(s.tokens):
        row = []
        for k, ids in enumerate(texts):
            types = torch.tensor([s.segments[i]]) if s.segments is not None and k == 0 else None
            row.append(model.encoder(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), types,
                                     group=model.top_of.get(task.cfg.name))[0])
        out.append(torch.stack(row))
    return torch.stack(out).transpose(0, 1)


@pytest.mark.parametrize("decoder", ["sbert", "cross_cosine"])
def test_batched_embeddings_equal_texts_encoded_one_at_a_time(tiny_cfg, decoder):
    from mtkit.evaluate import embed_split
    tasks, model = _build(tiny_cfg(**{"tasks.quora.decoder": decoder}))
    with torch.no_grad():
        for name, task in tasks.items():
            ref = _one_at_a_time(model, task, "dev")
            for batch_size, per_row in ((128, 32), (3, 5)):  # one batch of all; batches of at most 15 tokens
                seen = _Batches(model)
                emb = embed_split(model, task, "dev", batch_size, "cpu", tokens_per_row=per_row)
                seen.handle.remove()
                assert emb.shape == ref.shape
                assert torch.allclose(emb, ref, atol=1e-5), (name, batch_size)
                unique = {(tuple(ids), tuple(task.splits["dev"].segments[i]) if k == 0 and decoder != "sbert"
                           and name == "quora" else None)
                          for i, texts in enumerate(task.splits["dev"].tokens) for k, ids in enumerate(texts)}
                assert seen.rows() == len(unique)  # each unique sequence once
                budget = batch_size * per_row
                assert all(r * w <= budget or r == 1 for r, w in seen.shapes)
                if per_row == 5:  # short sequences share a batch, long ones do not
                    assert max(r for r, _ in seen.shapes) > 1 and min(r for r, _ in seen.shapes) == 1


def _share_sentences(root):
    """Rewrite the STS dev file with the Quora dev sentence pairs, so both tasks embed the same texts."""
    rows = (root / "quora" / "quora-dev.csv").read_text().splitlines()[1:]
    with open(root / "sts" / "sts-dev.csv", "w") as f:
        f.write("\tid\tsentence1\tsentence2\tsimilarity\n")
        for i, line in enumerate(rows):
            _, _, a, b, _ = line.split("\t")
            f.write(f"{i}\ts{i}\t{a}\t{b}\t{(i % 6) * 0.8:.1f}\n")


@pytest.mark.parametrize("task_layers", [0, 1])
def test_one_evaluation_encodes_a_shared_sentence_once_per_encoder_top(toy_root, tiny_cfg, task_layers):
    from mtkit.evaluate import evaluate, predict_task
    _share_sentences(toy_root)
    tasks, model = _build(tiny_cfg(**{"model.task_layers": task_layers}))
    if task_layers:  # tops start equal; make the STS top differ so a wrong cache key shows
        with torch.no_grad():
            for p in model.encoder.tops["sts"].parameters():
                p.add_(0.05 * torch.randn_like(p))
    separate = {n: predict_task(model, t, "dev", 16, "cpu") for n, t in tasks.items()}  # no shared cache
    seen = _Batches(model)
    cache: dict = {}
    shared = {n: predict_task(model, t, "dev", 16, "cpu", cache=cache) for n, t in tasks.items()}
    seen.handle.remove()
    quora = {tuple(ids) for texts in tasks["quora"].splits["dev"].tokens for ids in texts}
    sts = {tuple(ids) for texts in tasks["sts"].splits["dev"].tokens for ids in texts}
    sst = {tuple(ids) for texts in tasks["sst"].splits["dev"].tokens for ids in texts}
    assert quora == sts
    assert seen.rows() == len(sst) + len(quora) + (len(sts) if task_layers else 0)
    for name in tasks:
        for key in ("pred", "cosine", "margin"):
            if key in separate[name]:
                np.testing.assert_allclose(shared[name][key], separate[name][key], atol=1e-5)
    if task_layers:  # the tops differ, so the STS cosines are not Quora's
        assert not np.allclose(shared["sts"]["cosine"], _cosines(model, tasks["quora"]), atol=1e-4)
    else:
        np.testing.assert_allclose(shared["sts"]["cosine"], _cosines(model, tasks["quora"]), atol=1e-5)
    metrics = evaluate(model, tasks, "dev", 16, "cpu")  # the same through evaluate's own cache
    assert metrics["sts"]["cosine_pearson"] == pytest.approx(
        metrics_for("pair_regression", separate["sts"],
                    np.asarray([e.label for e in tasks["sts"].splits["dev"].examples]))["cosine_pearson"], abs=1e-6)


def _cosines(model, task) -> np.ndarray:
    from mtkit.evaluate import embed_split
    emb = embed_split(model, task, "dev", 16, "cpu")
    return torch.nn.functional.cosine_similarity(emb[0], emb[1], dim=-1).numpy()


def test_progress_bar_on_rank_0_unless_quiet(tiny_cfg, capsys, monkeypatch):
    from mtkit.evaluate import embed_split
    tasks, model = _build(tiny_cfg())
    monkeypatch.delenv("MTKIT_QUIET", raising=False)
    embed_split(model, tasks["sts"], "dev", 16, "cpu")
    assert "eval sts/dev" in capsys.readouterr().err
    monkeypatch.setenv("MTKIT_QUIET", "1")
    embed_split(model, tasks["sts"], "dev", 16, "cpu")
    assert capsys.readouterr().err == ""


def _two_rank_body(root, cache, rank):
    from conftest import tiny_config
    from mtkit.distributed import Dist
    from mtkit.evaluate import evaluate
    from mtkit.run import build
    cfg = tiny_config(root, cache, **TWO_RANK_CFG)
    dist = Dist(world_size=2, rank=rank)
    _, tasks, model = build(cfg, dist)
    return evaluate(model, tasks, "dev", 5, "cpu", gather=dist)


TWO_RANK_CFG = {"tasks.quora.decoder": "cross_cosine", "tasks.quora.calibrate": 0.25}


@pytest.mark.slow
def test_two_rank_evaluation_with_shared_cache_equals_one_process(toy_root, tmp_path):
    # Shared sentences (STS = Quora's), a calibrated cross_cosine head (dev and held-out rows share the
    # cache), token-budget batches that differ per shard: 2 ranks must report 1 process's metrics.
    import functools

    from conftest import tiny_config
    from distributed_util import spawn_ranks
    from mtkit.evaluate import evaluate
    _share_sentences(toy_root)
    tasks, model = _build(tiny_config(toy_root, tmp_path / "cache", **TWO_RANK_CFG))  # also fills the cache
    single = evaluate(model, tasks, "dev", 5, "cpu")
    ranks = spawn_ranks(functools.partial(_two_rank_body, toy_root, tmp_path / "cache"), tmp_path / "ranks", 2)
    assert "threshold" in single["quora"]
    for metrics in ranks:
        assert metrics.keys() == single.keys()
        for task, m in single.items():
            if task == "overall":
                assert metrics[task] == pytest.approx(m, abs=1e-6)
            else:
                assert metrics[task] == pytest.approx(m, abs=1e-6), task
