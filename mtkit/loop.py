"""The one training loop. It serves every engine and never imports deepspeed or diagnostics: it gets an
engine (backward/step/save/load) and hooks (read-only observers) from `mtkit.run`."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from mtkit import checkpoint, progress
from mtkit.config import Config
from mtkit.data.dataset import batch_for, to_device
from mtkit.distributed import StopRequest
from mtkit.evaluate import evaluate

log = logging.getLogger("mtkit")


class TrainingStopped(Exception):
    """Training ended early with a checkpoint: `exit_code` 0 when asked to stop (a signal, the launcher's
    death), 2 on a non-finite loss or gradient under `train.nonfinite: stop`."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


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
    their encoder gradients once, by the strategy; without it each micro-step trains one task.

    SIGTERM, SIGINT or the launcher's death end training after the current optimizer step with a
    checkpoint (`TrainingStopped`, exit code 0); so does a non-finite loss or gradient under
    `train.nonfinite: stop` (exit code 2)."""
    with StopRequest(dist.launcher) as stop:
        return _train(cfg, out, model, tasks, sampler, engine, dist, hooks, writer, resume, joint, stop)


def _train(cfg, out, model, tasks, sampler, engine, dist, hooks, writer, resume, joint, stop) -> dict:
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
    # fp16 gradients overflow routinely; the loss scaler skips those steps itself, so only losses count.
    check = _StepCheck(model, dist, stop, grads=cfg.train.precision != "fp16")
    skipped = 0
    t_start, total_samples, eval_time = time.perf_counter(), 0, 0.0
    bar = progress.bar(desc="train", total=steps, initial=step)  # rank 0 only, silenced by --quiet
    trace = _open_trace(out, dist) if cfg.train.trace else None
    # Closed however the loop ends (a stop, an error): an open bar would be redrawn at interpreter exit, after
    # whatever the process printed since, and the trace and diagnostics files would stay unflushed.
    try:
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
                    with check.watch(task, loss):
                        engine.backward(loss)
                    for h in hooks:
                        h.on_backward(step, task, engine)
                    engine.step(skip=engine.at_boundary() and check.step_failed())
                    n = batch["input_ids"].shape[0] // batch["n_texts"] * dist.world_size
                    meter.add(task, loss, n)
                    total_samples += n
            step += 1
            bar.update(1)
            for h in hooks:
                h.on_step(step, engine)
            if check.bad_task is not None:
                # The step was not applied: weights and optimizer state are still those after step - 1.
                skipped += 1
                if writer is not None:
                    writer.add_scalar("train/nonfinite_skipped", skipped, step)
                where = f"non-finite loss or gradient in task {check.bad_task!r} at step {step}"
                if cfg.train.nonfinite == "stop":
                    saved = _save(cfg, out, engine, sampler, joint, dist, step, best, force=True)
                    raise TrainingStopped(f"{where}; the step was not applied. The weights in {saved} are those "
                                          f"after step {step - 1}. Check that task's data and the learning rate; "
                                          "--resume auto continues after this batch, --train.nonfinite=skip skips "
                                          "such steps.", exit_code=2)
                if dist.is_main:
                    log.warning("%s: optimizer step skipped (%d so far)", where, skipped)

            if step % cfg.train.log_every == 0 or step == steps:
                meter.log(step, writer, bar, engine.lrs())

            saved = None
            if step % eval_every == 0 or step == steps:
                t_eval = time.perf_counter()
                best = _evaluate_and_keep_best(cfg, out, model, tasks, dist, writer, step, best)
                meter.restart_clock()  # evaluation time is not training throughput
                eval_time += time.perf_counter() - t_eval
                saved = _save(cfg, out, engine, sampler, joint, dist, step, best)
            if check.stop_reason is not None and step < steps:
                saved = saved or _save(cfg, out, engine, sampler, joint, dist, step, best, force=True)
                raise TrainingStopped(f"stopped after step {step} of {steps} ({check.stop_reason}); checkpoint "
                                      f"{saved}. To continue, run the same command with --resume auto (same --out).",
                                      exit_code=0)
    finally:
        _close(bar, trace, hooks, writer)
    wall = time.perf_counter() - t_start
    return {"best": best, "steps": step, "wall_time_s": wall, "eval_time_s": eval_time,
            "samples_per_s": total_samples / max(1e-9, wall - eval_time), "nonfinite_skipped": skipped}


def _save(cfg, out, engine, sampler, joint, dist, step, best, force=False) -> Path | None:
    """A checkpoint of the loop's state after `step` (collective); `force` writes one even when
    `train.save_checkpoints` is off, for a run that stops early."""
    if not (cfg.train.save_checkpoints or force):
        return None
    client = {"step": step, "best": best, "sampler": sampler.state_dict()}
    if joint is not None:
        client["strategy"] = joint.state_dict()
    return checkpoint.save(engine, out / "checkpoints", step, client, dist)


def _close(bar, trace, hooks, writer) -> None:
    bar.close()
    if trace is not None:
        trace.close()
    for h in hooks:
        h.close()
    if writer is not None:
        writer.flush()  # a stopped run's last scalars must reach the disk


class _StepCheck:
    """Per optimizer step: did a micro-batch produce a non-finite loss or gradient, and did any rank
    ask to stop?

    Gradients are checked by hooks on the parameters as backward produces them, before an engine
    reduces or partitions them, so the same check serves every engine and ZeRO stage, and the first
    micro-batch whose loss or gradient is non-finite names the task. The flags stay on the device;
    `step_failed()` at the step boundary is the step's one host sync, an all-reduce (MAX) of the flags
    and of the stop request, so every rank skips, or stops, at the same step.
    """

    def __init__(self, model, dist, stop: StopRequest, grads: bool = True):
        self.dist, self.request = dist, stop
        self.device = dist.device
        self.watching = False
        self.grad_sum = torch.zeros((), device=self.device)
        self.flags: list[torch.Tensor] = []
        self.tasks: list[str] = []
        self.bad_task: str | None = None  # results of the last step_failed()
        self.stop_reason: str | None = None
        if grads:
            for p in model.parameters():
                if p.requires_grad:
                    p.register_hook(self._on_grad)

    def _on_grad(self, grad: torch.Tensor) -> None:
        # A sum is finite exactly when every term is (or when finite terms overflow, which is as bad), and
        # is one cheap reduction per parameter. Gradients computed outside `watch` (the probe, the joint
        # strategy's Gram) are not this step's update.
        if self.watching:
            self.grad_sum += grad.detach().sum(dtype=torch.float32)

    @contextlib.contextmanager
    def watch(self, task: str, loss: torch.Tensor):
        self.grad_sum.zero_()
        self.watching = True
        try:
            yield
        finally:
            self.watching = False
        self.tasks.append(task)
        self.flags.append(~torch.isfinite(loss.detach().float()).all() | ~torch.isfinite(self.grad_sum))

    def step_failed(self) -> bool:
        stop_here = torch.tensor([self.request.reason is not None], device=self.device)
        flags = self.dist.any(torch.cat([stop_here, torch.stack(self.flags)]).int()).tolist()
        bad = [t for t, f in zip(self.tasks, flags[1:]) if f]
        self.bad_task = bad[0] if bad else None
        self.stop_reason = (self.request.reason or "another rank was asked to stop") if flags[0] else None
        self.flags, self.tasks = [], []
        return self.bad_task is not None


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
