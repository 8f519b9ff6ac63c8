"""The engine seam: everything the training loop needs from an optimizer/back-end."""
from __future__ import annotations

import math
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import torch

from mtkit.config import Config


class Engine:
    """backward/step/save/load over a module whose parameters come in named groups.

    `step()` is called once per micro-batch; the engine applies the optimizer every
    `train.grad_accum` micro-batches and returns True when it did.
    """

    module: torch.nn.Module
    device: torch.device

    def __call__(self, task: str, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def autocast(self) -> AbstractContextManager:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> bool:
        raise NotImplementedError

    def lrs(self) -> dict[str, float]:
        raise NotImplementedError

    def save(self, path: Path) -> None:
        """Write model, optimizer, scheduler and scaler state under the folder `path` (collective)."""
        raise NotImplementedError

    def load(self, path: Path) -> None:
        raise NotImplementedError

    def shared_grad(self, names: list[str]) -> torch.Tensor | None:
        """The current accumulated gradient of the named shared parameters, flattened (collective)."""
        raise NotImplementedError


def lr_lambdas(cfg: Config, groups: list[dict], total_steps: int) -> list[Callable[[int], float]]:
    """One multiplier per param group: warmup then linear/cosine/constant.

    Under lp_ft the encoder groups stay at 0 for the probing steps, then warm up from there, so the
    fine-tuning phase gets a full schedule of its own.
    """
    def schedule(start: int) -> Callable[[int], float]:
        span = max(1, total_steps - start)
        warmup = int(cfg.optim.warmup_ratio * span)

        def f(step: int) -> float:
            s = step - start
            if s < 0:
                return 0.0
            if s < warmup:
                return (s + 1) / warmup
            progress = min(1.0, (s - warmup) / max(1, span - warmup))
            if cfg.optim.lr_schedule == "linear":
                return 1.0 - progress
            if cfg.optim.lr_schedule == "cosine":
                return 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0
        return f

    lp = cfg.train.lp_steps if cfg.train.mode == "lp_ft" else 0
    return [schedule(lp if g["name"].startswith("encoder") else 0) for g in groups]
