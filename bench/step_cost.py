"""The cost of a joint optimizer step, per strategy, against one ordinary step per task; and the cost per
example of the `cross_cosine` pair head (the Quora head of configs/mtl_minilm.yaml) against `cosine`.

    python bench/step_cost.py [--config configs/mtl_minilm_bi.yaml] [--strategies sum pcgrad gradvac cagrad]
                              [--steps 5] [--repeats 3] [--pair-task quora] [--set key=value ...]
                              [--out bench/results/step_cost.json]

Every variant has its own model, built by `mtkit.run.build` from the config (seeded by train.seed, so all
start from the same weights), in train mode on the plain torch engine (fp32 unless --set
train.precision=...), with grad_accum 1 and no diagnostics. The batches are fixed: for each trained task,
the first `batch_size` indices of a permutation of its train split seeded by train.seed, collated by
`mtkit.data.dataset.batch_for`. Every variant trains on the same batches at every step (checked), so the
variants differ only in what a step does with them. One timed step of a variant is:

* `ordinary`: T optimizer steps, one per task on its batch, as `mtkit.loop` runs them without a strategy:
  the forward through the engine under its autocast, backward under the loop's non-finite check
  (`mtkit.loop._StepCheck`), `engine.step` with the check's one host sync. The T steps together are the
  baseline "one ordinary step per task".
* `joint_<strategy>`: one joint optimizer step over the same T batches, as the loop runs it with
  `train.strategy: <strategy>`: the JointStep that `mtkit.run` builds yields its (task, batch, weight)
  passes (for a Gram strategy after its side passes: per-task gradients, Gram, weights), each run through
  the engine like an ordinary pass, and the engine applies the optimizer at the T-th.
* `<pair task>_cosine`, `<pair task>_cross_cosine`: one ordinary optimizer step (forward, backward,
  gradient clipping, AdamW) on the pair task's batch, with the config's task settings and only its
  decoder changed; seconds per example are the step's seconds / batch size.

The clock is read after the step's last kernel (CUDA is synchronized). A forward pre-hook on the model
counts its calls per step (side passes included). Tokens per example are read from the batch tensors: real
tokens from the attention masks, padded ones from the shapes (collate pads every row of a batch, a
cross-encoder's single sentences included, to its longest row). After one untimed step of every variant
(first Adam step, thread pools, allocator), each repeat runs every variant for --steps timed steps, in
order, reversed on odd repeats, so load drift hits all alike. Read the ratios of medians; the absolute
seconds only indicate. The weights move with every step; the cost of a step does not depend on them
(PCGrad's projections aside, a few operations on [T, T] numbers).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import header, spread  # noqa: E402
from mtkit import config as config_mod  # noqa: E402
from mtkit.data.dataset import batch_for, to_device  # noqa: E402
from mtkit.distributed import StopRequest, init_distributed  # noqa: E402
from mtkit.engine import make_engine  # noqa: E402
from mtkit.loop import _StepCheck  # noqa: E402
from mtkit.run import _joint_step, build, seed_everything  # noqa: E402

BASE = {"diagnostics.mode": "off", "train.precision": "fp32"}       # --set may change these
FIXED = {"train.engine": "torch", "train.grad_accum": 1}             # what the script itself assumes
STRATEGIES = ["sum", "pcgrad", "gradvac", "cagrad"]
DECODERS = ["cosine", "cross_cosine"]


@dataclass
class Variant:
    name: str
    engine: object
    joint: object                       # a JointStep, or None for ordinary steps
    check: _StepCheck
    group: list[tuple[str, dict]]       # (task, batch on the device), the step's batches in order
    calls: int = 0                      # model forward calls since the last reset
    passes: list[int] = field(default_factory=list)             # forward calls of each timed step
    seconds: list[list[float]] = field(default_factory=list)    # [repeat][step]

    def step(self) -> tuple[float, int]:
        engine, check = self.engine, self.check
        self.calls = 0
        start = time.perf_counter()
        passes = (self.joint.passes(self.group) if self.joint is not None
                  else [(task, batch, None) for task, batch in self.group])
        for task, batch, weight in passes:
            with engine.autocast():
                loss = engine(task, batch, weight)
            with check.watch(task, loss):
                engine.backward(loss)
            engine.step(skip=engine.at_boundary() and check.step_failed())
            if check.bad_task is not None:   # a skipped step is not the cost of a step
                raise FloatingPointError(f"{self.name}: non-finite loss or gradient in {check.bad_task}")
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        return time.perf_counter() - start, self.calls


def fixed_indices(cfg, tasks: dict) -> dict[str, list[int]]:
    """task -> the first batch_size indices of a train.seed-seeded permutation of its train split."""
    out = {}
    for t in cfg.trained_tasks():
        n = len(tasks[t.name].splits["train"])
        size = t.batch_size or cfg.train.batch_size
        if n < size:
            raise ValueError(f"{t.name}: {n} training rows, fewer than the batch size {size}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.train.seed))
        out[t.name] = perm[:size].tolist()
    return out


def token_counts(batch: dict) -> dict:
    """What the encoder is fed for one batch: rows are text-major ([n_texts * B, width])."""
    rows, width = batch["input_ids"].shape
    size = rows // batch["n_texts"]
    real, padded = int(batch["attention_mask"].sum()), rows * width
    return {"examples": size, "texts": batch["n_texts"], "width": width, "real_tokens": real,
            "padded_tokens": padded, "real_per_example": real / size, "padded_per_example": padded / size}


def make_variant(name: str, cfg, dist, step_tasks: list[str], indices: dict, total_steps: int,
                 data: dict) -> Variant:
    """A model and torch engine built as `mtkit.run` builds them, and its fixed batches of `step_tasks`;
    `data` (task -> example ids of its batch) is shared by all variants, to check they train the same."""
    _, tasks, model = build(cfg, dist)
    engine = make_engine("torch", model, cfg, total_steps, dist)
    model.freeze_encoder(cfg.train.mode in ("linear_probe", "lp_ft"))  # as the loop's step 0
    model.train()
    check = _StepCheck(model, dist, StopRequest(), grads=cfg.train.precision != "fp16")
    group = [(t, to_device(batch_for(tasks[t], "train", indices[t], model.pad_id), dist.device))
             for t in step_tasks]
    v = Variant(name, engine, _joint_step(cfg, engine), check, group)
    model.register_forward_pre_hook(lambda module, args: setattr(v, "calls", v.calls + 1))
    for t, _ in group:  # the same examples in every variant, whatever the tokenization
        ids = [tasks[t].splits["train"].examples[i].id for i in indices[t]]
        if data.setdefault(t, ids) != ids:
            raise RuntimeError(f"{name}: the fixed {t} batch holds other examples than in another variant "
                               "(the task settings change the train split)")
    return v


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/mtl_minilm_bi.yaml")
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--pair-task", default="quora", help="the pair task whose decoders are compared")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", nargs="*", action="extend", default=[], help="config overrides key=value")
    parser.add_argument("--out", default="bench/results/step_cost.json")
    args = parser.parse_args(argv)

    overrides = {**BASE, **dict(kv.split("=", 1) for kv in args.set), **FIXED}
    cfg = config_mod.load(args.config, {**overrides, "train.strategy": "none"})
    names = [t.name for t in cfg.trained_tasks()]
    if args.pair_task not in names:
        raise SystemExit(f"--pair-task {args.pair_task}: not a trained task of {args.config} ({names})")
    dist = init_distributed(cfg.train.device)
    # The lr schedule's length (ordinary steps count T each); the cost of a step does not depend on it.
    total_steps = len(names) * (1 + args.repeats * args.steps)

    _, tasks, _ = build(cfg, dist)
    indices = fixed_indices(cfg, tasks)
    del tasks
    configs = {"ordinary": cfg}
    configs |= {f"joint_{s}": config_mod.load(args.config, {**overrides, "train.strategy": s})
                for s in args.strategies}
    pair = {f"{args.pair_task}_{d}": config_mod.load(args.config, {**overrides, "train.strategy": "none",
                                                                   f"tasks.{args.pair_task}.decoder": d})
            for d in DECODERS}
    data: dict[str, list] = {}
    variants = [make_variant(n, c, dist, names, indices, total_steps, data) for n, c in configs.items()]
    variants += [make_variant(n, c, dist, [args.pair_task], indices, total_steps, data) for n, c in pair.items()]
    for v in variants[1:len(configs)]:  # the joint variants tokenize like `ordinary`: the very same tensors
        if any(not torch.equal(a[1]["input_ids"], b[1]["input_ids"]) for a, b in zip(v.group, variants[0].group)):
            raise RuntimeError(f"{v.name}: other batch tensors than ordinary's")

    seed_everything(cfg.train.seed)
    for v in variants:
        v.step()  # untimed warm-up
    for r in range(args.repeats):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            times = []
            for _ in range(args.steps):
                seconds, calls = v.step()
                times.append(seconds)
                v.passes.append(calls)
            v.seconds.append(times)
            print(f"repeat {r} {v.name}: median {spread(times)['median']:.4f} s/step", flush=True)

    by = {v.name: v for v in variants}
    per_step = {v.name: spread([s for rep in v.seconds for s in rep]) for v in variants}
    med = {k: s["median"] for k, s in per_step.items()}
    joint_names = [n for n in configs if n != "ordinary"]
    passes = {v.name: v.passes[0] if len(set(v.passes)) == 1 else v.passes for v in variants}
    batches = {t: {"indices": indices[t], **token_counts(b)} for t, b in variants[0].group}
    size = len(indices[args.pair_task])
    pair_report = {
        "task": args.pair_task,
        "batch_size": size,
        "seconds_per_example": {d: spread([s / size for rep in by[n].seconds for s in rep])
                                for d, n in zip(DECODERS, pair)},
        "tokens": {d: token_counts(by[n].group[0][1]) for d, n in zip(DECODERS, pair)},
        "forward_passes_per_step": {d: passes[n] for d, n in zip(DECODERS, pair)},
    }
    cos, cross = (f"{args.pair_task}_{d}" for d in DECODERS)
    pair_report["ratio_cross_cosine_vs_cosine"] = med[cross] / med[cos]
    pair_report["ratio_per_repeat"] = [spread(a)["median"] / spread(b)["median"]
                                       for a, b in zip(by[cross].seconds, by[cos].seconds)]
    report = {
        **header(), "config": args.config, "overrides": overrides, "strategies": args.strategies,
        "steps": args.steps, "repeats": args.repeats, "device": str(dist.device),
        "precision": cfg.train.precision, "tasks": names,
        "batch_sizes": {t: len(i) for t, i in indices.items()}, "batches": batches,
        "timed": {"ordinary": "one optimizer step per task (forward, backward, clip, AdamW), T in all",
                  "joint_<strategy>": "one joint optimizer step over the same T batches, side passes included",
                  f"{args.pair_task}_<decoder>": "one optimizer step (forward, backward, clip, AdamW) on the "
                                                 "pair task's batch"},
        "seconds_per_step": per_step,
        "forward_passes_per_step": passes,
        "ratio_vs_ordinary": {n: med[n] / med["ordinary"] for n in joint_names},
        "ratio_vs_ordinary_per_repeat": {n: [spread(a)["median"] / spread(b)["median"]
                                             for a, b in zip(by[n].seconds, by["ordinary"].seconds)]
                                         for n in joint_names},
        "pair_head": pair_report,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))

    print(f"\n{args.config} on {dist.device}, {cfg.train.precision}, batches {report['batch_sizes']}")
    for n in ["ordinary", *joint_names]:
        ratio = f"x{report['ratio_vs_ordinary'][n]:.2f}" if n != "ordinary" else "baseline"
        print(f"  {n:16s} {med[n]:8.4f} s/step  {ratio:9s} {passes[n]} forward passes")
    for d in DECODERS:
        tok = pair_report["tokens"][d]
        print(f"  {args.pair_task} {d:13s} {pair_report['seconds_per_example'][d]['median'] * 1e3:8.3f} ms/example"
              f"  tokens/example: {tok['real_per_example']:.1f} real, {tok['padded_per_example']:.1f} padded")
    print(f"  cross_cosine / cosine per example: x{pair_report['ratio_cross_cosine_vs_cosine']:.2f}")
    return report


if __name__ == "__main__":
    main()
