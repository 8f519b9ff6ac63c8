"""PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning") in Gram form."""

from __future__ import annotations

import torch

from .base import SeededStrategy, as_gram, random_orders, register


def pcgrad_coefficients(K: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Projected gradients as combinations of the originals.  K: [T, T], orders: [T, T] -> C [T, T].

    Row i gives g_i' = Σ_k C[i, k] g_k.  Starting from g_i, for each other
    task j in ``orders[i]``: if g_i'·g_j < 0, subtract the component of g_i'
    along the original g_j, ``(g_i'·g_j / ‖g_j‖²) g_j``, i.e. ``C[i, j] -=``
    that coefficient.  Both dot products come from K: g_i'·g_j = C[i] K[:, j].
    """
    K = as_gram(K)
    T = K.shape[0]
    C = torch.eye(T, dtype=torch.float64)  # [T, T]
    for i in range(T):
        for j in orders[i].tolist():
            if j == i or K[j, j] <= 0:
                continue
            dot = C[i] @ K[:, j]
            if dot < 0:
                C[i, j] -= dot / K[j, j]
    return C


@register
class PCGrad(SeededStrategy):
    """Sum of the PCGrad-projected task gradients.

    Each call draws, from the strategy's own seeded generator, one random
    order of the other tasks per task (as in the paper's algorithm), so
    identically seeded instances fed the same Grams return the same weights.
    """

    name = "pcgrad"

    def weights(self, K: torch.Tensor) -> torch.Tensor:
        K = as_gram(K)
        orders = random_orders(K.shape[0], self.generator)  # [T, T]
        return pcgrad_coefficients(K, orders).sum(0)
