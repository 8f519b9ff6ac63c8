"""Joint steps: one optimizer step sees a batch of every task, combined by a gradient strategy.

Per-task gradients of the shared parameters are computed with `torch.autograd.grad` on the raw module
(never through a loss the engine hooked), their Gram is reduced across ranks, and the strategy turns it
into task weights w. The engine then trains on one surrogate loss per task whose encoder gradient is
w_t * g_t and whose head gradient is the head's own, unscaled (see `MultiTaskModel.forward`), so the
combined update is exact under any engine, ZeRO stage or world size.
"""
from __future__ import annotations

from typing import Callable

import torch

from mtkit.strategies.base import Strategy


class JointStep:
    def __init__(self, strategy: Strategy, model: torch.nn.Module,
                 gram_fn: Callable[[torch.Tensor], torch.Tensor]):
        """gram_fn: local per-task gradients [T, P] -> Gram [T, T] of the global (rank-mean) gradients."""
        self.strategy = strategy
        self.model = model
        self.params = [p for _, p in model.shared_parameters()]
        self.gram_fn = gram_fn

    def task_gradients(self, group: list[tuple[str, dict]]) -> torch.Tensor:
        rows = []
        for task, batch in group:
            loss = self.model(task, batch)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).float().flatten()
                                   for g, p in zip(grads, self.params)]))
        return torch.stack(rows)                                            # [T, P]

    def weights(self, group: list[tuple[str, dict]]) -> dict[str, float]:
        K = self.gram_fn(self.task_gradients(group))                        # [T, T]
        w = self.strategy.weights(K)                                        # [T]
        return {task: float(w[i]) for i, (task, _) in enumerate(group)}

    def state_dict(self) -> dict:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state)
