"""Length-bucketed dynamic padding (mtkit's sampler, `data.bucket`) against random batches padded to
`model.max_length` (128 for the main job).

    python bench/padding.py [--config configs/mtl_minilm.yaml] [--steps 50] [--repeats 2] [--dev-rows N]
                            [--set key=value ...] [--out bench/results/padding.json]

Two parts:
* per epoch, no model: the pad-token share of one epoch of the sampler's batches, per task and overall,
  for `bucketed` (the config's `data.bucket`, padded to each batch's longest text), `random_dynamic`
  (bucket 1, same padding) and `pad_to_max` (bucket 1, every batch padded to max_length);
* training, interleaved: `bucketed` and `pad_to_max` runs of --steps steps each (same seed and budget),
  samples/s (the loop's own figure), tokens/s (real and padded tokens of the traced batches over the
  training time) and the pad share of the batches trained. The last step evaluates --dev-rows dev rows
  per task and the metrics are reported (one seed: compare against seed noise). --steps 0 skips training.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import header, spread  # noqa: E402
from mtkit import config as config_mod  # noqa: E402
from mtkit import loop  # noqa: E402
from mtkit.data.dataset import batch_for  # noqa: E402
from mtkit.distributed import Dist  # noqa: E402
from mtkit.run import build, make_sampler, run  # noqa: E402

BASE = {"diagnostics.mode": "off", "train.save_checkpoints": False, "train.predict": [], "train.trace": True,
        "train.eval_every": 10 ** 9}
VARIANTS = {"bucketed": {}, "pad_to_max": {"data.bucket": 1}}


def batch_tokens(split, indices: list[int], width: int | None = None) -> tuple[int, int]:
    """(real, padded) tokens of the batch `collate` builds from these rows: every text of the batch is
    padded to the batch's longest text, or to `width`."""
    texts = [ids for i in indices for ids in split.tokens[i]]
    real = sum(len(t) for t in texts)
    return real, len(texts) * (width or max(len(t) for t in texts))


def epoch_pad_share(cfg, tasks, width: int | None) -> dict:
    sampler = make_sampler(cfg, tasks, Dist())
    sampler.set_epoch(0)
    real, padded = {}, {}
    for task, indices in sampler:
        r, p = batch_tokens(tasks[task].splits["train"], indices, width)
        real[task], padded[task] = real.get(task, 0) + r, padded.get(task, 0) + p
    share = {t: 1 - real[t] / padded[t] for t in real}
    share["all"] = 1 - sum(real.values()) / sum(padded.values())
    return share


def padded_to(width: int):
    """batch_for, then every tensor of the batch padded on the right to `width` tokens."""
    def build_batch(task, split, indices, pad_id):
        batch = batch_for(task, split, indices, pad_id)
        extra = width - batch["input_ids"].shape[1]
        for key, value in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in batch:
                batch[key] = F.pad(batch[key], (0, extra), value=value)
        return batch
    return build_batch


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/mtl_minilm.yaml")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dev-rows", type=int, default=16, help="dev rows per task in the one evaluation")
    parser.add_argument("--set", nargs="*", action="extend", default=[], help="config overrides key=value")
    parser.add_argument("--workdir", default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--out", default="bench/results/padding.json")
    args = parser.parse_args(argv)

    overrides = {**BASE, **dict(kv.split("=", 1) for kv in args.set), "train.max_steps": max(1, args.steps)}
    names = [t.name for t in config_mod.load(args.config, overrides).tasks]
    overrides.update({f"tasks.{t}.max_eval": args.dev_rows for t in names})
    cfgs = {v: config_mod.load(args.config, {**overrides, **o}) for v, o in VARIANTS.items()}
    width = cfgs["bucketed"].model.max_length

    _, tasks, _ = build(cfgs["bucketed"], Dist())
    per_epoch = {"bucketed": epoch_pad_share(cfgs["bucketed"], tasks, None),
                 "random_dynamic": epoch_pad_share(cfgs["pad_to_max"], tasks, None),
                 "pad_to_max": epoch_pad_share(cfgs["pad_to_max"], tasks, width)}

    speeds = {v: [] for v in VARIANTS}
    tokens = {v: [] for v in VARIANTS}
    trained_pad = {}
    dev = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        for r in range(args.repeats if args.steps else 0):
            for variant in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
                out = work / f"{variant}-{r}"
                builder = padded_to(width) if variant == "pad_to_max" else batch_for
                with mock.patch.object(loop, "batch_for", builder):
                    res = run(cfgs[variant], out, overwrite=True)
                real = padded = 0
                for line in (out / "trace" / "rank0.jsonl").read_text().splitlines():
                    row = json.loads(line)
                    rp = batch_tokens(tasks[row["task"]].splits["train"], row["indices"],
                                      width if variant == "pad_to_max" else None)
                    real, padded = real + rp[0], padded + rp[1]
                seconds = res["train_time_s"] - res["eval_time_s"]
                speeds[variant].append(res["train_samples_per_s"])
                tokens[variant].append({"real_per_s": real / seconds, "padded_per_s": padded / seconds})
                trained_pad[variant] = 1 - real / padded
                dev[variant] = res["dev"]
                print(f"repeat {r} {variant}: {speeds[variant][-1]:.2f} samples/s, pad share "
                      f"{trained_pad[variant]:.3f}", flush=True)
    report = {**header(), "config": args.config, "steps": args.steps, "repeats": args.repeats,
              "max_length": width, "bucket": cfgs["bucketed"].data.bucket,
              "pad_share_per_epoch": per_epoch, "pad_share_trained": trained_pad,
              "dev_rows_per_task": args.dev_rows, "dev": dev}
    if args.steps:
        med = {v: spread(s)["median"] for v, s in speeds.items()}
        report.update({
            "samples_per_s": {v: spread(s) for v, s in speeds.items()},
            "tokens_per_s": {v: {k: spread([t[k] for t in ts]) for k in ("real_per_s", "padded_per_s")}
                             for v, ts in tokens.items()},
            "speedup_bucketed_vs_pad_to_max": med["bucketed"] / med["pad_to_max"],
            "speedup_per_repeat": [b / p for b, p in zip(speeds["bucketed"], speeds["pad_to_max"])]})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report.get(k) for k in ("speedup_bucketed_vs_pad_to_max", "pad_share_per_epoch")}))
    return report


if __name__ == "__main__":
    main()
