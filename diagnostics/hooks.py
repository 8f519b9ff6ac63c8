"""Training-loop hooks that feed the gradient diagnostics (the loop calls them; they only observe).

`probe`: every N steps, each task's exact gradient on a fixed probe batch at the current weights,
computed with `torch.autograd.grad` on the raw module (never on a loss the engine hooked), in eval mode
and under a forked RNG: training is unchanged bit for bit. With W ranks each rank holds 1/W of every
probe batch and the Gram is reduced exactly (see `diagnostics.gram`).

`stream`: no extra backward passes; after each step's backward, that step's task gradient is folded
into a per-task running average, in place, parameter by parameter; the Gram is formed only every N
steps. Cheap and approximate: the averages mix gradients from different weights and batches, so treat
its cosines as a trend, not a measurement.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diagnostics.probe import GradientProbe, StreamTracker
from diagnostics.writer import DiagnosticsWriter
from mtkit.data.dataset import batch_for, to_device

log = logging.getLogger("mtkit.diagnostics")


class ProbeHook:
    def __init__(self, probe: GradientProbe, writer: DiagnosticsWriter | None):
        self.probe, self.writer = probe, writer

    def on_backward(self, step, task, engine):
        pass

    def on_step(self, step, engine):
        if self.probe.due(step):
            record = self.probe.measure(step)  # collective: every rank measures
            if self.writer is not None:
                self.writer.write(record)

    def close(self):
        if self.writer is not None:
            self.writer.close()


class StreamHook:
    """Feeds each step's gradient to the tracker. Embedding matrices (`embeddings`: parameter name ->
    module) are read on the rows of the token ids their forward saw since the last backward: with one
    process a weight used only through its own `nn.Embedding` has a zero gradient on every other row, so
    the update is the same as reading the whole matrix, at a fraction of the cost."""

    def __init__(self, tracker: StreamTracker, every: int, writer: DiagnosticsWriter | None,
                 embeddings: dict[str, nn.Embedding] | None = None):
        self.tracker, self.every, self.writer = tracker, every, writer
        self.ids: dict[str, list[torch.Tensor]] = {name: [] for name in embeddings or {}}
        self.handles = [module.register_forward_pre_hook(functools.partial(self._record, name), with_kwargs=True)
                        for name, module in (embeddings or {}).items()]

    def _record(self, name, module, args, kwargs):
        if torch.is_grad_enabled():  # evaluation runs without gradients and reaches no gradient row
            self.ids[name].append((args[0] if args else kwargs["input"]).detach().reshape(-1))

    def on_backward(self, step, task, engine):
        rows = {name: torch.cat(ids).unique() for name, ids in self.ids.items() if ids}
        for ids in self.ids.values():
            ids.clear()
        # An embedding whose forward did not run this step is read whole: that is always exact.
        self.tracker.update(task, engine.shared_grads(), rows)

    def on_step(self, step, engine):
        if step % self.every == 0:
            record = self.tracker.measure(step)
            if record is not None and self.writer is not None:
                record["mode"] = "stream"
                self.writer.write(record)

    def close(self):
        for handle in self.handles:
            handle.remove()
        if self.writer is not None:
            self.writer.close()


def embedding_modules(model: nn.Module, names_params: list) -> dict[str, nn.Embedding]:
    """Shared parameters that are the weight of exactly one `nn.Embedding` and of no other module (a tied
    weight gets gradient from elsewhere too), by parameter name."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    out = {}
    for name, p in names_params:
        modules = owners.get(id(p), [])
        if len(modules) == 1 and isinstance(modules[0], nn.Embedding):
            out[name] = modules[0]
    return out


def probe_batches(tasks: dict, size: int, seed: int, world_size: int, rank: int, pad_id: int, device) -> dict:
    """A fixed, seeded sample of `size` training examples per task; rank r holds its 1/W slice."""
    if size % world_size:
        raise ValueError(f"diagnostics.probe_batch_size={size} must be divisible by the world size "
                         f"{world_size} so every rank holds an equal share")
    per_rank = size // world_size
    out = {}
    for i, (name, task) in enumerate(tasks.items()):
        n = len(task.splits["train"])
        chosen = np.random.default_rng([seed, i]).choice(n, size=min(size, n), replace=False)
        mine = sorted(chosen[rank * per_rank:(rank + 1) * per_rank].tolist())
        out[name] = to_device(batch_for(task, "train", mine, pad_id), device)
    return out


def make_hooks(cfg, model, tasks: dict, dist, writer, out: Path) -> list:
    d = cfg.diagnostics
    names_params = model.shared_parameters()
    task_names = [n for n, t in tasks.items() if "train" in t.splits]
    diag_writer = DiagnosticsWriter(writer, Path(out) / "diagnostics.jsonl") if dist.is_main else None
    if d.mode == "probe":
        batches = probe_batches({n: tasks[n] for n in task_names}, d.probe_batch_size, cfg.train.seed,
                                dist.world_size, dist.rank, model.pad_id, dist.device)
        probe = GradientProbe(task_names, names_params, model.probe_loss, batches, d.every, module=model,
                              eval_mode=True, seed=cfg.train.seed)
        return [ProbeHook(probe, diag_writer)]
    if cfg.train.grad_accum != 1:
        raise ValueError("diagnostics.mode = stream reads each step's gradient; it needs train.grad_accum = 1")
    tracker = StreamTracker(task_names, names_params, beta=d.stream_beta, seed=cfg.train.seed)
    # With several ranks the engine's gradient is the rank mean, which reaches other ranks' token ids too.
    embeddings = embedding_modules(model, names_params) if dist.world_size == 1 else {}
    return [StreamHook(tracker, d.every, diag_writer, embeddings)]
