"""Pure losses: tensors in, scalar out. Shapes: B batch, C classes, H hidden."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # logits [B, C], labels [B] long
    return F.cross_entropy(logits.float(), labels)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # pred [B], target [B]
    return F.mse_loss(pred.float(), target.float())


def cosent(pred: torch.Tensor, target: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """CoSENT (Su 2022): only the ranking of the predictions matters, as for Spearman.

    log(1 + sum over pairs with target_i > target_j of exp(scale * (pred_j - pred_i))).
    """
    # pred [B], target [B]
    diff = scale * (pred.float()[None, :] - pred.float()[:, None])        # [B, B]: pred_j - pred_i
    wanted = target[:, None] > target[None, :]                           # [B, B]: pair (i, j) counts
    diff = diff.masked_fill(~wanted, float("-inf")).flatten()
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff]), dim=0)


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None,
             temperature: float = 0.05) -> torch.Tensor:
    """Supervised SimCSE (Gao et al. 2021): the positive against every other candidate in the batch.

    Candidates are all positives plus, when given, all hard negatives; cosine over a temperature.
    """
    # anchor [B, H], positive [B, H], negative [B, H] or None
    candidates = positive if negative is None else torch.cat([positive, negative])  # [B or 2B, H]
    sim = F.cosine_similarity(anchor.float()[:, None, :], candidates.float()[None, :, :], dim=-1)
    labels = torch.arange(anchor.shape[0], device=anchor.device)
    return F.cross_entropy(sim / temperature, labels)                              # sim [B, B or 2B]


LOSSES = {"ce": cross_entropy, "mse": mse, "cosent": cosent}
DEFAULT_LOSS = {"classification": "ce", "pair_classification": "ce", "pair_regression": "mse"}
