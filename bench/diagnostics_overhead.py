"""Training throughput with gradient diagnostics off, `stream` every step and `probe` every 50 steps.

All modes run in one process on the same data, interleaved (off, stream, probe, off, ...) so machine drift
hits them alike; the report is each mode's samples/s relative to `off` (evaluation time excluded).

    python bench/diagnostics_overhead.py [--steps 150] [--repeats 2] [--config configs/mtl_minilm_bi.yaml]

Needs the CS224N data (MTKIT_DATA or ../shared/data). Writes bench/results/diagnostics_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtkit import config as config_mod  # noqa: E402
from mtkit.run import run  # noqa: E402

MODES = {
    "off": {"diagnostics.mode": "off"},
    "stream_every_step": {"diagnostics.mode": "stream", "diagnostics.every": 1},
    "probe_every_50": {"diagnostics.mode": "probe", "diagnostics.every": 50},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/mtl_minilm_bi.yaml")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/results/diagnostics_overhead.json")
    args = parser.parse_args()

    base = {"train.max_steps": args.steps, "train.eval_every": 10 ** 9, "train.log_every": 10 ** 9,
            "train.save_checkpoints": False, "train.predict": []}
    names = [t.name for t in config_mod.load(args.config).tasks]
    for t in names:  # evaluation is excluded from throughput anyway; keep it short
        base[f"tasks.{t}.max_eval"] = 64
    speeds: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for mode, overrides in MODES.items():
                cfg = config_mod.load(args.config, {**base, **overrides})
                res = run(cfg, Path(tmp) / f"{mode}-{r}")
                speeds[mode].append(res["train_samples_per_s"])
                print(f"repeat {r} {mode}: {res['train_samples_per_s']:.2f} samples/s", flush=True)
    off = statistics.median(speeds["off"])
    report = {
        "command": " ".join(["python"] + sys.argv),
        "machine": f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} cpus".strip(),
        "steps_per_run": args.steps,
        "samples_per_s": speeds,
        "throughput_vs_off": {m: statistics.median(v) / off for m, v in speeds.items()},
        "overhead_pct": {m: 100 * (off / statistics.median(v) - 1) for m, v in speeds.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report["overhead_pct"], indent=2))


if __name__ == "__main__":
    main()
