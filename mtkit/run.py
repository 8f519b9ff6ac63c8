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
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mtkit import checkpoint, config as config_mod, loop, report
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
    train_tasks = {n: t for n, t in tasks.items() if "train" in t.splits and not t.cfg.eval_only}
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


def run(cfg: Config, out: str | Path, resume: str | None = None, overwrite: bool = False,
        allow_config_change: bool = False) -> dict:
    """Train into the run folder `out`. A folder that already holds a run is refused unless `resume`
    ("auto" or a checkpoint folder) continues it or `overwrite` clears it first."""
    out = Path(out)
    # DeepSpeed needs a process group even for one process; engine_name on one rank says if it is chosen.
    dist = init_distributed(cfg.train.device, cfg.train.collective_timeout_s, cfg.train.barrier_timeout_s,
                            group=engine_name(cfg, Dist()) == "deepspeed")
    start = open_run_folder(out, cfg, resume, overwrite, allow_config_change, dist)
    started = time.time()
    tokenizer, tasks, model = build(cfg, dist)
    sampler = make_sampler(cfg, tasks, dist)
    steps = loop.total_steps(cfg, sampler)
    name = engine_name(cfg, dist)
    engine = make_engine(name, model, cfg, steps, dist)
    seed_everything(cfg.train.seed + dist.rank)  # dropout streams differ per rank, as with W devices

    # Rank 0 reports; the reporter is closed however the run ends, so the W&B and MLflow runs record it.
    writer = None
    if dist.is_main:
        writer = report.Reporter.open(cfg.train.report_to, out, cfg.name, config_mod.to_dict(cfg),
                                      start.step if start.checkpoint else None)
    try:
        trained = {n: t for n, t in tasks.items() if not t.cfg.eval_only}  # eval-only: no gradients to observe
        hooks = _diagnostics_hooks(cfg, model, trained, dist, writer, out)
        joint = _joint_step(cfg, engine)
        result = loop.train(cfg, out, model, tasks, sampler, engine, dist, hooks, writer, start.checkpoint,
                            joint)

        # Replicas must agree bit for bit after training; a digest per rank makes that checkable.
        digests = dist.all_gather_object(weights_digest(model))
        want_test = "test" in cfg.train.predict and any("test" in t.splits for t in tasks.values())
        exported = None
        if want_test or cfg.train.export_encoder:
            dist.barrier()  # rank 0 wrote best/model.pt
            model.load_state_dict(checkpoint.model_weights(out / "best" / "model.pt"))
        if want_test:
            evaluate(model, tasks, "test", cfg.train.eval_batch_size, dist.device, gather=dist,
                     pred_dir=out / "predictions" if dist.is_main else None)
        if cfg.train.export_encoder:
            exported = str(out / "encoder")
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
            # With settings changed on resume (--allow-config-change): the config the run started with, and
            # each change with the checkpoint step it was resumed from.
            "config": start.original if start.changes else config_mod.to_dict(cfg),
            "config_changes": start.changes,
        }
        if dist.is_main:
            checkpoint.write_json(out / "results.json", results)
            if exported:  # after results.json: the model card reports its dev metrics
                export_encoder(model, tokenizer, cfg, out / "encoder", run_dir=out)
            if writer is not None:
                writer.close()
    except BaseException as e:
        if writer is not None:
            writer.close(e)
        raise
    dist.barrier()
    return results


# ---------------------------------------------------------------- the run folder

# What `run` writes into a run folder; `--overwrite` removes exactly these, nothing else found there.
RUN_OUTPUTS = ("config.json", "config_changes.json", "results.json", "best", "checkpoints", *report.OUTPUTS,
               "diagnostics.jsonl", "diagnostics_cos.png", "predictions", "predictions.tmp", "trace", "encoder")

# Settings a resume may change without breaking exactness: they only affect logging, evaluation batching,
# outputs and observers (diagnostics leave training bit-identical). Any other change needs
# --allow-config-change.
HARMLESS = ("name", "data.cache_dir", "train.eval_batch_size", "train.log_every", "train.predict",
            "train.report_to", "train.num_threads", "train.trace", "train.export_encoder", "train.save_checkpoints",
            "diagnostics.")


@dataclass
class Start:
    """How a run begins, decided from the run folder before anything is written to it."""
    checkpoint: Path | None = None     # resume from here
    step: int = 0                      # its step
    clear: bool = False                # remove an old run's outputs first
    drop: list[Path] = field(default_factory=list)  # checkpoints past the resumed one (another timeline)
    config: dict = field(default_factory=dict)      # the config this run trains with
    original: dict = field(default_factory=dict)    # the config the run started with
    changes: list[dict] = field(default_factory=list)  # settings changed on resume, allowed explicitly


def run_outputs(out: Path) -> list[str]:
    return [name for name in RUN_OUTPUTS if (out / name).exists()]


def open_run_folder(out: Path, cfg: Config, resume: str | None, overwrite: bool, allow_config_change: bool,
                    dist: Dist) -> Start:
    """Check the folder and prepare it: rank 0 decides and changes the folder, the other ranks wait and
    share its decision (or its error)."""
    plan: Start | checkpoint.RunFolderError | None = None
    if dist.is_main:
        try:
            plan = plan_start(out, cfg, resume, overwrite, allow_config_change, dist.world_size)
        except checkpoint.RunFolderError as e:
            plan = e
    plan = dist.all_gather_object(plan)[0]
    if isinstance(plan, checkpoint.RunFolderError):
        raise plan
    if dist.is_main:
        _prepare(out, plan)
    dist.barrier()
    return plan


def plan_start(out: Path, cfg: Config, resume: str | None, overwrite: bool, allow_config_change: bool,
               world_size: int = 1) -> Start:
    new = config_mod.to_dict(cfg)
    held = run_outputs(out)
    if resume and overwrite:
        raise checkpoint.RunFolderError("--resume and --overwrite exclude each other: continue the run in "
                                        f"{out}, or delete it and start over")
    if not resume:
        if held and not overwrite:
            raise checkpoint.RunFolderError(
                f"{out} already holds a run ({', '.join(held)}); use --resume auto to continue it, "
                "--overwrite to delete it and start over, or another --out")
        return Start(clear=bool(held), config=new, original=new)
    if resume == "auto":
        path = checkpoint.latest(out / "checkpoints", contents=True)
        if path is None:
            if (out / "results.json").exists():
                raise checkpoint.RunFolderError(
                    f"{out} holds a finished run (results.json) but no complete checkpoint under "
                    f"{out / 'checkpoints'} to continue from; use --overwrite to start over")
            if held:
                log.warning("resume auto: no complete checkpoint under %s; starting fresh, the partial "
                            "run's outputs (%s) are removed", out / "checkpoints", ", ".join(held))
            else:
                log.info("resume auto: no checkpoint under %s, starting fresh", out / "checkpoints")
            return Start(clear=bool(held), config=new, original=new)
    else:
        path = Path(resume)
        if not path.exists():
            raise checkpoint.RunFolderError(f"--resume {resume}: no such checkpoint folder (use --resume auto "
                                            "for the latest checkpoint of --out)")
        why = checkpoint.problem(path, contents=True)
        if why:
            raise checkpoint.RunFolderError(f"--resume {resume}: not a complete checkpoint: {why}")
    ranks = checkpoint.ranks_of(path)
    if ranks != world_size:
        # Each rank resumes its own RNG streams and, under ZeRO, its own optimizer shard: another number of
        # ranks could not continue the run, exactly or at all.
        how = f"deepspeed --num_gpus {ranks} launchers/train.py ..." if ranks > 1 else "one process"
        raise checkpoint.RunFolderError(
            f"{path} was written by {ranks} rank(s) and this run has {world_size}: resume it with {ranks} "
            f"rank(s) ({how}), or start a new run (--overwrite or another --out)")
    step = checkpoint.step_of(path)
    stored, history = _stored_config(path, out)
    changes = config_changes(stored, new) if stored is not None else {}
    if changes and not allow_config_change:
        listing = "\n".join(f"  {key}: {old!r} -> {new_!r}" for key, (old, new_) in changes.items())
        raise checkpoint.RunFolderError(
            f"resuming {path} with settings that differ from the ones it was trained with, so the run "
            f"would not continue exactly:\n{listing}\nresume with the original settings, start a new run "
            "(--overwrite or another --out), or pass --allow-config-change to continue anyway (the changes "
            "are recorded in results.json)")
    past = [c for c in history.get("changes", []) if c["resumed_at_step"] <= step]
    past += [{"key": k, "old": o, "new": n, "resumed_at_step": step} for k, (o, n) in changes.items()]
    if changes:
        log.warning("resuming %s with changed settings (allowed): %s", path, ", ".join(changes))
    log.info("resuming from %s (step %d)", path, step)
    root = out / "checkpoints"
    drop = [root / f"step_{s}" for s in checkpoint.steps(root) if s > step]
    return Start(checkpoint=path, step=step, drop=drop, config=new,
                 original=history.get("original") or stored or new, changes=past)


def _stored_config(path: Path, out: Path) -> tuple[dict | None, dict]:
    """The config a checkpoint was trained with (its copy, else the run folder's) and its change history."""
    for folder in (path, out):
        if (folder / "config.json").exists():
            history = folder / "config_changes.json"
            return (json.loads((folder / "config.json").read_text()),
                    json.loads(history.read_text()) if history.exists() else {})
    log.warning("no config.json in %s or %s: cannot check that the resume keeps the run's settings", path, out)
    return None, {}


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted key: (old, new)} for the settings that differ and are not harmless. Tasks are keyed by
    name, so reordering them is no change (a task added or removed is)."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k, "<unset>"), b.get(k, "<unset>")) for k in sorted(a.keys() | b.keys())
            if a.get(k, "<unset>") != b.get(k, "<unset>")
            and not any(k == h or (h.endswith(".") and k.startswith(h)) for h in HARMLESS)}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if prefix == "" and k == "tasks":
            v = {t["name"]: t for t in v}
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _prepare(out: Path, start: Start) -> None:
    if start.clear:
        for name in run_outputs(out):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in start.drop:
        log.warning("removing checkpoint %s: it is past the resumed step %d (or damaged)", path, start.step)
        shutil.rmtree(path)
    out.mkdir(parents=True, exist_ok=True)
    if start.checkpoint is not None:
        # The resumed run rewrites everything after its checkpoint: drop what the old one logged there.
        (out / "results.json").unlink(missing_ok=True)
        if start.checkpoint.parent == out / "checkpoints":
            checkpoint.point_latest(out / "checkpoints", start.checkpoint)
        dropped = sum(checkpoint.truncate_jsonl(out / name, lambda r: r["step"] <= start.step)
                      for name in ("diagnostics.jsonl", report.JSONL_FILE))
        for trace in sorted((out / "trace").glob("rank*.jsonl")):  # a trace line's step is 0-based
            dropped += checkpoint.truncate_jsonl(trace, lambda r: r["step"] < start.step)
        if dropped:
            log.info("dropped %d diagnostics/scalars/trace record(s) past step %d", dropped, start.step)
    checkpoint.write_json(out / "config.json", start.config)
    if start.changes:
        checkpoint.write_json(out / "config_changes.json", {"original": start.original, "changes": start.changes})
    else:
        (out / "config_changes.json").unlink(missing_ok=True)


def read_run_config(run_dir: Path, overrides: dict | None = None) -> Config:
    """A finished or running run's config, for eval/export; a folder that is not a run says so."""
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise checkpoint.RunFolderError(f"{run_dir}: no such run folder")
    if not path.exists():
        raise checkpoint.RunFolderError(
            f"{run_dir} is not a run folder: it has no config.json. A run folder, made by "
            "`mtkit train --out DIR`, holds config.json, best/model.pt, results.json and checkpoints/")
    try:
        stored = json.loads(path.read_text())
    except ValueError as e:
        raise checkpoint.RunFolderError(f"{path}: not valid JSON ({e})") from None
    # Reporting is over for this run: evaluating or exporting it needs none of its backends installed.
    return config_mod.load(None, {**stored, **(overrides or {})}, report=False)


def best_weights(run_dir: Path) -> dict:
    """best/model.pt of a run; when it is missing or damaged the message points at a checkpoint."""
    path = Path(run_dir) / "best" / "model.pt"
    kept = checkpoint.latest(Path(run_dir) / "checkpoints")
    fallback = (f"the latest complete checkpoint can stand in: --checkpoint {kept}" if kept else
                "and the run has no complete checkpoint to use instead")
    if not path.exists():
        raise checkpoint.RunFolderError(f"{path} is missing (it is written at the first evaluation); {fallback}")
    try:
        return checkpoint.model_weights(path)
    except checkpoint.RunFolderError as e:
        raise checkpoint.RunFolderError(f"{e}; {fallback}") from None


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


def _joint_step(cfg: Config, engine):
    if cfg.train.strategy == "none":
        return None
    import dataclasses

    from diagnostics.gram import global_group_grams
    from mtkit.strategies import make_strategy
    from mtkit.strategies.joint import JointStep
    model = engine.module
    n = sum(p.numel() for _, p in model.shared_parameters())
    one_group = torch.zeros(n, dtype=torch.int32)

    def gram(G: torch.Tensor) -> torch.Tensor:                       # [T, P] -> [T, T]
        return global_group_grams(G, one_group.to(G.device), 1)[0]

    name = cfg.train.strategy
    kwargs = {"seed": cfg.train.seed} if name in ("pcgrad", "gradvac") else {}
    if name in ("gradvac", "cagrad"):
        kwargs |= dataclasses.asdict(getattr(cfg.train, name))  # train.gradvac / train.cagrad
    return JointStep(make_strategy(name, **kwargs), model, gram, engine.autocast)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
