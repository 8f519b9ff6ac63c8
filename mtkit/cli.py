"""`mtkit` command line (fire): train, eval, export, config, diagnose, clean_shm.

    mtkit train --config configs/debug_tiny.yaml --out runs/tiny --train.seed=3 --tasks.sst.lr=1e-3
    mtkit eval RUN_DIR [--split dev]
    mtkit config configs/x.yaml [--a.b=value ...]     # print the resolved config
    mtkit diagnose RUN_DIR
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

    def train(self, config: str, out: str = "runs/run", resume: str | None = None, **overrides):
        """Train a run or a pipeline config. `--resume auto` continues from the latest checkpoint."""
        from mtkit.loop import TrainingStopped
        from mtkit.pipeline import run_any
        from mtkit.tasks import DataError
        try:
            results = run_any(config, out, _overrides(overrides), resume)
        except (config_mod.ConfigError, DataError) as e:
            _fail(e)
        except TrainingStopped as e:
            print(("error: " if e.exit_code else "") + str(e), file=sys.stderr)
            sys.exit(e.exit_code)
        print(json.dumps({"dev": results["dev"], "out": str(out)}, indent=2))

    def eval(self, run_dir: str, split: str = "dev", checkpoint: str | None = None, **overrides):
        """Re-evaluate a run's best model (or CHECKPOINT, a model.pt) on SPLIT."""
        import torch
        from mtkit.distributed import init_distributed
        from mtkit.evaluate import evaluate
        from mtkit.run import build
        run_dir = Path(run_dir)
        cfg = config_mod.load(None, {**json.loads((run_dir / "config.json").read_text()),
                                     **_overrides(overrides)})
        dist = init_distributed(cfg.train.device)
        _, tasks, model = build(cfg, dist)
        weights = Path(checkpoint) if checkpoint else run_dir / "best" / "model.pt"
        model.load_state_dict(torch.load(weights, map_location="cpu"))
        model.to(dist.device)
        metrics = evaluate(model, tasks, split, cfg.train.eval_batch_size, dist.device, gather=dist,
                           pred_dir=run_dir / "predictions" if dist.is_main else None)
        print(json.dumps(metrics, indent=2))
        return None

    def export(self, run_dir: str, out: str | None = None):
        """Save a run's best encoder as a Hugging Face folder (default RUN_DIR/encoder)."""
        import torch
        from mtkit.distributed import init_distributed
        from mtkit.export import export_encoder
        from mtkit.model import build_model
        from mtkit.model.encoder import load_tokenizer
        run_dir = Path(run_dir)
        cfg = config_mod.load(None, json.loads((run_dir / "config.json").read_text()))
        init_distributed("cpu")
        model = build_model(cfg)
        model.load_state_dict(torch.load(run_dir / "best" / "model.pt", map_location="cpu"))
        path = export_encoder(model, load_tokenizer(cfg.model), cfg, Path(out) if out else run_dir / "encoder")
        print(path)

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
        summary = summarize_run(run_dir)
        print(format_table(summary))
        path = plot or str(Path(run_dir) / "diagnostics_cos.png")
        plot_run(run_dir, path)
        print(f"plot: {path}")

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
