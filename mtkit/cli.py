"""`mtkit` command line: train, eval, export, config, diagnose, study, clean_shm (`mtkit --help` lists them).

    mtkit train --config configs/debug_tiny.yaml --out runs/tiny --train.seed=3 --tasks.sst.lr=1e-3
    mtkit train --config ... --out DIR --resume auto   # continue; --overwrite: start over; --quiet
    mtkit eval RUN_DIR [--split dev] [--checkpoint RUN_DIR/checkpoints/step_N] [--quiet]
    mtkit config configs/x.yaml [--a.b=value ...]     # print the resolved config
    mtkit export RUN_DIR [--out DIR] [--normalize] [--push-to-hub USER/REPO [--private]]
    mtkit diagnose RUN_DIR
    mtkit study configs/studies/x.yaml --out DIR [--jobs N] [--profile quick|full]   # cells x seeds -> table
    mtkit clean_shm                                   # free DeepSpeed memory leaked by dead launches

`mtkit train` is `launchers/train.py`: one exact argparse parser (`mtkit.args`) whose `--help` lists every
config key. The other commands go through fire, which is handy for calling one function while debugging in
a single process; their config overrides (`--a.b=value`, on eval and config) are taken out of the command
line before fire sees it and reach the config exactly as typed, as train's do.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import fire

from mtkit import config as config_mod
from mtkit import progress
from mtkit.args import parse as parse_train, train_main  # noqa: F401  (parse_train: `mtkit train`'s parser)


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the other arguments, the config overrides): `--KEY=VALUE` whose KEY starts with a config section
    (or is `name`), kept as the typed string, as `mtkit train` does."""
    sections = {f.name for f in dataclasses.fields(config_mod.Config)}
    rest, overrides = [], {}
    for item in argv:
        key, eq, value = item[2:].partition("=")
        if item.startswith("--") and eq and key.split(".")[0] in sections:
            overrides[key] = value
        else:
            rest.append(item)
    return rest, overrides


def _fail(e: Exception) -> None:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


class CLI:
    """Multi-task fine-tuning of sentence encoders with gradient-conflict diagnostics."""

    def __init__(self, overrides: dict[str, str] | None = None):
        self._overrides = overrides or {}  # config overrides taken out of the command line (split_overrides)

    def eval(self, run_dir: str, split: str = "dev", checkpoint: str | None = None, quiet: bool = False):
        """Re-evaluate a run's best model (or CHECKPOINT: a model.pt or a checkpoint folder) on SPLIT.

        Config overrides (--a.b=value) apply on top of the run's config; --quiet: no bars, no INFO logs."""
        if quiet:
            progress.setup_logging(True)
        from mtkit.checkpoint import RunFolderError, model_weights
        from mtkit.distributed import init_distributed
        from mtkit.evaluate import evaluate
        from mtkit.run import best_weights, build, read_run_config
        run_dir = Path(run_dir)
        try:
            cfg = read_run_config(run_dir, self._overrides)
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
        """Save a run's best encoder as a sentence-transformers folder; optionally push it to the Hub.

        The encoder of the best model (or CHECKPOINT's) goes to OUT (default RUN_DIR/encoder) with a model
        card; --normalize adds unit-length normalisation. --push-to-hub REPO uploads it to the Hugging Face
        Hub (--private for a new private repository; --group G picks one task group's encoder when the run
        has task-specific layers)."""
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

    def config(self, path: str | None = None):
        """Load, validate and print the resolved config (base: chain and --a.b=value overrides applied)."""
        try:
            cfg = config_mod.load(path, self._overrides)
        except config_mod.ConfigError as e:
            _fail(e)
        print(json.dumps(config_mod.to_dict(cfg), indent=2))

    def diagnose(self, run_dir: str, plot: str | None = None, heatmap: str | None = None):
        """Summarise a run's gradient-conflict diagnostics, plot cosine over steps (--plot, default
        RUN/diagnostics_cos.png) and the last per-layer heatmap (--heatmap, default RUN/diagnostics_layers.png)."""
        from diagnostics.report import format_table, plot_layers, plot_run, summarize_run
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
        path = heatmap or str(Path(run_dir) / "diagnostics_layers.png")
        step = plot_layers(run_dir, path)
        print(f"layer heatmap (step {step}): {path}" if step is not None else "layer heatmap: no per-layer records")

    def study(self, study: str, out: str, jobs: int = 1, seeds: int | None = None, profile: str | None = None,
              cells: str | tuple | None = None, seed_index: int | None = None, only: str | None = None,
              launcher: str | None = None, report_only: bool = False, dry_run: bool = False):
        """Run a study (cells x seeds, each in OUT/<cell>/seed<k>; finished runs are skipped) and write
        OUT/table.md, table.csv, results.json and chart.png. --cells a,b, --seed-index I or --only CELL/seedK
        select runs (one job each on a cluster); --launcher "deepspeed --num_gpus 8" replaces python;
        --report-only gathers the table; --dry-run prints the commands. Other flags override every run."""
        from mtkit.study import StudyError, run_study
        selected = cells.split(",") if isinstance(cells, str) else list(cells) if cells else None
        try:
            results = run_study(study, out, profile, jobs, seeds, selected, seed_index, only,
                                self._overrides, launcher, report_only, dry_run)
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


def usage() -> str:
    """The commands with their one-line summaries, from the docstrings."""
    from mtkit.args import parser
    commands = {"train": parser("mtkit train").description}
    commands.update({name: getattr(CLI, name).__doc__.strip().splitlines()[0]
                     for name in vars(CLI) if not name.startswith("_")})
    pad = max(map(len, commands))
    return "\n".join([f"usage: mtkit COMMAND [ARGS]\n\n{CLI.__doc__}\n\ncommands:",
                      *(f"  {name:<{pad}}  {line}" for name, line in commands.items()),
                      "\n`mtkit COMMAND --help` shows a command's arguments; `mtkit train --help` also lists "
                      "every config key\nwith its type, default and allowed values."])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] == "train":
        train_main(argv[1:], "mtkit train")
        return
    if argv[0] not in vars(CLI) or argv[0].startswith("_"):
        print(f"{usage()}\n\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        sys.exit(2)
    rest, overrides = split_overrides(argv[1:]) if argv[0] in ("eval", "config", "study") else (argv[1:], {})
    progress.setup_logging()
    fire.Fire(CLI(overrides), command=[argv[0], *rest], name="mtkit")


if __name__ == "__main__":
    main()
