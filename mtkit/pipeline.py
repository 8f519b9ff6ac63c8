"""Multi-stage runs, e.g. supervised SimCSE on NLI triples, then multi-task training from that encoder.

Each stage runs in DIR/<stage> with its own checkpoints and results.json and exports its best encoder to
DIR/<stage>/encoder; a stage with `init_from` starts from that folder. Command-line overrides apply to
every stage (seeds, data root), or to one stage when prefixed with its name (`--multitask.train.seed=1`).
With `--resume auto`, finished stages are kept and the unfinished one continues from its latest
checkpoint; `--overwrite` starts every stage over; without either, a DIR that holds any stage's run is
refused. DIR/results.json reports every stage.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from mtkit import checkpoint, config as config_mod
from mtkit.config import Config, PipelineConfig, StageConfig


def stage_config(pipe_path: Path, stage: StageConfig, out: Path, overrides: dict, stages: list[str]) -> Config:
    shared = {k: v for k, v in overrides.items() if k.split(".", 1)[0] not in stages}
    own = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.split(".", 1)[0] == stage.name}
    merged = {**stage.overrides, **shared, **own, "train.export_encoder": True}
    if stage.init_from:
        merged.update({"model.name_or_path": str(out / stage.init_from / "encoder"),
                       "model.random_init": False, "model.arch": {}})
    return config_mod.load(Path(pipe_path).parent / stage.config, merged)


def run_pipeline(path: str | Path, out: str | Path, overrides: dict | None = None,
                 resume: str | None = None, overwrite: bool = False, allow_config_change: bool = False) -> dict:
    from mtkit.run import run, run_outputs
    pipe: PipelineConfig = config_mod.load_pipeline(path)
    out = Path(out)
    if resume not in (None, "auto"):
        raise checkpoint.RunFolderError(f"--resume {resume}: a pipeline continues with --resume auto (each "
                                        "stage from its latest checkpoint)")
    held = [str(out / s.name) for s in pipe.stages if run_outputs(out / s.name)]
    held += [str(out / "results.json")] if (out / "results.json").exists() else []
    if held and not (resume or overwrite):
        raise checkpoint.RunFolderError(f"{out} already holds a pipeline run ({', '.join(held)}); use "
                                        "--resume auto to continue it, --overwrite to start it over, or "
                                        "another --out")
    if overwrite and int(os.environ.get("RANK", "0")) == 0:  # each stage clears its own folder
        (out / "results.json").unlink(missing_ok=True)
    results: dict = {}
    for stage in pipe.stages:
        stage_out = out / stage.name
        done = stage_out / "results.json"
        if resume and done.exists():
            results[stage.name] = json.loads(done.read_text())
            continue
        cfg = stage_config(Path(path), stage, out, overrides or {}, [s.name for s in pipe.stages])
        results[stage.name] = run(cfg, stage_out, resume, overwrite, allow_config_change)
    last = results[pipe.stages[-1].name]
    summary = {
        "pipeline": pipe.name,
        "dev": last["dev"],
        "stages": {name: {"dev": r["dev"], "best_step": r["best_step"], "steps": r["steps"],
                          "wall_time_s": r["wall_time_s"], "exported_encoder": r["exported_encoder"],
                          "select_metric": r["config"]["train"]["select_metric"]}
                   for name, r in results.items()},
        "world_size": last["world_size"],
        "engine": last["engine"],
        "git_commit": last["git_commit"],
    }
    if last["world_size"] == 1 or _rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(out / "results.json", summary)
    return summary


def run_any(path: str | Path, out: str | Path, overrides: dict, resume: str | None = None,
            overwrite: bool = False, allow_config_change: bool = False) -> dict:
    """A run config or a pipeline config, whichever the file is."""
    if config_mod.is_pipeline(path):
        return run_pipeline(path, out, overrides, resume, overwrite, allow_config_change)
    from mtkit.run import run
    return run(config_mod.load(path, overrides), out, resume, overwrite, allow_config_change)


def _rank() -> int:
    import torch.distributed as tdist
    return tdist.get_rank() if tdist.is_initialized() else 0
