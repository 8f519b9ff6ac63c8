"""Assemble a run from a config: data, model, sampler, engine, hooks; then call the loop.

This is the one place that knows every layer; `mtkit train`, `python launchers/train.py` and the
deepspeed/torchrun launchers all come through `run()`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from mtkit import checkpoint, config as config_mod, loop
from mtkit.config import Config
from mtkit.data.dataset import load_tasks
from mtkit.data.sampler import TaskBatchSampler
from mtkit.data.schedules import make_schedule
from mtkit.distributed import Dist, init_distributed
from mtkit.engine import make_engine
from mtkit.evaluate import evaluate
from mtkit.export import export_encoder
from mtkit.model import build_model
from mtkit.model.encoder import load_tokenizer

log = logging.getLogger("mtkit")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def engine_name(cfg: Config, dist: Dist) -> str:
    """`train.engine: auto` picks DeepSpeed for multi-rank launches (deepspeed, torchrun) or when a
    DeepSpeed JSON is configured, else the plain torch engine."""
    name = cfg.train.engine
    if name == "auto":
        name = "deepspeed" if cfg.deepspeed.config or dist.world_size > 1 else "torch"
    if name == "torch" and dist.world_size > 1:
        raise ValueError("train.engine = torch runs one process; use the deepspeed engine for "
                         f"{dist.world_size} ranks")
    return name


def make_sampler(cfg: Config, tasks: dict, dist: Dist) -> TaskBatchSampler:
    train_tasks = {n: t for n, t in tasks.items() if "train" in t.splits}
    lengths = {n: t.splits["train"].lengths() for n, t in train_tasks.items()}
    batch = {n: t.cfg.batch_size or cfg.train.batch_size for n, t in train_tasks.items()}
    schedule, steps_per_epoch = cfg.data.schedule, cfg.data.steps_per_epoch
    if cfg.train.strategy != "none":
        # Joint steps take T consecutive batches: round robin with equal counts makes them one per task.
        # An epoch is one pass over the largest task (smaller tasks cycle).
        schedule = "round_robin"
        passes = max(len(v) // (batch[n] * dist.world_size) for n, v in lengths.items())
        steps_per_epoch = len(lengths) * (steps_per_epoch // len(lengths) if steps_per_epoch else passes)
    return TaskBatchSampler(lengths, batch, make_schedule(schedule, cfg.data.temperature),
                            seed=cfg.train.seed, world_size=dist.world_size, rank=dist.rank,
                            bucket=cfg.data.bucket, steps_per_epoch=steps_per_epoch)


def build(cfg: Config, dist: Dist):
    """Tokenizer, task data and model, the same on every rank (model init seeded by train.seed)."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    tasks = load_tasks(cfg, tokenizer)
    model = build_model(cfg)
    model.pad_id = tokenizer.pad_token_id
    return tokenizer, tasks, model


def run(cfg: Config, out: str | Path, resume: str | None = None) -> dict:
    out = Path(out)
    dist = init_distributed(cfg.train.device, cfg.train.collective_timeout_s, cfg.train.barrier_timeout_s)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config_mod.to_dict(cfg), indent=2))
    started = time.time()
    tokenizer, tasks, model = build(cfg, dist)
    sampler = make_sampler(cfg, tasks, dist)
    steps = loop.total_steps(cfg, sampler)
    name = engine_name(cfg, dist)
    engine = make_engine(name, model, cfg, steps, dist)
    seed_everything(cfg.train.seed + dist.rank)  # dropout streams differ per rank, as with W devices

    resume_path = None
    if resume:
        resume_path = checkpoint.latest(out / "checkpoints") if resume == "auto" else Path(resume)
        if resume == "auto" and resume_path is None:
            log.info("resume auto: no checkpoint under %s, starting fresh", out / "checkpoints")

    writer = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tb"))
    hooks = _diagnostics_hooks(cfg, model, tasks, dist, writer, out)
    joint = _joint_step(cfg, engine.module)
    result = loop.train(cfg, out, model, tasks, sampler, engine, dist, hooks, writer, resume_path, joint)

    # Replicas must agree bit for bit after training; a digest per rank makes that checkable.
    digests = dist.all_gather_object(weights_digest(model))
    want_test = "test" in cfg.train.predict and any("test" in t.splits for t in tasks.values())
    exported = None
    if want_test or cfg.train.export_encoder:
        dist.barrier()  # rank 0 wrote best/model.pt
        model.load_state_dict(torch.load(out / "best" / "model.pt", map_location=dist.device))
    if want_test:
        evaluate(model, tasks, "test", cfg.train.eval_batch_size, dist.device, gather=dist,
                 pred_dir=out / "predictions" if dist.is_main else None)
    if cfg.train.export_encoder:
        exported = str(out / "encoder")
        if dist.is_main:
            export_encoder(model, tokenizer, cfg, out / "encoder")
    results = {
        "dev": result["best"]["dev"],
        "best_step": result["best"]["step"],
        "steps": result["steps"],
        "wall_time_s": time.time() - started,
        "train_time_s": result["wall_time_s"],
        "eval_time_s": result["eval_time_s"],
        "train_samples_per_s": result.get("samples_per_s"),
        "nonfinite_skipped": result["nonfinite_skipped"],
        "engine": name,
        "zero_stage": getattr(engine, "zero_stage", None),
        "world_size": dist.world_size,
        "rank_weight_digests": digests,
        "seed": cfg.train.seed,
        "git_commit": git_commit(),
        "exported_encoder": exported,
        "data_sources": {n: t.sources for n, t in tasks.items()},
        "sizes": {n: {s: len(d) for s, d in t.splits.items()} for n, t in tasks.items()},
        "config": config_mod.to_dict(cfg),
    }
    if dist.is_main:
        checkpoint.write_json(out / "results.json", results)
        if writer is not None:
            writer.close()
    dist.barrier()
    return results


def _diagnostics_hooks(cfg, model, tasks, dist, writer, out) -> list:
    if cfg.diagnostics.mode == "off":
        return []
    from diagnostics.hooks import make_hooks
    return make_hooks(cfg, model, tasks, dist, writer, out)


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _joint_step(cfg: Config, model):
    if cfg.train.strategy == "none":
        return None
    from diagnostics.gram import global_group_grams
    from mtkit.strategies import make_strategy
    from mtkit.strategies.joint import JointStep
    n = sum(p.numel() for _, p in model.shared_parameters())
    one_group = torch.zeros(n, dtype=torch.int32)

    def gram(G: torch.Tensor) -> torch.Tensor:                       # [T, P] -> [T, T]
        return global_group_grams(G, one_group.to(G.device), 1)[0]

    kwargs = {"seed": cfg.train.seed} if cfg.train.strategy in ("pcgrad", "gradvac") else {}
    return JointStep(make_strategy(cfg.train.strategy, **kwargs), model, gram)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
