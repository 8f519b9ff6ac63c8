"""mtkit's training throughput against a minimal hand-written loop on the identical batches.

    python bench/loop_overhead.py [--config configs/mtl_minilm.yaml] [--steps 50] [--repeats 2]
                                  [--set key=value ...] [--out bench/results/loop_overhead.json]

`mtkit` is `mtkit.run.run` with diagnostics off, no checkpoints, no evaluation until the last step and
`train.trace: true`; its samples/s is the loop's own figure (evaluation time excluded). `hand` replays
that run's trace (the (task, indices) of every step, batches built by `mtkit.data.dataset.batch_for`)
through a loop of plain torch + transformers: the HF BertModel forward, mean pooling, the task's head
module, the loss, backward, gradient clipping and an AdamW step over the same parameter groups, timed
the same way. `hand_checks` is `hand` plus what mtkit's `_StepCheck` adds to a step: a hook per
parameter summing its gradient, and one host sync per step reading the flags; it shows what that check
costs. After an untimed warm-up run, variants alternate (mtkit, hand, hand_checks, then the reverse
order) so load drift hits all alike. Ratios of medians are what to read.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import header, spread  # noqa: E402
from mtkit import config as config_mod  # noqa: E402
from mtkit.data.dataset import batch_for, to_device  # noqa: E402
from mtkit.distributed import Dist  # noqa: E402
from mtkit.run import build, run  # noqa: E402

BASE = {"diagnostics.mode": "off", "train.save_checkpoints": False, "train.predict": [], "train.trace": True,
        "train.eval_every": 10 ** 9}


def read_trace(out: Path) -> list[tuple[str, list[int]]]:
    lines = (out / "trace" / "rank0.jsonl").read_text().splitlines()
    return [(r["task"], r["indices"]) for r in map(json.loads, lines)]


class HandLoop:
    """The minimal loop: everything here is plain torch / transformers; the heads are mtkit's head modules
    (a linear layer or two each), copied with their initial weights."""

    def __init__(self, cfg, checks: bool):
        unsupported = [t.name for t in cfg.trained_tasks() if t.kind not in (
            "classification", "pair_classification", "pair_regression") or t.loss != "auto"]
        if unsupported or cfg.model.pooling != "mean" or cfg.model.task_layers or cfg.train.grad_accum != 1:
            raise ValueError(f"the hand loop covers mean pooling, no task layers, grad_accum 1 and tasks with "
                             f"the default losses (cross-entropy, MSE); not tasks {unsupported} of {cfg.name}")
        _, self.tasks, model = build(cfg, Dist())
        self.device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.bert = copy.deepcopy(model.encoder.bert).to(self.device).train()   # transformers BertModel
        self.heads = copy.deepcopy(model.heads).to(self.device).train()
        self.pad_id, self.cfg = model.pad_id, cfg
        params = list(self.bert.parameters()) + list(self.heads.parameters())
        decay = [p for n, p in self.bert.named_parameters() if not n.endswith(("bias", "LayerNorm.weight"))]
        no_decay = [p for n, p in self.bert.named_parameters() if n.endswith(("bias", "LayerNorm.weight"))]
        groups = [{"params": decay, "lr": cfg.optim.encoder_lr, "weight_decay": cfg.optim.encoder_weight_decay},
                  {"params": no_decay, "lr": cfg.optim.encoder_lr, "weight_decay": 0.0}]
        groups += [{"params": list(self.heads[t.name].parameters()), "lr": t.lr, "weight_decay": t.weight_decay}
                   for t in cfg.trained_tasks() if list(self.heads[t.name].parameters())]
        self.optimizer = torch.optim.AdamW(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        self.params = params
        self.checks = checks
        self.grad_sum = torch.zeros((), device=self.device)
        if checks:
            for p in params:
                p.register_hook(self._on_grad)
        bf16 = cfg.train.precision == "bf16"
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else None

    def _on_grad(self, grad):
        self.grad_sum += grad.detach().sum(dtype=torch.float32)

    def loss(self, task: str, batch: dict) -> torch.Tensor:
        out = self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch.get("token_type_ids")).last_hidden_state   # [n*B, L, H]
        mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
        emb = (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)                         # mean pooling
        emb = emb.view(batch["n_texts"], -1, emb.shape[-1])
        pred = self.heads[task](emb)
        tcfg = self.cfg.task(task)
        if tcfg.kind == "pair_regression":
            return tcfg.weight * F.mse_loss(pred.float(), batch["labels"].float())
        return tcfg.weight * F.cross_entropy(pred.float(), batch["labels"])

    def train(self, trace: list[tuple[str, list[int]]]) -> dict:
        samples, flags = 0, []
        start = time.perf_counter()
        for task, indices in trace:
            batch = to_device(batch_for(self.tasks[task], "train", indices, self.pad_id), self.device)
            if self.autocast is not None:
                with self.autocast():
                    loss = self.loss(task, batch)
            else:
                loss = self.loss(task, batch)
            if self.checks:
                self.grad_sum.zero_()
            loss.backward()
            if self.checks:  # what _StepCheck does per micro-batch, and its one sync per step
                flags.append(~torch.isfinite(loss.detach()) | ~torch.isfinite(self.grad_sum))
                bad = torch.stack(flags).int().tolist()
                flags = []
                if any(bad):
                    raise FloatingPointError(f"non-finite loss or gradient in {task}")
            if self.cfg.optim.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None],
                                               self.cfg.optim.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            samples += batch["input_ids"].shape[0] // batch["n_texts"]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        return {"samples": samples, "seconds": wall, "samples_per_s": samples / wall}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/mtl_minilm.yaml")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", nargs="*", action="extend", default=[], help="config overrides key=value")
    parser.add_argument("--workdir", default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--out", default="bench/results/loop_overhead.json")
    args = parser.parse_args(argv)

    overrides = {**BASE, **dict(kv.split("=", 1) for kv in args.set), "train.max_steps": args.steps}
    names = [t.name for t in config_mod.load(args.config, overrides).tasks]
    overrides.update({f"tasks.{t}.max_eval": 16 for t in names})  # the one evaluation, at the end, is tiny
    cfg = config_mod.load(args.config, overrides)
    speeds: dict[str, list[float]] = {"mtkit": [], "hand": [], "hand_checks": []}
    samples: dict[str, list[int]] = {k: [] for k in speeds}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        # An untimed first run writes the trace the hand loops replay and pays the process's one-off
        # costs (thread pools, first kernels, file caches) that would otherwise fall on one variant.
        run(cfg, work / "warmup", overwrite=True)
        trace = read_trace(work / "warmup")
        for r in range(args.repeats):
            for variant in (list(speeds) if r % 2 == 0 else list(speeds)[::-1]):
                if variant == "mtkit":
                    out = work / f"mtkit-{r}"
                    res = run(cfg, out, overwrite=True)
                    mine = read_trace(out)
                    if mine != trace:
                        raise RuntimeError("two mtkit runs of the same config trained different batches")
                    speeds[variant].append(res["train_samples_per_s"])
                    samples[variant].append(sum(len(i) for _, i in mine))
                else:
                    res = HandLoop(cfg, checks=variant == "hand_checks").train(trace)
                    speeds[variant].append(res["samples_per_s"])
                    samples[variant].append(res["samples"])
                print(f"repeat {r} {variant}: {speeds[variant][-1]:.2f} samples/s", flush=True)
    med = {k: spread(v)["median"] for k, v in speeds.items()}
    report = {**header(), "config": args.config, "overrides": {k: v for k, v in overrides.items()},
              "steps": args.steps, "repeats": args.repeats,
              "samples": samples, "samples_per_s": {k: spread(v) for k, v in speeds.items()},
              "ratio_mtkit_vs_hand": med["mtkit"] / med["hand"],
              "ratio_hand_checks_vs_hand": med["hand_checks"] / med["hand"],
              "ratio_per_repeat": [m / h for m, h in zip(speeds["mtkit"], speeds["hand"])]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: report[k] for k in ("ratio_mtkit_vs_hand", "ratio_hand_checks_vs_hand")}))
    return report


if __name__ == "__main__":
    main()
