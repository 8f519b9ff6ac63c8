"""Evaluation-only tasks: what validation refuses, the scoring pieces against independent references
(brute force, scikit-learn, scipy), and tiny runs whose eval-only metrics are recomputed from the saved
best weights with the tokenizer and the encoder alone."""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from conftest import CONFIGS, WORDS, write_toy_data
from mtkit import config as config_mod
from mtkit.evaluate import LogisticProbe, best_threshold, cosine_correlations

SICK_TASK = yaml.safe_load((CONFIGS / "ood" / "sick.yaml").read_text())["tasks"][0]  # the shipped snippet
PROBE_TASK = {"name": "sst_probe", "kind": "classification", "eval_only": True, "train": "sst/ids-sst-train.csv",
              "test": "sst/ids-sst-dev.csv", "num_labels": 5, "probe_split": "train"}
MRPC_TASK = {**yaml.safe_load((CONFIGS / "ood" / "mrpc.yaml").read_text())["tasks"][0]}


def load(tmp_path: Path, *extra: dict, **overrides) -> config_mod.Config:
    """debug_tiny.yaml with `extra` tasks appended; overrides as keyword arguments, `__` for dots."""
    raw = yaml.safe_load((CONFIGS / "debug_tiny.yaml").read_text())
    raw["tasks"] += [dict(t) for t in extra]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config_mod.load(path, {k.replace("__", "."): v for k, v in overrides.items()})


def error(tmp_path: Path, *extra: dict, **overrides) -> str:
    with pytest.raises(config_mod.ConfigError) as info:
        load(tmp_path, *extra, **overrides)
    return str(info.value)


# --- validation --------------------------------------------------------------------------------


def test_eval_only_tasks_need_no_train_split_and_are_not_trained(tmp_path):
    cfg = load(tmp_path, SICK_TASK, PROBE_TASK, train__strategy="sum", data__steps_per_epoch=3)
    assert [t.name for t in cfg.trained_tasks()] == ["sst", "quora", "sts"]
    assert cfg.micro_batches_per_step() == 3  # a joint step takes one batch of each trained task
    without_flag = {k: v for k, v in SICK_TASK.items() if k != "eval_only"}
    assert "tasks.sick.train = None; every task needs a train split" in error(tmp_path, without_flag)


@pytest.mark.parametrize("task, overrides, problem", [
    ({**MRPC_TASK, "threshold_split": "test"}, {},
     "tasks.mrpc.threshold_split = 'test'; use train or dev: the cosine threshold is chosen on it, and fitting on "
     "test data would tune on what is reported"),
    ({**MRPC_TASK, "threshold_split": None}, {},
     "tasks.mrpc.threshold_split = None; name the split the cosine threshold is chosen on: train or dev"),
    ({**MRPC_TASK, "threshold_split": "dev", "train": None, "test": None, "dev": "d.txt"}, {},
     "threshold_split = 'dev'; the cosine threshold is chosen on it but the task is scored on its dev split"),
    ({**MRPC_TASK, "threshold_split": "dev"}, {}, "tasks.mrpc.threshold_split = 'dev'; the task declares no dev split"),
    ({**MRPC_TASK, "num_labels": 3}, {}, "is scored by a cosine threshold: it needs 2 labels"),
    ({**MRPC_TASK, "decoder": "cross"}, {}, "tasks.mrpc.decoder = 'cross'; an eval-only task is scored from "
                                            "sentence embeddings"),
    ({**PROBE_TASK, "probe_split": "dev"}, {}, "tasks.sst_probe.probe_split = 'dev'; the task declares no dev split"),
    ({**PROBE_TASK, "eval_only": False}, {}, "tasks.sst_probe.probe_split = 'train'; only for tasks with "
                                             "eval_only: true"),
    ({**PROBE_TASK, "probe_split": None, "threshold_split": "train"}, {},
     "tasks.sst_probe.threshold_split = 'train'; an eval-only classification task fits its probe_split, not a "
     "threshold_split"),
    ({**SICK_TASK, "probe_split": "train"}, {}, "an eval-only pair_regression task fits nothing"),
    ({**SICK_TASK, "train": "ood/sick/SICK_train.txt"}, {},
     "tasks.sick.train = 'ood/sick/SICK_train.txt'; an eval-only task is never trained"),
    ({**MRPC_TASK, "calibrate": 0.1}, {}, "an eval-only task has no head to calibrate"),
    ({**SICK_TASK, "test": None}, {}, "an eval-only task needs a test (or dev) split to be scored on"),
    ({**SICK_TASK, "kind": "sentences"}, {}, "unlabelled sentences have nothing to score"),
    (SICK_TASK, {"train__select_metric": "sick.cosine_spearman"},
     "eval-only tasks (sick) never pick the checkpoint"),
    (SICK_TASK, {"model__task_layers": 1}, "tasks.sick.eval_with = None; with model.task_layers the encoder's top "
                                           "layers belong to trained tasks; name the one whose top embeds this "
                                           "eval-only task, one of ['sst', 'quora', 'sts']"),
    ({**SICK_TASK, "eval_with": "sick"}, {"model__task_layers": 1}, "name a trained task, one of ['sst', 'quora'"),
    ({**SICK_TASK, "eval_with": "sts"}, {"model__task_layers": 1, "model__task_groups": {"pairs": ["sts", "sick"]}},
     "'sick' is eval_only and has no encoder top"),
    (SICK_TASK, {f"tasks__{t}__eval_only": True for t in ("sst", "quora", "sts")}, "at least one task must train"),
])
def test_validation_refuses(tmp_path, task, overrides, problem):
    assert problem in error(tmp_path, task, **overrides)


def test_eval_with_names_the_top_of_a_trained_task(tmp_path):
    cfg = load(tmp_path, {**SICK_TASK, "eval_with": "sts"}, model__task_layers=1)
    assert cfg.task("sick").eval_with == "sts"


# --- scoring pieces ----------------------------------------------------------------------------


def brute_force_accuracy(scores: np.ndarray, labels: np.ndarray) -> dict[float, float]:
    """Accuracy of `score > t` for t at, between and beyond every observed score."""
    values = np.unique(scores)
    candidates = [values[0] - 1, *values, *((values[:-1] + values[1:]) / 2), values[-1] + 1]
    return {float(t): float(((scores > t).astype(int) == labels).mean()) for t in candidates}


@pytest.mark.parametrize("seed", range(5))
def test_best_threshold_is_the_most_accurate(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(0.3 * labels + rng.normal(0, 0.3, 60), 1)  # rounded: many ties
    t = best_threshold(scores, labels)
    accuracy = brute_force_accuracy(scores, labels)
    best = max(accuracy.values())
    assert ((scores > t).astype(int) == labels).mean() == best
    # Ties go to the highest threshold that reaches it: the same predictions.
    highest = max(c for c, a in accuracy.items() if a == best)
    assert ((scores > t) == (scores > highest)).all()


def test_best_threshold_edges():
    assert best_threshold(np.array([0.9, 0.8, 0.1]), np.array([0, 0, 0])) > 0.9   # predict no positive
    assert best_threshold(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 1])) < 0.1   # every pair positive
    assert best_threshold(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0])) == pytest.approx(0.45)


def test_logistic_probe_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    from sklearn.preprocessing import StandardScaler
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 120)
    x = rng.normal(0, 1, (120, 6)) + np.eye(3, 6)[y] * 1.5 + np.array([5, -2, 0, 0, 10, 0])  # unstandardised
    x[:, 3] = 7.0  # a constant feature
    probe = LogisticProbe.fit(x, y, 3, c=0.5)
    ref = sklearn.LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(StandardScaler().fit_transform(x), y)
    probs = torch.softmax(torch.from_numpy(probe.logits(x)), -1).numpy()
    assert np.abs(probs - ref.predict_proba(StandardScaler().fit(x).transform(x))).max() < 1e-5
    assert np.abs(probe.weight.T - ref.coef_).max() < 1e-4
    assert (probe.predict(x) == ref.predict(StandardScaler().fit(x).transform(x))).all()


def test_cosine_correlations_per_group_pooled_and_mean():
    rng = np.random.default_rng(1)
    cos, gold = rng.normal(size=30), rng.uniform(0, 5, 30)
    groups = ["b"] * 12 + ["a"] * 18
    got = cosine_correlations(cos, gold, groups)
    a, b = slice(12, 30), slice(0, 12)
    want = {}
    for name, part in (("a", a), ("b", b), ("pooled", slice(None))):
        want[f"{name}/cosine_spearman"] = stats.spearmanr(cos[part], gold[part])[0]
        want[f"{name}/cosine_pearson"] = stats.pearsonr(cos[part], gold[part])[0]
    want["mean/cosine_spearman"] = (want["a/cosine_spearman"] + want["b/cosine_spearman"]) / 2
    want["mean/cosine_pearson"] = (want["a/cosine_pearson"] + want["b/cosine_pearson"]) / 2
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    assert cosine_correlations(cos, gold) == {"cosine_pearson": pytest.approx(want["pooled/cosine_pearson"]),
                                              "cosine_spearman": pytest.approx(want["pooled/cosine_spearman"])}


# --- runs --------------------------------------------------------------------------------------


def ood_pairs(n: int, seed: int) -> list[tuple[str, str, float]]:
    """Sentence pairs whose score grows with the words they share; some texts open a quote never closed."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        a = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        keep = rng.randint(0, len(a))
        b = a[:keep] + [rng.choice(WORDS) for _ in range(len(a) - keep)]
        first = ('"' if i % 7 == 0 else "") + " ".join(a)
        pairs.append((first, " ".join(b), round(1 + 4 * keep / len(a), 1)))
    return pairs


def write_ood_data(root: Path) -> dict[str, list]:
    """SICK- and MRPC-format files (CRLF, raw quotes; MRPC with a BOM) under root/ood; returns their pairs."""
    (root / "ood" / "sick").mkdir(parents=True, exist_ok=True)
    (root / "ood" / "mrpc").mkdir(parents=True, exist_ok=True)
    sick = ood_pairs(40, seed=1)
    lines = ["pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"]
    lines += [f"{i + 1}\t{a}\t{b}\t{s}\tNEUTRAL" for i, (a, b, s) in enumerate(sick)]
    (root / "ood" / "sick" / "SICK_test_annotated.txt").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    out = {"sick": sick}
    for split, seed in (("train", 2), ("test", 3)):
        pairs = [(a, b, int(s > 3)) for a, b, s in ood_pairs(30, seed)]
        lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        lines += [f"{q}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}" for i, (a, b, q) in enumerate(pairs)]
        (root / "ood" / "mrpc" / f"msr_paraphrase_{split}.txt").write_bytes(
            b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
        out[f"mrpc_{split}"] = pairs
    return out


def tiny_overrides(root: Path, cache: Path) -> dict:
    return {"data__root": str(root), "data__cache_dir": str(cache), "train__num_threads": 1,
            "train__log_every": 2, "train__eval_every": 3, "train__epochs": 1, "train__trace": True,
            **{f"tasks__{t}__{k}": None for t in ("sst", "quora", "sts") for k in ("max_train", "max_eval")}}


def sentence_embeddings(model, tokenizer, texts: list[str], group: str | None = None) -> torch.Tensor:
    """The encoder applied to each text on its own: no batching, no padding, no sharing with evaluate."""
    with torch.no_grad():
        out = []
        for text in texts:
            enc = tokenizer(text, truncation=True, max_length=64, return_tensors="pt")
            out.append(model.encoder(enc["input_ids"], enc["attention_mask"], None, group=group)[0])
        return torch.stack(out)


def cosines(model, tokenizer, pairs, group=None) -> np.ndarray:
    u = sentence_embeddings(model, tokenizer, [p[0] for p in pairs], group)
    v = sentence_embeddings(model, tokenizer, [p[1] for p in pairs], group)
    return torch.nn.functional.cosine_similarity(u, v, dim=-1).double().numpy()


def read_sst(path: Path) -> tuple[list[str], np.ndarray]:
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return [r[2].strip() for r in rows], np.array([int(r[3]) for r in rows])


@pytest.fixture(scope="module")
def eval_only_run(tmp_path_factory):
    from mtkit.run import run
    tmp = tmp_path_factory.mktemp("eval_only")
    root = write_toy_data(tmp / "data")
    pairs = write_ood_data(root)
    cfg = load(tmp, SICK_TASK, PROBE_TASK, MRPC_TASK, **tiny_overrides(root, tmp / "cache"))
    out = tmp / "run"
    return cfg, root, pairs, out, run(cfg, out)


def test_eval_only_metrics_equal_a_recomputation_from_the_best_weights(eval_only_run):
    from mtkit.checkpoint import model_weights
    from mtkit.model import build_model
    from mtkit.model.encoder import load_tokenizer
    cfg, root, pairs, out, results = eval_only_run
    dev = json.loads((out / "results.json").read_text())["dev"]
    assert dev == results["dev"]
    model = build_model(cfg)
    model.load_state_dict(model_weights(out / "best" / "model.pt"))  # no eval-only heads: loads strictly
    model.eval()
    tokenizer = load_tokenizer(cfg.model)

    gold = np.array([s for _, _, s in pairs["sick"]])
    cos = cosines(model, tokenizer, pairs["sick"])
    assert dev["sick"] == {"cosine_spearman": pytest.approx(stats.spearmanr(cos, gold)[0], abs=1e-6),
                           "cosine_pearson": pytest.approx(stats.pearsonr(cos, gold)[0], abs=1e-6)}

    fit = cosines(model, tokenizer, pairs["mrpc_train"])
    fit_labels = np.array([q for *_, q in pairs["mrpc_train"]])
    accuracy = brute_force_accuracy(fit, fit_labels)
    threshold = max(t for t, a in accuracy.items() if a == max(accuracy.values()))
    test_labels = np.array([q for *_, q in pairs["mrpc_test"]])
    pred = (cosines(model, tokenizer, pairs["mrpc_test"]) > threshold).astype(int)
    assert dev["mrpc"]["acc"] == pytest.approx((pred == test_labels).mean())
    assert dev["mrpc"]["f1"] == pytest.approx(2 * (pred & test_labels).sum() / (pred.sum() + test_labels.sum()))

    texts, labels = read_sst(root / "sst" / "ids-sst-train.csv")
    probe = LogisticProbe.fit(sentence_embeddings(model, tokenizer, texts).double().numpy(), labels, 5)
    texts, labels = read_sst(root / "sst" / "ids-sst-dev.csv")
    pred = probe.predict(sentence_embeddings(model, tokenizer, texts).double().numpy())
    assert dev["sst_probe"] == {"acc": pytest.approx((pred == labels).mean())}


def test_adding_eval_only_tasks_changes_no_training_step(eval_only_run, tmp_path):
    # The main configs carry SICK: their trained tasks must train exactly as they did without it.
    from mtkit.run import run
    from test_smoke import scalars
    _, root, _, out, results = eval_only_run
    plain = run(load(tmp_path, **tiny_overrides(root, tmp_path / "cache")), tmp_path / "plain")
    assert scalars(tmp_path / "plain", "train/loss/") == scalars(out, "train/loss/")
    assert plain["rank_weight_digests"] == results["rank_weight_digests"]
    assert {t: plain["dev"][t] for t in ("sst", "quora", "sts", "overall")} == \
        {t: results["dev"][t] for t in ("sst", "quora", "sts", "overall")}


def test_eval_only_tasks_are_not_trained_and_not_in_the_overall_score(eval_only_run):
    from mtkit.checkpoint import model_weights
    from test_smoke import scalars
    cfg, _, _, out, results = eval_only_run
    dev = results["dev"]
    trained = ("sst", "quora", "sts")
    overall = (dev["sst"]["acc"] + dev["quora"]["acc"] + (dev["sts"]["pearson"] + 1) / 2) / 3
    assert dev["overall"] == pytest.approx(overall)
    weights = model_weights(out / "best" / "model.pt")
    assert {k.split(".")[1] for k in weights if k.startswith("heads.")} == set(trained)
    seen = {json.loads(line)["task"] for line in (out / "trace" / "rank0.jsonl").read_text().splitlines()}
    assert seen == set(trained)  # the sampler never drew an eval-only task, though sst_probe has a train split
    diagnosed = [json.loads(line) for line in (out / "diagnostics.jsonl").read_text().splitlines()]
    assert diagnosed and all(set(r["norm"]) == set(trained) for r in diagnosed)
    tags = scalars(out, "dev/")
    assert {"dev/sick/cosine_spearman", "dev/mrpc/threshold", "dev/sst_probe/acc"} <= set(tags)
    assert [s for s, _ in tags["dev/sick/cosine_spearman"]] == [s for s, _ in tags["dev/overall"]]
    assert results["sizes"]["sick"] == {"test": 40} and results["sizes"]["sst_probe"] == {"train": 48, "test": 48}


def test_semeval_year_folder_and_eval_with_a_task_top(tmp_path):
    """With task-specific layers an eval-only task is embedded by the top of its eval_with task; a SemEval
    year is scored per genre, pooled and as the genre mean; triplets by triplet accuracy."""
    from mtkit.distributed import Dist
    from mtkit.evaluate import evaluate
    from mtkit.model.encoder import load_tokenizer
    from mtkit.run import build
    from test_task_layers import perturb
    root = write_toy_data(tmp_path / "data", n=16)
    year = root / "ood" / "STS13"
    year.mkdir(parents=True)
    genres = {"headlines": ood_pairs(12, seed=4), "OnWN": ood_pairs(9, seed=5)}
    for genre, pairs in genres.items():
        (year / f"STS.input.{genre}.txt").write_text("".join(f"{a}\t{b}\n" for a, b, _ in pairs) + "x\ty\n")
        (year / f"STS.gs.{genre}.txt").write_text("".join(f"{s}\n" for *_, s in pairs) + "\n")  # last: unscored
    task = {"name": "sts13", "kind": "pair_regression", "eval_only": True, "test": "ood/STS13",
            "format": "semeval_sts", "eval_with": "sts"}
    triplets = {"name": "snli", "kind": "contrastive", "eval_only": True, "test": "nli/snli-dev-triples.csv",
                "eval_with": "sst"}
    cfg = load(tmp_path, task, triplets, model__task_layers=1, **tiny_overrides(root, tmp_path / "cache"))
    _, tasks, model = build(cfg, Dist())
    for seed, top in enumerate(model.encoder.tops.values()):
        perturb(top, seed)  # tops differ, so the one used shows
    metrics = evaluate(model, tasks, "dev", 8, torch.device("cpu"))
    got = metrics["sts13"]
    model.eval()
    tokenizer = load_tokenizer(cfg.model)
    all_pairs = [p for g in sorted(genres) for p in genres[g]]
    want = cosine_correlations(cosines(model, tokenizer, all_pairs, group="sts"), np.array([s for *_, s in all_pairs]),
                               [g for g in sorted(genres) for _ in genres[g]])
    assert set(got) == {f"{g}/cosine_{m}" for g in ("headlines", "OnWN", "pooled", "mean")
                        for m in ("pearson", "spearman")}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k
    other = cosine_correlations(cosines(model, tokenizer, all_pairs, group="sst"), np.array([s for *_, s in all_pairs]))
    assert other["cosine_spearman"] != pytest.approx(got["pooled/cosine_spearman"], abs=1e-3)
    rows = [line.split(",") for line in (root / "nli" / "snli-dev-triples.csv").read_text().splitlines()[1:]]
    anchor, positive, negative = (sentence_embeddings(model, tokenizer, [r[i] for r in rows], "sst") for i in range(3))
    closer = (torch.nn.functional.cosine_similarity(anchor, positive, dim=-1)
              > torch.nn.functional.cosine_similarity(anchor, negative, dim=-1))
    assert metrics["snli"] == {"triplet_acc": pytest.approx(closer.double().mean().item())}


@pytest.mark.slow
def test_two_ranks_score_eval_only_tasks_as_one_process(tmp_path):
    """Two DeepSpeed ranks (ZeRO-2): the eval-only metrics in results.json, evaluated with the embeddings
    sharded over ranks, equal a single-process `mtkit eval` of the same best weights."""
    from distributed_util import deepspeed, run
    root = write_toy_data(tmp_path / "data", n=64)
    write_ood_data(root)
    raw = yaml.safe_load((CONFIGS / "debug_tiny.yaml").read_text())
    raw["tasks"] += [SICK_TASK, PROBE_TASK, MRPC_TASK]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "run"
    deepspeed("launchers/train.py", "--config", str(config), "--out", str(out), f"--data.root={root}",
              f"--data.cache_dir={tmp_path / 'cache'}", "--train.eval_every=6", "--train.batch_size=8",
              "--deepspeed.config=configs/deepspeed/zero2.json")
    two_ranks = json.loads((out / "results.json").read_text())["dev"]
    proc = run([sys.executable, "-m", "mtkit.cli", "eval", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads(proc.stdout[proc.stdout.index("{"):])
    for task in ("sick", "sst_probe", "mrpc"):
        assert single[task].keys() == two_ranks[task].keys()
        for name, value in two_ranks[task].items():
            assert single[task][name] == pytest.approx(value, abs=1e-6), (task, name)
