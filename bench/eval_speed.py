"""One dev evaluation, the evaluation code of a baseline revision vs the current one, interleaved.

    python bench/eval_speed.py [--config configs/mtl_minilm.yaml] [--baseline REV] [--repeats 2]
                               [--max-eval N] [--set key=value ...]

The baseline's `mtkit/evaluate.py` is read from git (`git show REV:mtkit/evaluate.py`) and imported next
to the current one; both evaluate the same model (the config's encoder, heads as initialised with the
config's seed; speed does not depend on the weights) on the same data, in the order A B, B A, ... so
machine drift hits both alike. Reports seconds per evaluation, the ratio baseline / current, and the
largest difference between their metrics. Writes bench/results/eval_speed.json (or --out).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, header, spread  # noqa: E402
from mtkit import config as config_mod  # noqa: E402
from mtkit import evaluate as current  # noqa: E402
from mtkit.distributed import Dist  # noqa: E402
from mtkit.run import build  # noqa: E402

BASELINE = "bb30e93"  # the evaluation before token-budget batches and the shared embedding cache


def load_baseline(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:mtkit/evaluate.py"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "evaluate_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("evaluate_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flat(metrics: dict) -> dict:
    return {f"{t}.{k}": v for t, m in metrics.items() if isinstance(m, dict) for k, v in m.items()} | (
        {"overall": metrics["overall"]} if "overall" in metrics else {})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/mtl_minilm.yaml")
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-eval", type=int, default=None, help="first N dev rows per task (default: all)")
    parser.add_argument("--set", nargs="*", action="extend", default=[], help="config overrides key=value")
    parser.add_argument("--out", default="bench/results/eval_speed.json")
    args = parser.parse_args()

    overrides = dict(kv.split("=", 1) for kv in args.set)
    names = [t.name for t in config_mod.load(args.config, overrides).tasks]
    if args.max_eval:
        overrides.update({f"tasks.{t}.max_eval": args.max_eval for t in names})
    cfg = config_mod.load(args.config, overrides)
    _, tasks, model = build(cfg, Dist())
    tasks = {n: t for n, t in tasks.items() if "dev" in t.splits}
    impls = {"baseline": load_baseline(args.baseline), "current": current}
    seconds: dict[str, list[float]] = {k: [] for k in impls}
    metrics: dict[str, dict] = {}
    for r in range(args.repeats):
        for name in (list(impls) if r % 2 == 0 else list(impls)[::-1]):
            t = time.perf_counter()
            m = impls[name].evaluate(model, tasks, "dev", cfg.train.eval_batch_size, "cpu")
            seconds[name].append(time.perf_counter() - t)
            metrics[name] = flat(m)
            print(f"repeat {r} {name}: {seconds[name][-1]:.1f} s  overall {m.get('overall')}", flush=True)
    diff = max(abs(metrics["baseline"][k] - metrics["current"][k]) for k in metrics["baseline"])
    assert metrics["baseline"].keys() == metrics["current"].keys()
    report = {**header(), "config": args.config, "overrides": overrides, "baseline": args.baseline,
              "dev_rows": {n: len(t.splits["dev"]) for n, t in tasks.items()},
              "seconds": {k: spread(v) for k, v in seconds.items()},
              "speedup_median": spread(seconds["baseline"])["median"] / spread(seconds["current"])["median"],
              "speedup_per_repeat": [b / c for b, c in zip(seconds["baseline"], seconds["current"])],
              "max_metric_difference": diff, "metrics": metrics}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("speedup_median", "speedup_per_repeat", "max_metric_difference")}))


if __name__ == "__main__":
    main()
