"""Training throughput with gradient diagnostics off, `stream` and `probe`, each at its default settings.

All modes run in one process on the same data, interleaved (off, stream, probe, off, ...) so machine drift
hits them alike; the report is each mode's samples/s relative to `off` (evaluation time excluded).
"Default settings" are those of `DiagnosticsConfig` (`every`, `probe_batch_size`, `stream_beta`), whatever
the config file says. `--modes` adds `stream_every_step` (a stream record at every step). Keep `--steps` a
multiple of `every` so each mode's periodic work is counted at its long-run rate.

    python bench/diagnostics_overhead.py [--steps 200] [--repeats 2] [--config configs/mtl_minilm_bi.yaml]

Needs the CS224N data (MTKIT_DATA or ../shared/data). Writes bench/results/diagnostics_overhead.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtkit import config as config_mod  # noqa: E402
from mtkit.run import run  # noqa: E402

DEFAULTS = {f"diagnostics.{k}": v for k, v in dataclasses.asdict(config_mod.DiagnosticsConfig()).items()
            if k != "mode"}
MODES = {
    "off": {"diagnostics.mode": "off"},
    "stream": {**DEFAULTS, "diagnostics.mode": "stream"},
    "probe": {**DEFAULTS, "diagnostics.mode": "probe"},
    "stream_every_step": {**DEFAULTS, "diagnostics.mode": "stream", "diagnostics.every": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/mtl_minilm_bi.yaml")
    parser.add_argument("--steps", type=int, default=2 * config_mod.DiagnosticsConfig.every)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default="off,stream,probe", help=f"comma-separated, from {list(MODES)}")
    parser.add_argument("--out", default="bench/results/diagnostics_overhead.json")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if "off" not in modes or not set(modes) <= set(MODES):
        parser.error(f"--modes must include off and name only {list(MODES)}")

    base = {"train.max_steps": args.steps, "train.eval_every": 10 ** 9, "train.log_every": 10 ** 9,
            "train.save_checkpoints": False, "train.predict": []}
    names = [t.name for t in config_mod.load(args.config).tasks]
    for t in names:  # evaluation is excluded from throughput anyway; keep it short
        base[f"tasks.{t}.max_eval"] = 64
    speeds: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for mode in modes:
                cfg = config_mod.load(args.config, {**base, **MODES[mode]})
                res = run(cfg, Path(tmp) / f"{mode}-{r}")
                speeds[mode].append(res["train_samples_per_s"])
                print(f"repeat {r} {mode}: {res['train_samples_per_s']:.2f} samples/s", flush=True)
    off = statistics.median(speeds["off"])
    report = {
        "command": " ".join(["python"] + sys.argv),
        "machine": f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} cpus".strip(),
        "steps_per_run": args.steps,
        "settings": {m: {k: v for k, v in MODES[m].items() if k != "diagnostics.mode"} for m in modes},
        "samples_per_s": speeds,
        "throughput_vs_off": {m: statistics.median(v) / off for m, v in speeds.items()},
        "overhead_pct": {m: 100 * (off / statistics.median(v) - 1) for m, v in speeds.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["overhead_pct"], indent=2))


if __name__ == "__main__":
    main()
