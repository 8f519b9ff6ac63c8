"""The one training loop. It serves every engine and never imports deepspeed or diagnostics: it gets an
engine (backward/step/save/load) and hooks (read-only observers) from `mtkit.run`."""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mtkit import checkpoint
from mtkit.config import Config
from mtkit.data.dataset import batch_for, to_device
from mtkit.evaluate import evaluate


class Hook:
    """Observers called by the loop. They may read gradients and run side computations on
    `engine.module`, but must leave training bit-for-bit unchanged."""

    def on_backward(self, step: int, task: str, engine) -> None:
        pass

    def on_step(self, step: int, engine) -> None:
        pass

    def close(self) -> None:
        pass


def total_steps(cfg: Config, sampler) -> int:
    """Optimizer steps: train.max_steps, else epochs x sampler length / batches per step."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.floor(cfg.train.epochs * len(sampler) / cfg.micro_batches_per_step()))


def endless(sampler):
    """Batches across epochs; a sampler restored mid-epoch continues where it stopped."""
    epoch = sampler.state_dict()["epoch"]
    while True:
        sampler.set_epoch(epoch)
        yield from sampler
        epoch += 1


def train(cfg: Config, out: Path, model, tasks: dict, sampler, engine, dist, hooks=(), writer=None,
          resume: Path | None = None, joint=None) -> dict:
    """`joint` (a `JointStep`) makes every optimizer step take grad_accum batches of each task and weight
    their encoder gradients once, by the strategy; without it each micro-step trains one task."""
    steps = total_steps(cfg, sampler)
    eval_every = cfg.train.eval_every or max(1, len(sampler) // cfg.micro_batches_per_step())
    # A joint step weights the per-task gradients of the whole step, so it takes all its batches at once.
    rounds, per_round = (1, cfg.micro_batches_per_step()) if joint is not None else (cfg.train.grad_accum, 1)
    pad_id = model.pad_id
    step, best = 0, {"overall": -math.inf, "step": None, "dev": {}}
    if resume is not None:
        client = checkpoint.load(engine, resume, dist)
        step, best = client["step"], client["best"]
        sampler.load_state_dict(client["sampler"])
        if joint is not None:
            joint.load_state_dict(client["strategy"])
    batches = endless(sampler)
    probing = cfg.train.mode == "linear_probe" or (cfg.train.mode == "lp_ft" and step < cfg.train.lp_steps)
    model.freeze_encoder(probing)
    model.train()

    meter = _Meter(list(tasks), dist.device)
    t_start, total_samples, eval_time = time.perf_counter(), 0, 0.0
    bar = tqdm(total=steps, initial=step, disable=not dist.is_main, desc="train", dynamic_ncols=True)
    trace = _open_trace(out, dist) if cfg.train.trace else None
    while step < steps:
        if cfg.train.mode == "lp_ft" and step == cfg.train.lp_steps:
            model.freeze_encoder(False)
        for _ in range(rounds):
            group = [next(batches) for _ in range(per_round)]
            if trace is not None:
                for task, indices in group:
                    trace.write(json.dumps({"step": step, "task": task, "indices": list(indices)}) + "\n")
            group = [(task, to_device(batch_for(tasks[task], "train", indices, pad_id), dist.device))
                     for task, indices in group]
            passes = joint.passes(group) if joint is not None else [(task, batch, None) for task, batch in group]
            for task, batch, weight in passes:
                with engine.autocast():
                    loss = engine(task, batch, weight)
                engine.backward(loss)
                for h in hooks:
                    h.on_backward(step, task, engine)
                engine.step()
                n = batch["input_ids"].shape[0] // batch["n_texts"] * dist.world_size
                meter.add(task, loss, n)
                total_samples += n
        step += 1
        bar.update(1)
        for h in hooks:
            h.on_step(step, engine)

        if step % cfg.train.log_every == 0 or step == steps:
            meter.log(step, writer, bar, engine.lrs())

        if step % eval_every == 0 or step == steps:
            t_eval = time.perf_counter()
            best = _evaluate_and_keep_best(cfg, out, model, tasks, dist, writer, step, best)
            meter.restart_clock()  # evaluation time is not training throughput
            eval_time += time.perf_counter() - t_eval
            if cfg.train.save_checkpoints:
                client = {"step": step, "best": best, "sampler": sampler.state_dict()}
                if joint is not None:
                    client["strategy"] = joint.state_dict()
                checkpoint.save(engine, out / "checkpoints", step, client, dist)
    bar.close()
    if trace is not None:
        trace.close()
    for h in hooks:
        h.close()
    wall = time.perf_counter() - t_start
    return {"best": best, "steps": step, "wall_time_s": wall, "eval_time_s": eval_time,
            "samples_per_s": total_samples / max(1e-9, wall - eval_time)}


class _Meter:
    """Per-task mean loss and throughput over a log window. Losses stay on the device until logged:
    `.item()` is a sync, so it happens once per window."""

    def __init__(self, tasks: list[str], device):
        self.tasks, self.device = tasks, device
        self.reset()

    def reset(self) -> None:
        self.loss = {t: torch.zeros((), device=self.device) for t in self.tasks}
        self.count = dict.fromkeys(self.tasks, 0)
        self.samples = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.start = time.perf_counter()

    def add(self, task: str, loss: torch.Tensor, samples: int) -> None:
        self.loss[task] += loss.detach().float()
        self.count[task] += 1
        self.samples += samples

    def log(self, step: int, writer, bar, lrs: dict[str, float]) -> None:
        means = {t: (self.loss[t] / self.count[t]).item() for t in self.tasks if self.count[t]}
        if writer is not None:
            for t, v in means.items():
                writer.add_scalar(f"train/loss/{t}", v, step)
            for name, lr in lrs.items():
                writer.add_scalar(f"lr/{name}", lr, step)
            writer.add_scalar("throughput/samples_per_s", self.samples / (time.perf_counter() - self.start), step)
        bar.set_postfix({t: f"{v:.3f}" for t, v in means.items()})
        self.reset()


def select_score(select_metric: str, metrics: dict, step: int) -> float:
    """The dev number that picks the best checkpoint; without labelled dev data the latest step wins."""
    if select_metric == "overall":
        return metrics.get("overall", -step)
    task, _, metric = select_metric.partition(".")
    if task not in metrics or metric not in metrics[task]:
        raise KeyError(f"train.select_metric {select_metric!r} not among the dev metrics {metrics}")
    return metrics[task][metric]


def _evaluate_and_keep_best(cfg, out, model, tasks, dist, writer, step, best) -> dict:
    staging = out / "predictions.tmp"
    metrics = evaluate(model, tasks, "dev", cfg.train.eval_batch_size, dist.device, gather=dist,
                       pred_dir=staging if dist.is_main and "dev" in cfg.train.predict else None)
    if writer is not None:
        for task, m in metrics.items():
            if isinstance(m, dict):
                for k, v in m.items():
                    writer.add_scalar(f"dev/{task}/{k}", v, step)
        if "overall" in metrics:
            writer.add_scalar("dev/overall", metrics["overall"], step)
    score = select_score(cfg.train.select_metric, metrics, step)
    if score > best["overall"]:
        best = {"overall": score, "step": step, "dev": metrics}
        if dist.is_main:
            (out / "best").mkdir(parents=True, exist_ok=True)
            checkpoint.save_file(model.state_dict(), out / "best" / "model.pt")
            if staging.exists():
                shutil.rmtree(out / "predictions", ignore_errors=True)
                staging.replace(out / "predictions")
    if dist.is_main and staging.exists():
        shutil.rmtree(staging)
    dist.barrier()
    return best


def _open_trace(out: Path, dist):
    (out / "trace").mkdir(parents=True, exist_ok=True)
    return open(out / "trace" / f"rank{dist.rank}.jsonl", "a")
