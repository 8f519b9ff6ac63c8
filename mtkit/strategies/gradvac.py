"""Gradient Vaccine (Wang et al. 2021, "Gradient Vaccine: Investigating and Improving
Multi-task Optimization in Massively Multilingual Models") in Gram form."""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import SeededStrategy, as_gram, random_orders, register

# Keeps the correction finite when a target cosine has drifted to exactly ±1.
_MIN_SINE = 1e-6


def gradvac_coefficients(
    K: torch.Tensor, targets: torch.Tensor, orders: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One GradVac step.  K, targets, orders: [T, T] -> (C [T, T], new targets [T, T]).

    Row i of C gives the vaccinated g_i' = Σ_k C[i, k] g_k.  Starting from
    g_i, for each other task j in ``orders[i]``: φ = cos(g_i', g_j) against
    the original g_j; if φ is below the target φ̂ = targets[i, j], add
    ``a g_j`` with ``a = ‖g_i'‖ (φ̂ √(1−φ²) − φ √(1−φ̂²)) / (‖g_j‖ √(1−φ̂²))``,
    the multiple that raises the cosine to exactly φ̂.  Then the target
    follows the observed cosine: ``φ̂ ← (1−β) φ̂ + β φ``.  Pairs with a zero
    gradient have no cosine and are skipped (no correction, no update).
    """
    K = as_gram(K)
    T = K.shape[0]
    C = torch.eye(T, dtype=torch.float64)  # [T, T]
    new_targets = targets.clone().to(torch.float64)  # [T, T]
    for i in range(T):
        for j in orders[i].tolist():
            norm_j_sq = float(K[j, j])
            norm_i_sq = float(C[i] @ K @ C[i])
            if j == i or norm_j_sq <= 0 or norm_i_sq <= 0:
                continue
            norm_i, norm_j = math.sqrt(norm_i_sq), math.sqrt(norm_j_sq)
            phi = max(-1.0, min(1.0, float(C[i] @ K[:, j]) / (norm_i * norm_j)))
            target = float(new_targets[i, j])
            if phi < target:
                sine_target = max(math.sqrt(max(1.0 - target * target, 0.0)), _MIN_SINE)
                sine_phi = math.sqrt(max(1.0 - phi * phi, 0.0))
                C[i, j] += norm_i * (target * sine_phi - phi * sine_target) / (norm_j * sine_target)
            new_targets[i, j] = (1.0 - beta) * target + beta * phi
    return C, new_targets


@register
class GradVac(SeededStrategy):
    """Sum of the vaccinated task gradients; keeps an EMA target cosine per ordered task pair.

    Targets start at 0 (so at first GradVac acts like PCGrad, lifting
    negative cosines to 0) and track the observed cosines with rate ``beta``.
    Applied to the whole shared-parameter vector (one Gram), not per layer,
    because per-layer corrections are not a single linear combination of
    the task gradients.  Stateful: targets and generator are in ``state_dict``.
    """

    name = "gradvac"

    def __init__(self, beta: float = 0.01, seed: int = 0) -> None:
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        super().__init__(seed)
        self.beta = beta
        self.targets: torch.Tensor | None = None  # [T, T]

    def weights(self, K: torch.Tensor) -> torch.Tensor:
        K = as_gram(K)
        T = K.shape[0]
        if self.targets is None:
            self.targets = torch.zeros(T, T, dtype=torch.float64)
        if self.targets.shape != (T, T):
            raise ValueError(f"GradVac state is for {self.targets.shape[0]} tasks, got {T}")
        orders = random_orders(T, self.generator)  # [T, T]
        C, self.targets = gradvac_coefficients(K, self.targets, orders, self.beta)
        return C.sum(0)

    def state_dict(self) -> dict[str, Any]:
        targets = None if self.targets is None else self.targets.clone()
        return super().state_dict() | {"targets": targets, "beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.beta = state["beta"]
        self.targets = None if state["targets"] is None else state["targets"].clone()
