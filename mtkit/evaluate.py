"""Dev/test evaluation: metrics (scipy), the CS224N overall score and CS224N-format prediction files.

Each unique sentence of a split (each pair, for a cross-encoder task) is embedded once (Quora and STS
repeat many), in length-sorted batches, then the head runs on the gathered embeddings. With W ranks every
rank embeds a contiguous shard of the sentences and the shards are gathered, so the metrics equal
single-process evaluation of the same weights.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import optimize, special, stats

from mtkit.data.dataset import TaskData, collate
from mtkit.data.sampler import shard_for_eval

PRED_HEADER = {"classification": "Predicted_Sentiment", "pair_classification": "Predicted_Is_Paraphrase",
               "pair_regression": "Predicted_Similiarity"}  # spelling as in the CS224N starter code


@torch.no_grad()
def embed_split(model, task: TaskData, split: str, batch_size: int, device, gather=None) -> torch.Tensor:
    """Embeddings [n_texts, N, H] of every text of a split, each unique token sequence encoded once."""
    s = task.splits[split]
    tokens = s.tokens
    unique: dict[tuple[int, ...], int] = {}
    segments: list[list[int]] = []  # joint pairs: the token types of each unique sequence
    for i, texts in enumerate(tokens):
        for k, ids in enumerate(texts):
            if tuple(ids) not in unique:
                unique[tuple(ids)] = len(unique)
                if s.segments is not None:  # a joint pair is text 0; single sentences have type 0
                    segments.append(s.segments[i] if k == 0 else [0] * len(ids))
    seqs = list(unique)
    mine = shard_for_eval(len(seqs), *(gather.world_rank() if gather else (1, 0)))
    order = sorted(mine, key=lambda i: len(seqs[i]))
    pad_id = model.pad_id
    out = torch.zeros(len(seqs), model.encoder.hidden_size)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = collate([(list(seqs[i]),) for i in idx], [None], pad_id, torch.long,
                        [segments[i] for i in idx] if segments else None)
        types = batch.get("token_type_ids")
        emb = model.encoder(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                            None if types is None else types.to(device), group=model.top_of.get(task.cfg.name))
        out[idx] = emb.float().cpu()
    if gather is not None:
        out = gather.sum(out)  # each row is filled on exactly one rank
    where = torch.tensor([[unique[tuple(ids)] for ids in texts] for texts in tokens])  # [N, n_texts]
    return out[where].permute(1, 0, 2).contiguous()                                      # [n_texts, N, H]


@torch.no_grad()
def predict_task(model, task: TaskData, split: str, batch_size: int, device, gather=None) -> dict:
    emb = embed_split(model, task, split, batch_size, device, gather)                   # [n_texts, N, H]
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
    try:
        for name, task in tasks.items():
            kind = task.cfg.kind
            if split not in task.splits or kind == "sentences":  # unlabelled sentences: nothing to score
                continue
            res = predict_task(model, task, split, batch_size, device, gather)
            threshold = None
            if "calib" in task.splits and "margin" in res:
                held_out = predict_task(model, task, "calib", batch_size, device, gather)
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
