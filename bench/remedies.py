"""Conflict remedies side by side on the bi-encoder job: same data, seed and budget for each variant.

    python bench/remedies.py [--budget 100] [--seeds 0] [--variants one_task,joint_sum,...] [--out runs/remedies]

The budget is B batches of every task: B joint steps (one batch of each task per step) or 3B one-task
steps in round-robin order, so every variant sees the same batches. Each variant probes the gradients at
the same points of training (every B/4 joint steps, 3B/4 one-task steps) and is evaluated once, at the end,
on the dev sets. Finished runs (results.json present) are skipped, so the script resumes. Writes
`docs/results/remedies.md` and `.json` with dev metrics, wall time and the conflict summary per run.
Needs the CS224N data (MTKIT_DATA or ../shared/data) and the bundled encoder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diagnostics.report import summarize_run  # noqa: E402

# name -> (overrides, joint?)
VARIANTS = {
    "one_task": ([], False),                                       # `sum` over steps: one task per step
    "joint_sum": (["--train.strategy=sum"], True),
    "pcgrad": (["--train.strategy=pcgrad"], True),
    "cagrad": (["--train.strategy=cagrad"], True),
    "task_layers_2": (["--model.task_layers=2"], False),
}
METRICS = [("sst", "acc"), ("quora", "acc"), ("sts", "pearson")]


def command(variant: str, seed: int, budget: int, config: str, out: Path) -> list[str]:
    overrides, joint = VARIANTS[variant]
    steps = budget if joint else 3 * budget
    return [sys.executable, "launchers/train.py", "--config", config, "--out", str(out),
            "--data.schedule=round_robin", f"--train.max_steps={steps}", f"--train.eval_every={steps}",
            f"--diagnostics.every={max(1, steps // 4)}", f"--train.seed={seed}", "--train.predict=dev",
            "--train.save_checkpoints=false", *overrides]


def run_cell(variant: str, seed: int, args) -> dict:
    out = Path(args.out) / f"{variant}-seed{seed}"
    if not (out / "results.json").exists():
        shutil.rmtree(out, ignore_errors=True)  # an unfinished cell starts over
        cmd = command(variant, seed, args.budget, args.config, out)
        print(" ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=REPO, check=True)
    results = json.loads((out / "results.json").read_text())
    conflict = summarize_run(out)
    return {"variant": variant, "seed": seed, "dir": str(out),
            "dev": {f"{t}.{m}": results["dev"][t][m] for t, m in METRICS},
            "overall": results["dev"]["overall"], "wall_time_s": results["wall_time_s"],
            "cos": {pair: p["cos_mean"] for pair, p in conflict["pairs"].items()},
            "conflict_share": {pair: p["conflict_share"] for pair, p in conflict["pairs"].items()},
            "command": " ".join(command(variant, seed, args.budget, args.config, out)[1:])}


def table(cells: list[dict]) -> str:
    pairs = sorted({p for c in cells for p in c["cos"]})
    head = (["variant", "seeds"] + [f"{t} {m}" for t, m in METRICS] + ["overall", "wall (min)"]
            + [f"cos {p.replace('__', '–')}" for p in pairs])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant in VARIANTS:
        runs = [c for c in cells if c["variant"] == variant]
        if not runs:
            continue

        def fmt(values: list[float], digits: int = 3) -> str:
            mean = statistics.mean(values)
            return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")

        row = [variant, ",".join(str(c["seed"]) for c in runs)]
        row += [fmt([c["dev"][f"{t}.{m}"] for c in runs]) for t, m in METRICS]
        row += [fmt([c["overall"] for c in runs]), fmt([c["wall_time_s"] / 60 for c in runs], 1)]
        row += [fmt([c["cos"][p] for c in runs if p in c["cos"]]) + " (" + ", ".join(
            f"{100 * c['conflict_share'][p]:.0f}%" for c in runs if p in c["conflict_share"]) + ")"
            for p in pairs]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/mtl_minilm_bi.yaml")
    parser.add_argument("--budget", type=int, default=100, help="batches of every task")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="runs/remedies")
    parser.add_argument("--report", default="docs/results/remedies")
    args = parser.parse_args()
    for variant in args.variants.split(","):
        for seed in map(int, args.seeds.split(",")):
            run_cell(variant, seed, args)
    # The report covers every finished cell under --out, so runs added later (more seeds) join the table.
    cells = [run_cell(v, int(d.name.rsplit("seed", 1)[1]), args)
             for v in VARIANTS for d in sorted(Path(args.out).glob(f"{v}-seed*")) if (d / "results.json").exists()]
    report = {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "budget": args.budget,
              "config": args.config, "cells": cells}
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report + ".json").write_text(json.dumps(report, indent=2))
    Path(args.report + ".md").write_text(table(cells) + "\n")
    print(table(cells))


if __name__ == "__main__":
    main()
