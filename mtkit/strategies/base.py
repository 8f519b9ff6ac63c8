"""Gradient-combination strategies expressed as task weights computed from a Gram matrix.

A strategy maps the Gram ``K = G Gᵀ`` ([T, T]) of the per-task gradients
``G = [T, P]`` on the shared parameters to weights ``w`` ([T]) such that the
combined update is ``Σ_t w_t g_t``.  The trainer realises it with one
backward of the surrogate loss ``Σ_t w_t · L_t`` (``w`` detached), which is
exact under any engine because gradients are linear in the loss.  Every
rank must see the same ``K`` (e.g. from a distributed Gram) and run the same
sequence of calls, so that seeded strategies return the same weights.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch


class Strategy:
    """Base class: ``weights(K)`` returns the combination coefficients of the task gradients."""

    name: ClassVar[str]
    # False when the weights never depend on K: the joint step then skips the side passes that measure it.
    uses_gram: ClassVar[bool] = True

    def weights(self, K: torch.Tensor) -> torch.Tensor:
        """K: [T, T] Gram of the per-task gradients -> [T] float64 weights (on CPU)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """State needed to resume exactly (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class SeededStrategy(Strategy):
    """A strategy that draws random task orders from its own generator (not the global RNG)."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy to :data:`STRATEGIES` under ``cls.name``."""
    STRATEGIES[cls.name] = cls
    return cls


def make_strategy(name: str, **kwargs: Any) -> Strategy:
    """Instantiate the strategy registered as ``name`` with ``kwargs``."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; valid names: {', '.join(sorted(STRATEGIES))}"
        ) from None
    return cls(**kwargs)


def as_gram(K: torch.Tensor) -> torch.Tensor:
    """Validate a Gram matrix and return it as float64 on CPU.  [T, T] -> [T, T]."""
    if K.dim() != 2 or K.shape[0] != K.shape[1] or K.shape[0] == 0:
        raise ValueError(f"expected a non-empty square Gram matrix, got shape {tuple(K.shape)}")
    return K.detach().to(device="cpu", dtype=torch.float64)


def random_orders(n_tasks: int, generator: torch.Generator) -> torch.Tensor:
    """One random visiting order per task.  -> [T, T] long; row i is a permutation of range(T)."""
    return torch.stack([torch.randperm(n_tasks, generator=generator) for _ in range(n_tasks)])
