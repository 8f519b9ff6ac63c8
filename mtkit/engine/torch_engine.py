"""Plain PyTorch engine: CPU or one GPU, autocast bf16/fp16 (with a grad scaler), accumulation, clipping."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from mtkit.config import Config
from mtkit.engine.base import Engine, advance_schedule, lr_lambdas


class TorchEngine(Engine):
    def __init__(self, model: torch.nn.Module, cfg: Config, total_steps: int, dist):
        self.device = dist.device
        self.module = model.to(self.device)
        self.groups = model.param_groups(cfg)
        # AdamW skips parameters whose .grad is None: with zero_grad(set_to_none=True) a head that had no
        # loss this step keeps its weights *and* its moments, which is the per-head isolation we promise.
        self.optimizer = torch.optim.AdamW(self.groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambdas(cfg, self.groups,
                                                                                       total_steps))
        self.precision = cfg.train.precision
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.accum = cfg.micro_batches_per_step()
        self.max_grad_norm = cfg.optim.max_grad_norm
        self.micro = 0

    def __call__(self, task, batch, weight=None):
        return self.module(task, batch, weight)

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def backward(self, loss):
        self.scaler.scale(loss / self.accum).backward()

    def at_boundary(self) -> bool:
        return (self.micro + 1) % self.accum == 0

    def step(self, skip: bool = False) -> bool:
        self.micro += 1
        if self.micro % self.accum:
            return False
        if skip:
            # No scaler.update(): it needs the inf checks of an unscale_ or scaler.step in this step.
            self.optimizer.zero_grad(set_to_none=True)
            advance_schedule(self.scheduler)
            return False
        if self.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def lrs(self):
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

    def shared_grads(self):
        return [p.grad for _, p in self.module.shared_parameters()]

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "micro": self.micro}
        tmp = path / f"engine.pt.tmp{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path / "engine.pt")

    def load(self, path: Path) -> None:
        state = torch.load(path / "engine.pt", map_location=self.device, weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.micro = state["micro"]
