"""The engine seam: everything the training loop needs from an optimizer/back-end."""
from __future__ import annotations

import math
import re
import warnings
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import torch

from mtkit.config import Config


class Engine:
    """backward/step/save/load over a module whose parameters come in named groups.

    `step()` is called once per micro-batch; the engine applies the optimizer every
    `cfg.micro_batches_per_step()` micro-batches and returns True when it did. `step(skip=True)` at that
    boundary drops the accumulated gradients instead: weights and optimizer state stay as they were,
    and the learning-rate schedule advances as if the step had been taken, so it stays a function of
    the loop's step count.
    """

    module: torch.nn.Module
    device: torch.device

    def __call__(self, task: str, batch: dict, weight: float | None = None) -> torch.Tensor:
        """The task's loss through the engine's forward; `weight` scales only its encoder gradient."""
        raise NotImplementedError

    def autocast(self) -> AbstractContextManager:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def at_boundary(self) -> bool:
        """Whether the next `step()` applies the optimizer."""
        raise NotImplementedError

    def step(self, skip: bool = False) -> bool:
        raise NotImplementedError

    def lrs(self) -> dict[str, float]:
        raise NotImplementedError

    def save(self, path: Path) -> None:
        """Write model, optimizer, scheduler and scaler state under the folder `path` (collective)."""
        raise NotImplementedError

    def load(self, path: Path) -> None:
        raise NotImplementedError

    def shared_grads(self) -> list[torch.Tensor | None]:
        """The accumulated gradient of each of `module.shared_parameters()`, None where it has none; read
        only, no copies where the engine keeps whole gradients (collective)."""
        raise NotImplementedError

    def shared_grad(self) -> torch.Tensor:
        """The accumulated gradient of `module.shared_parameters()`, flattened [P] (collective)."""
        return torch.cat([(g if g is not None else torch.zeros_like(p)).detach().float().flatten()
                          for g, (_, p) in zip(self.shared_grads(), self.module.shared_parameters())])


class GroupMaskedAdamW(torch.optim.AdamW):
    """AdamW that steps only the param groups marked active for this step.

    Engines that flatten parameters (DeepSpeed ZeRO, its bf16 optimizer) hand the inner optimizer zero
    gradients for heads that had no loss this step; plain AdamW would still move them through their
    moments and weight decay. The engine marks which groups saw a loss; the rest are left untouched,
    weights and state alike. Activity must be identical on every rank (it is: all ranks train the same
    task at every step), so ZeRO partitions stay consistent.
    """

    def step(self, closure=None):
        groups = self.param_groups
        self.param_groups = [g for g in groups if g.get("active", True)]
        try:
            return super().step(closure)
        finally:
            self.param_groups = groups


def active_groups(model, tasks_seen: set[str]) -> set[str]:
    """Names of the param groups that received a loss from the tasks trained since the last step."""
    names = {f"head.{t}" for t in tasks_seen}
    reach_encoder = [t for t in tasks_seen if not model.tasks[t].leave_out]
    if not model.encoder_frozen and reach_encoder:
        names |= {"encoder", "encoder.no_decay"}
        for t in reach_encoder:  # a task-specific encoder top moves only on its own tasks' steps
            if t in model.top_of:
                names |= {f"top.{model.top_of[t]}", f"top.{model.top_of[t]}.no_decay"}
    return names


def lr_lambdas(cfg: Config, groups: list[dict], total_steps: int) -> list[Callable[[int], float]]:
    """One multiplier per param group: warmup then linear/cosine/constant.

    Under lp_ft the encoder groups (and task-specific tops) stay at 0 for the probing steps, then warm up from there, so the
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
    return [schedule(lp if g["name"].startswith(("encoder", "top.")) else 0) for g in groups]


def advance_schedule(scheduler) -> None:
    """Step the lr schedule for an optimizer step that was skipped (a non-finite gradient). PyTorch warns when
    a schedule steps before its optimizer ever has, which a skipped first step does; the warning concerns
    schedules stepped once before training, and ours is a function of the step count."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"))
        scheduler.step()
