"""`mtkit` command line (fire): train, eval, export, config, diagnose, study, clean_shm.

    mtkit train --config configs/debug_tiny.yaml --out runs/tiny --train.seed=3 --tasks.sst.lr=1e-3
    mtkit train --config ... --out DIR --resume auto   # continue; --overwrite: start over
    mtkit eval RUN_DIR [--split dev] [--checkpoint RUN_DIR/checkpoints/step_N]
    mtkit config configs/x.yaml [--a.b=value ...]     # print the resolved config
    mtkit export RUN_DIR [--out DIR] [--normalize] [--push-to-hub USER/REPO [--private]]
    mtkit diagnose RUN_DIR
    mtkit study configs/studies/x.yaml --out DIR [--jobs N] [--profile quick|full]   # cells x seeds -> table
    mtkit clean_shm                                   # free DeepSpeed memory leaked by dead launches

Overrides are dotted config keys. fire pre-parses values (`--x=1.10` arrives as 1.1, `--a=b,c` as a
tuple); they are re-typed against the config dataclasses, so only string fields that look like numbers
need quoting (`--name="'1.10'"`).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import fire

from mtkit import config as config_mod


def _overrides(kwargs: dict) -> dict:
    kwargs.pop("local_rank", None)  # appended by the deepspeed launcher; LOCAL_RANK is read from the env
    return {k.replace("-", "_") if "." not in k else k: list(v) if isinstance(v, tuple) else v
            for k, v in kwargs.items()}


def _fail(e: Exception) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


class CLI:
    """Multi-task fine-tuning of sentence encoders with gradient-conflict diagnostics."""

    def train(self, config: str, out: str = "runs/run", resume: str | None = None, overwrite: bool = False,
              allow_config_change: bool = False, **overrides):
        """Train a run or a pipeline config into OUT. An OUT that holds a run is refused: `--resume auto`
        continues it from the latest checkpoint (refusing changed settings unless --allow-config-change),
        `--overwrite` deletes it and starts over."""
        from mtkit.checkpoint import RunFolderError
        from mtkit.loop import TrainingStopped
        from mtkit.pipeline import run_any
        from mtkit.tasks import DataError
        try:
            results = run_any(config, out, _overrides(overrides), resume, overwrite, allow_config_change)
        except (config_mod.ConfigError, DataError, RunFolderError, OSError) as e:
            _fail(e)
        except TrainingStopped as e:
            print(("error: " if e.exit_code else "") + str(e), file=sys.stderr)
            sys.exit(e.exit_code)
        print(json.dumps({"dev": results["dev"], "out": str(out)}, indent=2))

    def eval(self, run_dir: str, split: str = "dev", checkpoint: str | None = None, **overrides):
        """Re-evaluate a run's best model (or CHECKPOINT: a model.pt or a checkpoint folder) on SPLIT."""
        from mtkit.checkpoint import RunFolderError, model_weights
        from mtkit.distributed import init_distributed
        from mtkit.evaluate import evaluate
        from mtkit.run import best_weights, build, read_run_config
        run_dir = Path(run_dir)
        try:
            cfg = read_run_config(run_dir, _overrides(overrides))
            weights = model_weights(Path(checkpoint)) if checkpoint else best_weights(run_dir)
            dist = init_distributed(cfg.train.device)
            _, tasks, model = build(cfg, dist)
            have = {name: sorted(t.splits) for name, t in tasks.items()}
            if not any(split in s for s in have.values()):
                raise RunFolderError(f"no task has a {split!r} split; splits: "
                                     + "; ".join(f"{n}: {', '.join(s)}" for n, s in have.items()))
            model.load_state_dict(weights)
        except (config_mod.ConfigError, RunFolderError) as e:
            _fail(e)
        model.to(dist.device)
        metrics = evaluate(model, tasks, split, cfg.train.eval_batch_size, dist.device, gather=dist,
                           pred_dir=run_dir / "predictions" if dist.is_main else None)
        print(json.dumps(metrics, indent=2))
        return None

    def export(self, run_dir: str, out: str | None = None, checkpoint: str | None = None, normalize: bool = False,
               push_to_hub: str | None = None, private: bool = False, group: str | None = None):
        """Save a run's best encoder (or CHECKPOINT's) as a sentence-transformers folder with a model card
        (default RUN_DIR/encoder); --normalize adds unit-length normalisation. --push-to-hub REPO uploads
        it to the Hugging Face Hub (--private for a new private repository; --group G picks one task
        group's encoder when the run has task-specific layers)."""
        from mtkit.checkpoint import RunFolderError, model_weights
        from mtkit.distributed import init_distributed
        from mtkit.export import export_encoder
        from mtkit.export import push_to_hub as push
        from mtkit.model import build_model
        from mtkit.model.encoder import load_tokenizer
        from mtkit.run import best_weights, read_run_config
        run_dir = Path(run_dir)
        try:
            cfg = read_run_config(run_dir)
            weights = model_weights(Path(checkpoint)) if checkpoint else best_weights(run_dir)
        except (config_mod.ConfigError, RunFolderError) as e:
            _fail(e)
        init_distributed("cpu")
        model = build_model(cfg)
        model.load_state_dict(weights)
        try:
            path = export_encoder(model, load_tokenizer(cfg.model), cfg, Path(out) if out else run_dir / "encoder",
                                  run_dir=run_dir, normalize=normalize, checkpoint=checkpoint)
            print(path)
            if push_to_hub:
                print(push(path, str(push_to_hub), private=private, group=group))
        except (ValueError, OSError) as e:  # ExportError, and the Hub's errors (bad repo id, HTTP, no token)
            _fail(e)

    def config(self, path: str | None = None, **overrides):
        """Load, validate and print the resolved config."""
        try:
            cfg = config_mod.load(path, _overrides(overrides))
        except config_mod.ConfigError as e:
            _fail(e)
        print(json.dumps(config_mod.to_dict(cfg), indent=2))

    def diagnose(self, run_dir: str, plot: str | None = None):
        """Summarise a run's gradient-conflict diagnostics and plot cosine over steps."""
        from diagnostics.report import format_table, plot_run, summarize_run
        if not Path(run_dir).is_dir():
            _fail(FileNotFoundError(f"{run_dir}: no such run folder"))
        try:
            summary = summarize_run(run_dir)
        except (OSError, ValueError) as e:
            _fail(e)
        print(format_table(summary))
        path = plot or str(Path(run_dir) / "diagnostics_cos.png")
        plot_run(run_dir, path)
        print(f"plot: {path}")

    def study(self, study: str, out: str, jobs: int = 1, seeds: int | None = None, profile: str | None = None,
              cells: str | tuple | None = None, seed_index: int | None = None, only: str | None = None,
              launcher: str | None = None, report_only: bool = False, dry_run: bool = False, **overrides):
        """Run a study (cells x seeds, each in OUT/<cell>/seed<k>; finished runs are skipped) and write
        OUT/table.md, table.csv, results.json and chart.png. --cells a,b, --seed-index I or --only CELL/seedK
        select runs (one job each on a cluster); --launcher "deepspeed --num_gpus 8" replaces python;
        --report-only gathers the table; --dry-run prints the commands. Other flags override every run."""
        from mtkit.study import StudyError, run_study
        selected = cells.split(",") if isinstance(cells, str) else list(cells) if cells else None
        try:
            results = run_study(study, out, profile, jobs, seeds, selected, seed_index, only,
                                _overrides(overrides), launcher, report_only, dry_run)
        except (config_mod.ConfigError, StudyError, OSError) as e:
            _fail(e)
        if results:
            print((Path(out) / "table.md").read_text())

    def clean_shm(self):
        """Remove DeepSpeed CPU all-reduce workspaces in /dev/shm (RAM) that no live process maps.

        mtkit releases its own at start-up; launches that died earlier, or other DeepSpeed programs, leave
        ~70 MB per rank behind."""
        from mtkit.distributed import remove_stale_shm_workspaces
        removed = remove_stale_shm_workspaces()
        mib = sum(size for _, size in removed) / 2 ** 20
        print(f"removed {len(removed)} stale DeepSpeed workspace(s), {mib:.0f} MiB")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fire.Fire(CLI, name="mtkit")


if __name__ == "__main__":
    main()
