"""Measure per-task gradient geometry during training.

Two sources of per-task gradients:

* :class:`GradientProbe` - exact: every ``every`` steps, one extra backward
  per task on a fixed probe batch, at the current weights.
* :class:`StreamTracker` - free but approximate: running averages of the
  gradients each task produces on its own training steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .gram import global_group_grams
from .groups import flat_group_ids
from .stats import summarize


class GradientProbe:
    """Exact per-task gradients of the shared parameters on fixed probe batches.

    ``measure`` computes, for each task, ``loss_fn(task, probe_batches[task])``
    and its gradient w.r.t. ``named_params`` with ``torch.autograd.grad``, so
    no ``.grad`` changes and no gradient-accumulation hook fires (DeepSpeed
    ZeRO-1/2 reduce gradients from such hooks).  The parameters must be
    whole on every rank (ZeRO stage 3 partitions them and is not supported).  Parameters that get no gradient
    from a task (or do not require one) contribute zeros.  The [T, P]
    gradients go through :func:`global_group_grams`: under data parallelism
    each rank passes its own shard of each probe batch and every rank gets the
    statistics of the rank-mean gradient (equal to the full-batch gradient
    when ``loss_fn`` is a per-example mean over equal-sized shards).  Call
    ``measure`` on every rank of ``group`` at the same steps.

    Training RNG streams are not advanced: the probe runs under
    ``torch.random.fork_rng`` with a fixed ``seed`` (so any dropout in the
    probe is reproducible).  With ``module`` given and ``eval_mode=True``
    the module is switched to eval for the probe and every submodule's
    train/eval flag is restored afterwards.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        named_params: Sequence[tuple[str, nn.Parameter]],
        loss_fn: Callable[[str, Any], torch.Tensor],
        probe_batches: Mapping[str, Any],
        every: int,
        *,
        module: nn.Module | None = None,
        eval_mode: bool = True,
        seed: int = 0,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        missing = [t for t in task_names if t not in probe_batches]
        if missing:
            raise ValueError(f"no probe batch for tasks {missing}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.task_names = list(task_names)
        self.names = [name for name, _ in named_params]
        self.params = [param for _, param in named_params]
        self.loss_fn = loss_fn
        self.probe_batches = probe_batches
        self.every = every
        self.module = module
        self.eval_mode = eval_mode
        self.seed = seed
        self.group = group
        self.group_names, self.group_ids = flat_group_ids(
            self.names, [p.numel() for p in self.params]
        )
        # Half-precision gradients are widened so the Gram accumulation keeps precision.
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        # PCGrad statistics draw their order from here: same seed on every rank.
        self.rng = torch.Generator().manual_seed(seed)

    def due(self, step: int) -> bool:
        """Whether ``measure`` should run at this step (every ``every`` steps, from 0)."""
        return step % self.every == 0

    def measure(self, step: int) -> dict:
        """One diagnostics record (see :func:`diagnostics.stats.summarize`) at ``step``."""
        G = self.task_gradients()  # [T, P]
        # Moved once: the ids are as long as the parameter vector.
        self.group_ids = self.group_ids.to(G.device)
        K = global_group_grams(G, self.group_ids, len(self.group_names), group=self.group)
        return summarize(K, self.group_names, self.task_names, step, rng=self.rng)

    def task_gradients(self) -> torch.Tensor:
        """This rank's per-task gradients of the shared parameters, flattened.  -> [T, P]."""
        with _forked_rng(self.seed), self._probe_mode():
            rows = [
                self._flat_gradient(self.loss_fn(t, self.probe_batches[t])) for t in self.task_names
            ]
        return torch.stack(rows)

    def _flat_gradient(self, loss: torch.Tensor) -> torch.Tensor:
        """Gradient of ``loss`` w.r.t. the shared parameters, concatenated.  -> [P]."""
        trainable = [p for p in self.params if p.requires_grad]
        grads = torch.autograd.grad(loss, trainable, allow_unused=True) if trainable else ()
        by_param = {id(p): g for p, g in zip(trainable, grads)}
        pieces = []
        for p in self.params:
            g = by_param.get(id(p))
            if g is None:
                pieces.append(torch.zeros(p.numel(), dtype=self.dtype, device=p.device))
            else:
                pieces.append(g.reshape(-1).to(self.dtype))
        return torch.cat(pieces)

    @contextlib.contextmanager
    def _probe_mode(self) -> Iterator[None]:
        if self.module is None or not self.eval_mode:
            yield
            return
        flags = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        try:
            yield
        finally:
            for m, training in flags:
                m.training = training


@contextlib.contextmanager
def _forked_rng(seed: int) -> Iterator[None]:
    """Run with fixed CPU (and current CUDA device) seeds, restoring all RNG state after."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = [torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            # Only the current device is forked, so only it may be reseeded.
            torch.cuda.manual_seed(seed)
        yield


class StreamTracker:
    """Approximate per-task gradient geometry from the training stream, at no extra backward.

    ``update(task, grad)`` folds the shared-parameter gradient of a training
    step on ``task`` into that task's exponential moving average
    ``m_t ← β m_t + (1 − β) g`` (the first update sets ``m_t = g``).
    ``measure`` builds the same record as :class:`GradientProbe` from the
    averages.  The numbers are approximate: the averaged gradients come from
    different steps, weights and batches for different tasks, so they mix
    genuine conflict with drift; use the probe for exact values.

    ``grad`` may be this rank's local gradient or the already rank-averaged
    one: :func:`global_group_grams` averages over ranks, which leaves
    identical inputs unchanged.  Under data parallelism call ``update`` and
    ``measure`` on every rank with the same task schedule, since ``measure``
    runs collectives once all tasks are seen.  Memory: T float32 vectors of
    size P.
    """

    def __init__(
        self,
        task_names: Sequence[str],
        group_ids: torch.Tensor,
        n_groups: int,
        beta: float = 0.9,
        *,
        group_names: Sequence[str] | None = None,
        seed: int = 0,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.task_names = list(task_names)
        self.group_ids = group_ids
        self.n_groups = n_groups
        self.group_names = (
            list(group_names) if group_names is not None else [f"group{g}" for g in range(n_groups)]
        )
        if len(self.group_names) != n_groups:
            raise ValueError(f"{len(self.group_names)} group names for {n_groups} groups")
        self.beta = beta
        self.group = group
        self.rng = torch.Generator().manual_seed(seed)
        self.averages: dict[str, torch.Tensor] = {}  # task -> [P]

    def update(self, task: str, grad_vector: torch.Tensor) -> None:
        """Fold one flattened gradient [P] of ``task`` into its running average."""
        if task not in self.task_names:
            raise KeyError(f"unknown task {task!r}; tasks are {self.task_names}")
        if grad_vector.shape != self.group_ids.shape:
            raise ValueError(
                f"gradient has shape {tuple(grad_vector.shape)}, "
                f"expected {tuple(self.group_ids.shape)}"
            )
        g = grad_vector.detach().to(torch.float32)
        average = self.averages.get(task)
        if average is None:
            self.averages[task] = g.clone()
        else:
            average.mul_(self.beta).add_(g.to(average.device), alpha=1.0 - self.beta)

    def measure(self, step: int) -> dict | None:
        """A record from the running averages, or None until every task has been seen."""
        if any(t not in self.averages for t in self.task_names):
            return None
        G = torch.stack([self.averages[t] for t in self.task_names])  # [T, P]
        self.group_ids = self.group_ids.to(G.device)
        K = global_group_grams(G, self.group_ids, self.n_groups, group=self.group)
        return summarize(K, self.group_names, self.task_names, step, rng=self.rng)
