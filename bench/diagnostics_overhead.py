"""Training throughput with gradient diagnostics off, `stream` and `probe`, each at its default settings.

All modes run in one process on the same data, after an untimed warm-up run (thread pools, tokenization
cache, first kernels), interleaved (off, stream, probe, then the reverse order, ...) so machine drift hits
them alike; the report is each mode's samples/s relative to `off` (evaluation time excluded).
"Default settings" are those of `DiagnosticsConfig` (`every`, `probe_batch_size`, `stream_beta`), whatever
the config file says. `--modes` adds `stream_every_step` (a stream record at every step). Keep `--steps` a
multiple of `every` so each mode's periodic work is counted at its long-run rate.

    python bench/diagnostics_overhead.py [--steps 400] [--repeats 2] [--config configs/mtl_minilm_bi.yaml]
                                         [--set key=value ...]

Needs the CS224N data (MTKIT_DATA or ../shared/data). Writes bench/results/diagnostics_overhead.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import header, spread  # noqa: E402
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/mtl_minilm_bi.yaml")
    parser.add_argument("--steps", type=int, default=2 * config_mod.DiagnosticsConfig.every)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default="off,stream,probe", help=f"comma-separated, from {list(MODES)}")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--set", nargs="*", action="extend", default=[], help="config overrides key=value")
    parser.add_argument("--out", default="bench/results/diagnostics_overhead.json")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if "off" not in modes or not set(modes) <= set(MODES):
        parser.error(f"--modes must include off and name only {list(MODES)}")

    base = {"train.max_steps": args.steps, "train.eval_every": 10 ** 9, "train.log_every": 10 ** 9,
            "train.save_checkpoints": False, "train.predict": []}
    base |= dict(kv.split("=", 1) for kv in args.set)
    names = [t.name for t in config_mod.load(args.config, base).tasks]
    for t in names:  # evaluation is excluded from throughput anyway; keep it short
        base[f"tasks.{t}.max_eval"] = 64
    speeds: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        run(config_mod.load(args.config, {**base, **MODES["off"], "train.max_steps": args.warmup_steps}),
            Path(tmp) / "warmup")
        for r in range(args.repeats):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                cfg = config_mod.load(args.config, {**base, **MODES[mode]})
                res = run(cfg, Path(tmp) / f"{mode}-{r}")
                speeds[mode].append(res["train_samples_per_s"])
                print(f"repeat {r} {mode}: {res['train_samples_per_s']:.2f} samples/s", flush=True)
    off = statistics.median(speeds["off"])
    report = {
        **header(), "config": args.config,
        "steps_per_run": args.steps,
        "settings": {m: {k: v for k, v in MODES[m].items() if k != "diagnostics.mode"} for m in modes},
        "samples_per_s": {m: spread(v) for m, v in speeds.items()},
        "ratio_per_repeat": {m: [x / o for x, o in zip(v, speeds["off"])] for m, v in speeds.items()},
        "throughput_vs_off": {m: statistics.median(v) / off for m, v in speeds.items()},
        "overhead_pct": {m: 100 * (off / statistics.median(v) - 1) for m, v in speeds.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["overhead_pct"], indent=2))
    return report


if __name__ == "__main__":
    main()
