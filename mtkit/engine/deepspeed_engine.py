"""DeepSpeed engine (ZeRO 0/1/2, bf16/fp16, accumulation, clipping). The only module importing deepspeed.

DeepSpeed gets our client AdamW with the per-head param groups and our client LambdaLR, so per-group
learning rates survive (DeepSpeed's own WarmupLR would set one lr for every group). Values that the mtkit
config owns (micro batch, accumulation, global batch, clipping, bf16/fp16) are written into the DeepSpeed
JSON here; the JSON may leave them out or say "auto", and a different value is a ConfigError rather than
silently replaced. `deepspeed.zero_stage` overrides the JSON's stage.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from mtkit.config import Config, ConfigError, deepspeed_conflict, deepspeed_owned, read_deepspeed_json
from mtkit.engine.base import Engine, GroupMaskedAdamW, active_groups, advance_schedule, lr_lambdas

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder  # noqa: E402
from deepspeed.utils import safe_get_full_grad  # noqa: E402

DEFAULT_ZERO_STAGE = 1


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    ds: dict = read_deepspeed_json(cfg.deepspeed.config) if cfg.deepspeed.config else {}
    problem = deepspeed_conflict(cfg, ds, str(cfg.deepspeed.config), world_size)
    if problem:  # validation checked all but the world size
        raise ConfigError(problem)
    zero = dict(ds.get("zero_optimization", {}))
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    zero.setdefault("stage", DEFAULT_ZERO_STAGE)
    if zero["stage"] > 2:
        raise ValueError("ZeRO stage 3 is not supported: diagnostics and per-head isolation need whole "
                         "parameters on every rank")
    ds["zero_optimization"] = zero
    for key, (value, _, _) in deepspeed_owned(cfg, world_size).items():  # fills in "auto" and absent values
        block, _, name = key.rpartition(".")
        (ds.setdefault(block, {}) if block else ds)[name] = value
    ds.setdefault("steps_per_print", 10 ** 9)  # mtkit logs; keep DeepSpeed quiet
    # Our client optimizer is AdamW with per-group masking; ZeRO handles any torch optimizer.
    ds["zero_allow_untested_optimizer"] = True
    ds.pop("optimizer", None)   # the client optimizer and scheduler are ours
    ds.pop("scheduler", None)
    return ds


def skip_shared_memory_all_reduce() -> None:
    """Tell DeepSpeed not to build its CPU shared-memory all-reduce op.

    DeepSpeed compiles it (C++, tens of seconds, a compiler needed) on a CPU run's first launch and maps a
    ~70 MB /dev/shm workspace per rank, yet only its inference tensor parallelism calls it: training's
    collectives go through torch.distributed either way. The op table is a dict DeepSpeed keeps for the
    process, and an op marked incompatible there is not built."""
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


class DeepSpeedEngine(Engine):
    def __init__(self, model: torch.nn.Module, cfg: Config, total_steps: int, dist):
        self.device = dist.device
        groups = model.param_groups(cfg)
        self.optimizer = GroupMaskedAdamW(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambdas(cfg, groups, total_steps))
        self.config = deepspeed_config(cfg, dist.world_size)
        # Ranks load and tokenize their data at their own pace: wait for the slowest here, under the long
        # barrier timeout, rather than in DeepSpeed's first broadcast, which the collective timeout bounds.
        dist.barrier()
        skip_shared_memory_all_reduce()
        self.ds, _, _, self.scheduler = deepspeed.initialize(
            model=model.to(self.device), optimizer=self.optimizer, lr_scheduler=scheduler,
            config=self.config, dist_init_required=False)
        self.module = self.ds.module
        self.zero_stage = self.ds.zero_optimization_stage()
        self.precision = cfg.train.precision
        self._seen: set[str] = set()

    def __call__(self, task, batch, weight=None):
        self._seen.add(task)
        return self.ds(task, batch, weight)

    def autocast(self):
        # DeepSpeed's bf16/fp16 modes cast the module itself; no autocast on top.
        return contextlib.nullcontext()

    def backward(self, loss):
        self.ds.backward(loss)

    def at_boundary(self) -> bool:
        return self.ds.is_gradient_accumulation_boundary()

    def step(self, skip: bool = False) -> bool:
        boundary = self.ds.is_gradient_accumulation_boundary()
        if boundary:
            # DeepSpeed has no way to skip a step of a client optimizer. With every group inactive the
            # optimizer touches nothing, whichever of DeepSpeed's paths (ZeRO 0/1/2, bf16) calls it, and
            # DeepSpeed clears the gradients after the step as usual.
            active = set() if skip else active_groups(self.module, self._seen)
            for g in self.optimizer.param_groups:
                g["active"] = g["name"] in active
            self._seen = set()
        self.ds.step()
        if boundary and skip and not self.ds.was_step_applied():
            # DeepSpeed saw the non-finite gradient norm itself (ZeRO 1/2, its bf16 optimizer at stage 0) and
            # skipped the step, lr schedule included; advance the schedule as the torch engine does.
            advance_schedule(self.scheduler)
        return boundary and not skip

    def lrs(self):
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

    def shared_grads(self):
        # A collective per parameter under ZeRO: the same order on every rank.
        return [safe_get_full_grad(p) for _, p in self.module.shared_parameters()]

    def save(self, path: Path) -> None:
        self.ds.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)

    def load(self, path: Path) -> None:
        loaded, _ = self.ds.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                            load_lr_scheduler_states=True)
        if loaded is None:  # DeepSpeed only warns when the files are missing
            raise FileNotFoundError(f"no DeepSpeed checkpoint files in {path}")
