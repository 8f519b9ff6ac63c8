"""Dev/test evaluation: metrics (scipy), the CS224N overall score and CS224N-format prediction files.

Each unique sentence of a split (each pair, for a cross-encoder task) is embedded once per evaluation
(Quora and STS repeat many), in length-sorted batches of about equal padded size, then the head runs on
the gathered embeddings. With W ranks every rank embeds a contiguous shard of the sentences and the
shards are gathered, so the metrics equal single-process evaluation of the same weights.

Eval-only tasks (`eval_only: true`, out-of-distribution data) have no head: `evaluate_eval_only` scores
them from the embeddings alone, on their test split (dev when they declare none), at every evaluation.
They never enter the CS224N overall score, so they cannot pick the checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize, special, stats
from tqdm import tqdm

from mtkit.data.dataset import TaskData, collate
from mtkit.data.sampler import shard_for_eval

PRED_HEADER = {"classification": "Predicted_Sentiment", "pair_classification": "Predicted_Is_Paraphrase",
               "pair_regression": "Predicted_Similiarity"}  # spelling as in the CS224N starter code


@torch.no_grad()
def embed_split(model, task: TaskData, split: str, batch_size: int, device, gather=None,
                cache: dict | None = None, tokens_per_row: int = 32) -> torch.Tensor:
    """Embeddings [n_texts, N, H] of every text of a split, each unique token sequence encoded once.

    `cache` carries embeddings between the calls of one evaluation, so a sentence that several tasks or
    splits share is encoded once; the key holds the task's encoder top (`model.top_of`), since tasks
    share the whole encoder unless `model.task_layers` gives them tops of their own. Sequences are
    sorted by length and batched by padded tokens (batch_size x tokens_per_row): short sentences go in
    large batches, long ones in small batches of the same size in memory.
    """
    s = task.splits[split]
    group = model.top_of.get(task.cfg.name)
    cache = {} if cache is None else cache
    keys: dict[tuple, int] = {}  # (top group, token ids, token types of a joint pair) -> row
    where = []                   # [N, n_texts] rows
    for i, texts in enumerate(s.tokens):
        row = []
        for k, ids in enumerate(texts):  # a joint pair is text 0; single sentences have type 0
            types = tuple(s.segments[i]) if s.segments is not None and k == 0 else None
            row.append(keys.setdefault((group, tuple(ids), types), len(keys)))
        where.append(row)
    todo = [key for key in keys if key not in cache]
    world, rank = gather.world_rank() if gather else (1, 0)
    order = sorted(shard_for_eval(len(todo), world, rank), key=lambda i: len(todo[i][1]))
    quiet = rank != 0 or os.environ.get("MTKIT_QUIET", "") not in ("", "0")
    bar = tqdm(total=sum(len(todo[i][1]) for i in order), unit="tok", unit_scale=True, leave=False,
               desc=f"eval {task.cfg.name}/{split}", disable=quiet, dynamic_ncols=True)
    budget = batch_size * tokens_per_row
    out = torch.zeros(len(todo), model.encoder.hidden_size)
    start = 0
    while start < len(order):
        end = start + 1  # ascending lengths: the batch is as wide as its last sequence
        while end < len(order) and (end + 1 - start) * len(todo[order[end]][1]) <= budget:
            end += 1
        idx = order[start:end]
        joint = any(todo[i][2] is not None for i in idx)
        batch = collate([(list(todo[i][1]),) for i in idx], [None], model.pad_id, torch.long,
                        [list(todo[i][2] or [0] * len(todo[i][1])) for i in idx] if joint else None)
        types = batch.get("token_type_ids")
        emb = model.encoder(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                            None if types is None else types.to(device), group=group)
        out[idx] = emb.float().cpu()
        bar.update(int(batch["attention_mask"].sum()))
        start = end
    bar.close()
    if gather is not None and todo:  # every rank holds the same cache, so all skip or none
        out = gather.sum(out)  # each row is filled on exactly one rank
    cache.update(zip(todo, out))
    rows = torch.stack([cache[key] for key in keys])
    return rows[torch.tensor(where)].permute(1, 0, 2).contiguous()                      # [n_texts, N, H]


@torch.no_grad()
def predict_task(model, task: TaskData, split: str, batch_size: int, device, gather=None,
                 cache: dict | None = None) -> dict:
    emb = embed_split(model, task, split, batch_size, device, gather, cache)           # [n_texts, N, H]
    result = {"ids": [e.id for e in task.splits[split].examples]}
    if task.cfg.kind == "contrastive":  # does the anchor sit closer to its positive than its negative?
        result["pred"] = (F.cosine_similarity(emb[0], emb[1], dim=-1)
                          > F.cosine_similarity(emb[0], emb[2], dim=-1)).numpy().astype(int)
        return result
    head = model.heads[task.cfg.name]
    dtype = next(head.parameters()).dtype  # bf16/fp16 under DeepSpeed's mixed precision
    outputs = torch.cat([head(emb[:, i:i + 1024].to(device, dtype)).float().cpu()
                         for i in range(0, emb.shape[1], 1024)])
    if task.cfg.kind == "pair_regression":
        result["pred"] = outputs.numpy()
        if emb.shape[0] >= 2:  # the two sentence embeddings (after the joint pair, for cross_cosine)
            result["cosine"] = F.cosine_similarity(emb[-2], emb[-1], dim=-1).numpy()
    else:
        result["pred"] = outputs.argmax(-1).numpy()
        if outputs.shape[-1] == 2:
            result["margin"] = (outputs[:, 1] - outputs[:, 0]).numpy()
    return result


def fit_threshold(margin: np.ndarray, labels: np.ndarray) -> float:
    """Platt scaling of a binary margin on held-out rows: fit p(y=1) = sigmoid(a * m + b) by maximum
    likelihood and return the margin where it crosses 1/2, -b / a. margin, labels [N]."""
    m, y = margin.astype(np.float64), labels.astype(np.float64)

    def nll(ab):  # mean log loss and its gradient
        z = ab[0] * m + ab[1]
        p = special.expit(z)  # stable for large |z|
        loss = np.mean(np.logaddexp(0.0, z) - y * z)
        return loss, np.array([np.mean((p - y) * m), np.mean(p - y)])

    a, b = optimize.minimize(nll, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B").x
    return float(-b / a) if a > 0 else 0.0  # a <= 0: the margin carries no signal here; keep argmax


def metrics_for(kind: str, result: dict, labels: np.ndarray | None) -> dict[str, float]:
    pred = result["pred"]
    if kind == "pair_regression":
        out = {"pearson": _pearson(pred, labels), "spearman": _spearman(pred, labels)}
        if "cosine" in result:
            out.update(cosine_pearson=_pearson(result["cosine"], labels),
                       cosine_spearman=_spearman(result["cosine"], labels))
        return out
    out = {"acc": float((pred == labels).mean())}
    if set(np.unique(labels)) <= {0, 1}:
        out["f1"] = _f1(pred, labels)
    return out


def primary(kind: str, m: dict[str, float]) -> float:
    """The per-task term of the CS224N overall score: accuracy, or (Pearson + 1) / 2 for STS."""
    if kind == "pair_regression":
        return (m["pearson"] + 1) / 2
    return m["acc"]


def evaluate(model, tasks: dict[str, TaskData], split: str, batch_size: int, device, gather=None,
             pred_dir: Path | None = None) -> dict:
    """{task: {metric: value}, "overall": float}; writes prediction files when pred_dir is given."""
    was_training = model.training
    model.eval()
    results: dict = {}
    scores = []
    cache: dict = {}  # embeddings shared by the tasks and splits of this evaluation
    try:
        for name, task in tasks.items():
            kind = task.cfg.kind
            if task.cfg.eval_only:  # scored on its own held-out split, whichever split is asked for
                results[name] = evaluate_eval_only(model, task, batch_size, device, gather)
                continue
            if split not in task.splits or kind == "sentences":  # unlabelled sentences: nothing to score
                continue
            res = predict_task(model, task, split, batch_size, device, gather, cache)
            threshold = None
            if "calib" in task.splits and "margin" in res:
                held_out = predict_task(model, task, "calib", batch_size, device, gather, cache)
                threshold = fit_threshold(held_out["margin"],
                                          np.asarray([e.label for e in task.splits["calib"].examples]))
                res["pred"] = (res["margin"] > threshold).astype(int)
            labels = [e.label for e in task.splits[split].examples]
            if kind == "contrastive":  # a training signal of its own; not part of the CS224N score
                results[name] = {"triplet_acc": float(res["pred"].mean())}
            elif labels and labels[0] is not None:
                results[name] = metrics_for(kind, res, np.asarray(labels))
                if threshold is not None:
                    results[name]["threshold"] = threshold
                scores.append(primary(kind, results[name]))
            if pred_dir is not None and task.cfg.kind in PRED_HEADER:
                write_predictions(pred_dir / f"{name}-{split}-output.csv", task.cfg.kind, res)
    finally:
        model.train(was_training)
    if scores:
        results["overall"] = float(np.mean(scores))
    return results


# ---------------------------------------------------------------- eval-only tasks

PROBE_C = 1.0  # inverse L2 strength of the logistic probe, fixed: choosing it on OOD data would tune on them


def evaluate_eval_only(model, task: TaskData, batch_size: int, device, gather=None) -> dict[str, float]:
    """Metrics of an eval-only task from the encoder's embeddings of its scored split (test, else dev):

    * pair_regression: Spearman and Pearson of the embedding cosine with the gold scores (the SBERT /
      SimCSE protocol), per group (SemEval STS genre) and over the year, pooled and as the mean of the
      genres, when the examples have groups;
    * pair_classification (binary): the cosine above a threshold chosen for accuracy on `threshold_split`;
    * classification: SentEval's logistic-regression probe on standardised embeddings, fitted on
      `probe_split` (L2, fixed C = PROBE_C);
    * contrastive: triplet accuracy (the anchor closer to its positive than to its negative).
    """
    cfg = task.cfg
    scored = "test" if "test" in task.splits else "dev"
    emb = _embed_eval_only(model, task, scored, batch_size, device, gather)             # [n_texts, N, H]
    labels = np.asarray([e.label for e in task.splits[scored].examples])
    if cfg.kind == "contrastive":
        closer = F.cosine_similarity(emb[0], emb[1], dim=-1) > F.cosine_similarity(emb[0], emb[2], dim=-1)
        return {"triplet_acc": float(closer.float().mean())}
    if cfg.kind == "pair_regression":
        groups = [e.group for e in task.splits[scored].examples]
        return cosine_correlations(_cosine(emb), labels, groups if groups[0] is not None else None)
    if cfg.kind == "pair_classification":
        fit = cfg.threshold_split
        fit_labels = np.asarray([e.label for e in task.splits[fit].examples])
        threshold = best_threshold(_cosine(_embed_eval_only(model, task, fit, batch_size, device, gather)),
                                   fit_labels)
        out = metrics_for(cfg.kind, {"pred": (_cosine(emb) > threshold).astype(int)}, labels)
        return {**out, "threshold": threshold}
    fit = cfg.probe_split
    features = _embed_eval_only(model, task, fit, batch_size, device, gather)[0].double().numpy()
    n_classes = cfg.num_labels or len(cfg.label_names)
    probe = LogisticProbe.fit(features, np.asarray([e.label for e in task.splits[fit].examples]), n_classes)
    return metrics_for(cfg.kind, {"pred": probe.predict(emb[0].double().numpy())}, labels)


def _embed_eval_only(model, task: TaskData, split: str, batch_size: int, device, gather) -> torch.Tensor:
    # embed_split picks the encoder top by task name; an eval-only task has no top of its own, so with
    # task-specific layers it is embedded under the name of the trained task it borrows one from.
    if model.top_of and task.cfg.eval_with is not None:
        task = dataclasses.replace(task, cfg=dataclasses.replace(task.cfg, name=task.cfg.eval_with))
    return embed_split(model, task, split, batch_size, device, gather)


def _cosine(emb: torch.Tensor) -> np.ndarray:
    return F.cosine_similarity(emb[0], emb[1], dim=-1).double().numpy()


def cosine_correlations(cosine: np.ndarray, labels: np.ndarray, groups: list[str] | None = None) -> dict[str, float]:
    """cosine_pearson / cosine_spearman; with groups, `<group>/...` for each, `pooled/...` over all pairs
    together and `mean/...`, the unweighted mean over groups (the two ways STS years are reported)."""
    if groups is None:
        return {"cosine_pearson": _pearson(cosine, labels), "cosine_spearman": _spearman(cosine, labels)}
    out: dict[str, float] = {}
    names = sorted(set(groups))
    for name in names:
        mask = np.asarray([g == name for g in groups])
        out.update({f"{name}/{k}": v for k, v in cosine_correlations(cosine[mask], labels[mask]).items()})
    out.update({f"pooled/{k}": v for k, v in cosine_correlations(cosine, labels).items()})
    for k in ("cosine_pearson", "cosine_spearman"):
        out[f"mean/{k}"] = float(np.mean([out[f"{name}/{k}"] for name in names]))
    return out


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold t for `score > t` -> 1 with the highest accuracy on (scores, labels) [N], halfway
    between two consecutive distinct scores (or half a unit beyond them all); ties go to the higher t."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order].astype(np.float64), labels[order]
    # Predicting the top k as positive is right on the positives among them and the negatives after them.
    positives_top = np.concatenate([[0], np.cumsum(y == 1)])                               # [N + 1]
    negatives_top = np.concatenate([[0], np.cumsum(y == 0)])
    correct = positives_top + (negatives_top[-1] - negatives_top)
    cut = np.concatenate([[True], s[:-1] > s[1:], [True]])  # a threshold cannot split equal scores
    k = int(np.argmax(np.where(cut, correct, -1)))
    padded = np.concatenate([[s[0] + 1.0], s, [s[-1] - 1.0]])
    return float((padded[k] + padded[k + 1]) / 2)


@dataclasses.dataclass
class LogisticProbe:
    """Multinomial logistic regression on standardised features (SentEval's probe): minimises
    mean cross-entropy + |W|^2 / (2 C N), the bias unpenalised, which is scikit-learn's
    LogisticRegression(C) objective (C * sum of losses + |W|^2 / 2) divided by C N."""

    mean: np.ndarray    # [D]
    scale: np.ndarray   # [D]
    weight: np.ndarray  # [D, K]
    bias: np.ndarray    # [K]

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, n_classes: int, c: float = PROBE_C) -> "LogisticProbe":
        mean, scale = x.mean(0), x.std(0)
        scale[scale == 0] = 1.0  # a constant feature carries nothing; leave it at 0
        z = (x - mean) / scale                                                         # [N, D]
        n, d = z.shape
        onehot = np.eye(n_classes)[y]                                                  # [N, K]

        def loss(params):
            w, b = params[:d * n_classes].reshape(d, n_classes), params[d * n_classes:]
            logits = z @ w + b
            log_p = logits - special.logsumexp(logits, axis=1, keepdims=True)
            err = (np.exp(log_p) - onehot) / n                                         # d loss / d logits
            value = -(onehot * log_p).sum() / n + (w ** 2).sum() / (2 * c * n)
            return value, np.concatenate([(z.T @ err + w / (c * n)).ravel(), err.sum(0)])

        start = np.zeros(d * n_classes + n_classes)
        params = optimize.minimize(loss, start, jac=True, method="L-BFGS-B",
                                   options={"maxiter": 2000, "gtol": 1e-8}).x
        return cls(mean, scale, params[:d * n_classes].reshape(d, n_classes), params[d * n_classes:])

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.weight + self.bias

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(-1)


def write_predictions(path: Path, kind: str, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"id \t {PRED_HEADER[kind]} \n")
        for i, p in zip(result["ids"], result["pred"]):
            f.write(f"{i} , {float(p) if kind == 'pair_regression' else int(p)} \n")


def _pearson(a, b) -> float:
    return float(stats.pearsonr(a, b).statistic) if np.std(a) > 0 else 0.0


def _spearman(a, b) -> float:
    return float(stats.spearmanr(a, b).statistic) if np.std(a) > 0 else 0.0


def _f1(pred, labels) -> float:
    tp = float(((pred == 1) & (labels == 1)).sum())
    denom = float((pred == 1).sum() + (labels == 1).sum())
    return 2 * tp / denom if denom else 0.0
