"""Task heads. One module per task; pair tasks pick a decoder that turns (u, v) into features."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtkit.config import TaskConfig


# Decoders: (u [B, H], v [B, H]) -> features [B, D]; `dim(H)` gives D. The joint decoder `cross` instead
# reads one embedding [B, H] of both texts encoded together ([CLS] a [SEP] b [SEP]); see TaskConfig.joint.
# `cross_cosine` reads both kinds and has a head of its own (CrossCosineHead).
class Decoder:
    def dim(self, hidden: int) -> int:
        raise NotImplementedError

    def __call__(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Concat(Decoder):
    def dim(self, hidden):
        return 2 * hidden

    def __call__(self, u, v):
        return torch.cat([u, v], dim=-1)


class Product(Decoder):
    """The study's 'weighted dot product': a linear layer over u*v is a learned weighting of u.v."""

    def dim(self, hidden):
        return hidden

    def __call__(self, u, v):
        return u * v


class SBert(Decoder):
    def dim(self, hidden):
        return 4 * hidden

    def __call__(self, u, v):
        return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)


class Cosine(Decoder):
    """A single feature, cos(u, v); the head's linear layer scales and shifts it."""

    def dim(self, hidden):
        return 1

    def __call__(self, u, v):
        return F.cosine_similarity(u, v, dim=-1).unsqueeze(-1)


class Cross(Decoder):
    """Cross-encoder: the encoder attends across both texts, so word-level matches ("IQ" vs "IQ?") are
    seen directly instead of through two pooled vectors. Costs one encoding per pair, and the
    embeddings of single sentences are no longer what the head reads."""

    def dim(self, hidden):
        return hidden

    def __call__(self, uv):
        return uv


DECODERS: dict[str, type[Decoder]] = {"concat": Concat, "product": Product, "sbert": SBert, "cosine": Cosine,
                                      "cross": Cross}


class Head(nn.Module):
    """embeddings [n_texts, B, H] -> logits [B, C] (classification) or scores [B] (regression)."""

    def __init__(self, task: TaskConfig, in_dim: int, out_dim: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(task.dropout)] if in_dim > 1 else []
        if task.head_hidden > 0:
            layers += [nn.Linear(in_dim, task.head_hidden), nn.GELU(), nn.Dropout(task.dropout)]
            in_dim = task.head_hidden
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(in_dim, out_dim)
        self.regression = task.kind == "pair_regression"

    def features(self, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        y = self.out(self.mlp(self.features(emb)))
        return y.squeeze(-1) if self.regression else y


class SentenceHead(Head):
    def __init__(self, task: TaskConfig, hidden: int):
        super().__init__(task, hidden, _num_labels(task))

    def features(self, emb):
        return emb[0]


class PairHead(Head):
    def __init__(self, task: TaskConfig, hidden: int):
        decoder = DECODERS[task.decoder]()
        out_dim = 1 if task.kind == "pair_regression" else _num_labels(task)
        super().__init__(task, decoder.dim(hidden), out_dim)
        self.decoder = decoder
        if task.decoder == "cosine":
            _init_cosine_map(self.out, task)

    def features(self, emb):
        return self.decoder(*emb)  # emb [2, B, H], or [1, B, H] for a joint decoder


class CrossCosineHead(Head):
    """Cross-encoder plus bi-encoder: logits = cross part(joint [B, H]) + cosine part(cos(u, v)).

    emb [3, B, H]: the joint pair, text 1, text 2. The cosine part starts as the `cosine` decoder's map,
    so the head starts from what a pretrained sentence encoder already knows about the pair, and the
    cross part learns what the two pooled vectors miss. The cosine bypasses the head's dropout: dropping
    the only similarity feature would hide the signal rather than regularize it."""

    def __init__(self, task: TaskConfig, hidden: int):
        out_dim = 1 if task.kind == "pair_regression" else _num_labels(task)
        super().__init__(task, hidden, out_dim)
        self.cosine = nn.Linear(1, out_dim)
        _init_cosine_map(self.cosine, task)
        if task.kind == "pair_regression":
            with torch.no_grad():  # the cosine part carries the label offset alone
                self.out.bias.zero_()

    def forward(self, emb):
        cos = F.cosine_similarity(emb[1], emb[2], dim=-1).unsqueeze(-1)   # [B, 1]
        y = self.out(self.mlp(emb[0])) + self.cosine(cos)                 # [B, C]
        return y.squeeze(-1) if self.regression else y


def _init_cosine_map(linear: nn.Linear, task: TaskConfig) -> None:
    with torch.no_grad():
        if task.kind == "pair_regression" and task.label_range:
            # Start at score = low + (high - low) * cos, the usual cosine-to-score map.
            low, high = task.label_range
            linear.weight.fill_(high - low)
            linear.bias.fill_(low)
        elif linear.out_features == 2:
            # logit(1) - logit(0) = 20 * (cos - 0.5): a contrastive-style scale, so the loss
            # shapes the cosine geometry from the first step instead of waiting for the head.
            linear.weight.copy_(torch.tensor([[-10.0], [10.0]]))
            linear.bias.copy_(torch.tensor([5.0, -5.0]))


class EmbeddingHead(nn.Module):
    """Contrastive tasks have no parameters: the loss works on the embeddings themselves."""

    def __init__(self, task: TaskConfig, hidden: int):
        super().__init__()

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return emb


HEADS: dict[str, type[nn.Module]] = {
    "classification": SentenceHead,
    "pair_classification": PairHead,
    "pair_regression": PairHead,
    "contrastive": EmbeddingHead,
    "sentences": EmbeddingHead,
}


def make_head(task: TaskConfig, hidden: int) -> nn.Module:
    if task.joint and task.decoder == "cross_cosine":
        return CrossCosineHead(task, hidden)
    return HEADS[task.kind](task, hidden)


def _num_labels(task: TaskConfig) -> int:
    return task.num_labels or len(task.label_names or [])
