"""The plain sum of task gradients."""

from __future__ import annotations

import torch

from .base import Strategy, as_gram, register


@register
class SumStrategy(Strategy):
    """Weights all ones: the update is Σ_t g_t (ordinary multi-task training)."""

    name = "sum"
    uses_gram = False

    def weights(self, K: torch.Tensor) -> torch.Tensor:
        return torch.ones(as_gram(K).shape[0], dtype=torch.float64)
