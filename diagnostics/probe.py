"""Measure per-task gradient geometry during training.

Two sources of per-task gradients:

* :class:`GradientProbe` - exact: every ``every`` steps, one extra backward
  per task on a fixed probe batch, at the current weights.
* :class:`StreamTracker` - free but approximate: running averages of the
  gradients each task produces on its own training steps.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .gram import global_group_grams, param_grams
from .groups import flat_group_ids, group_index
from .stats import summarize

Grads = list[torch.Tensor | None]  # one entry per parameter; None where it has no gradient


def _world_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


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
        self.group_names, self.param_groups = group_index(self.names)
        self.group_ids: torch.Tensor | None = None  # per element, built when first needed (multi-rank)
        # Half-precision gradients are widened so the Gram accumulation keeps precision.
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        # PCGrad statistics draw their order from here: same seed on every rank.
        self.rng = torch.Generator().manual_seed(seed)

    def due(self, step: int) -> bool:
        """Whether ``measure`` should run at this step (every ``every`` steps, from 0)."""
        return step % self.every == 0

    def measure(self, step: int) -> dict:
        """One diagnostics record (see :func:`diagnostics.stats.summarize`) at ``step``."""
        grads = self.parameter_gradients()
        if _world_size(self.group) == 1:
            # One process: the Gram is summed parameter by parameter, with no [T, P] copy.
            K = param_grams(grads, self.param_groups, len(self.group_names))
        else:
            G = _flatten(grads, self.params, self.dtype)  # [T, P]
            if self.group_ids is None:  # as long as the parameter vector: built once
                self.group_ids = flat_group_ids(self.names, [p.numel() for p in self.params])[1]
            self.group_ids = self.group_ids.to(G.device)
            K = global_group_grams(G, self.group_ids, len(self.group_names), group=self.group)
        return summarize(K, self.group_names, self.task_names, step, rng=self.rng)

    def task_gradients(self) -> torch.Tensor:
        """This rank's per-task gradients of the shared parameters, flattened.  -> [T, P]."""
        return _flatten(self.parameter_gradients(), self.params, self.dtype)

    def parameter_gradients(self) -> list[Grads]:
        """This rank's gradient of each parameter for each task: ``[param][task]``, None for none."""
        with _forked_rng(self.seed), self._probe_mode():
            per_task = [self._gradients(self.loss_fn(t, self.probe_batches[t])) for t in self.task_names]
        return [list(column) for column in zip(*per_task)]

    def _gradients(self, loss: torch.Tensor) -> Grads:
        """Gradient of ``loss`` w.r.t. each shared parameter (None where it does not reach one)."""
        trainable = [p for p in self.params if p.requires_grad]
        grads = torch.autograd.grad(loss, trainable, allow_unused=True) if trainable else ()
        by_param = {id(p): g for p, g in zip(trainable, grads)}
        return [by_param.get(id(p)) for p in self.params]

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


def _flatten(grads: list[Grads], params: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``[param][task]`` gradients -> [T, P] in ``dtype``, zeros where a parameter has none."""
    rows = zip(*grads) if grads else ()
    return torch.stack([
        torch.cat([
            torch.zeros(p.numel(), dtype=dtype, device=p.device) if g is None else g.reshape(-1).to(dtype)
            for g, p in zip(row, params)
        ])
        for row in rows
    ])


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

    ``update(task, grads)`` folds the shared-parameter gradient of a training
    step on ``task`` into that task's exponential moving average
    ``m_t ← β m_t + (1 − β) g`` (the first update sets ``m_t = g``).
    ``measure`` builds the same record as :class:`GradientProbe` from the
    averages.  The numbers are approximate: the averaged gradients come from
    different steps, weights and batches for different tasks, so they mix
    genuine conflict with drift; use the probe for exact values.

    Cost: each average is kept per parameter as ``m_t = s_t u_t`` with a
    scalar ``s_t``, so the update is ``s_t ← β s_t``, ``u_t ← u_t + (1 −
    β)/s_t · g``: the same formula in real arithmetic, one in-place pass over
    the gradient, no copy of it, and ``u_t`` is left alone wherever ``g`` is
    zero.  That makes embedding matrices cheap: ``rows`` names, per
    parameter, the only rows its gradient can reach (a batch's token ids), and
    just those rows are added.  ``s_t`` is folded back into ``u_t`` before it
    gets small, so ``u_t`` stays within float32 range.  The Gram is formed
    only in ``measure``.

    ``grads`` may be this rank's local gradient or the already rank-averaged
    one: :func:`global_group_grams` averages over ranks, which leaves
    identical inputs unchanged.  Under data parallelism call ``update`` and
    ``measure`` on every rank with the same task schedule, since ``measure``
    runs collectives once all tasks are seen.  Memory: T float32 copies of
    the parameters.
    """

    # s_t is folded into u_t below this, so u_t is at most 2^20 times larger than the average.
    MIN_SCALE = 2.0 ** -20

    def __init__(
        self,
        task_names: Sequence[str],
        named_params: Sequence[tuple[str, torch.Tensor]],
        beta: float = 0.9,
        *,
        seed: int = 0,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.task_names = list(task_names)
        self.names = [name for name, _ in named_params]
        self.index = {name: k for k, name in enumerate(self.names)}
        self.shapes = [tuple(p.shape) for _, p in named_params]
        self.group_names, self.param_groups = group_index(self.names)
        self.beta = beta
        self.group = group
        self.rng = torch.Generator().manual_seed(seed)
        self.sums: dict[str, list[torch.Tensor]] = {}  # task -> u_t, one float32 tensor per parameter
        self.scales: dict[str, float] = {}  # task -> s_t

    def update(
        self,
        task: str,
        grads: Sequence[torch.Tensor | None] | torch.Tensor,
        rows: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Fold one gradient of ``task`` into its running average.

        grads: one tensor per parameter (None for a zero gradient), or the
        parameters' gradients flattened into one vector [P].  rows: {parameter
        name: row indices [R]}, a promise that the gradient of that parameter
        is zero outside those rows (of its first dimension); others are read whole.
        """
        if task not in self.task_names:
            raise KeyError(f"unknown task {task!r}; tasks are {self.task_names}")
        grads = self._per_parameter(grads)
        rows = rows or {}
        if not rows.keys() <= self.index.keys():
            raise ValueError(f"rows given for unknown parameters {sorted(rows.keys() - self.index.keys())}")
        sparse = {self.index[name]: r for name, r in rows.items()}
        sums = self.sums.get(task)
        if sums is None or self.beta == 0.0:
            device = next((g.device for g in grads if g is not None), None)
            self.sums[task] = [
                torch.zeros(shape, device=device) if g is None else g.detach().to(torch.float32, copy=True)
                for g, shape in zip(grads, self.shapes)
            ]
            self.scales[task] = 1.0
            return
        scale = self.scales[task] * self.beta
        alpha = (1.0 - self.beta) / scale
        dense_sums, dense_grads = [], []
        for k, (u, g) in enumerate(zip(sums, grads)):
            if g is None:
                continue
            g = g.detach().to(torch.float32)
            if k in sparse:
                r = sparse[k].to(g.device)
                u.index_add_(0, r, g.index_select(0, r), alpha=alpha)
            else:
                dense_sums.append(u)
                dense_grads.append(g)
        if dense_sums:
            torch._foreach_add_(dense_sums, dense_grads, alpha=alpha)
        if scale < self.MIN_SCALE:
            torch._foreach_mul_(sums, scale)
            scale = 1.0
        self.scales[task] = scale

    def averages(self) -> dict[str, torch.Tensor]:
        """Each seen task's running average m_t, flattened: {task: [P]} (a copy)."""
        return {t: torch.cat([u.reshape(-1) for u in us]) * self.scales[t] for t, us in self.sums.items()}

    def measure(self, step: int) -> dict | None:
        """A record from the running averages, or None until every task has been seen."""
        if any(t not in self.sums for t in self.task_names):
            return None
        n_groups = len(self.group_names)
        if _world_size(self.group) == 1:
            grads = [[self.sums[t][k] for t in self.task_names] for k in range(len(self.names))]
            K = param_grams(grads, self.param_groups, n_groups)
            s = torch.tensor([self.scales[t] for t in self.task_names], dtype=torch.float64)  # [T]
            K *= (s[:, None] * s[None, :]).to(K.device)  # Gram of s_t u_t
        else:
            averages = self.averages()
            G = torch.stack([averages[t] for t in self.task_names])  # [T, P]
            ids = flat_group_ids(self.names, [math.prod(shape) for shape in self.shapes])[1].to(G.device)
            K = global_group_grams(G, ids, n_groups, group=self.group)
        return summarize(K, self.group_names, self.task_names, step, rng=self.rng)

    def _per_parameter(self, grads: Sequence[torch.Tensor | None] | torch.Tensor) -> list:
        numels = [math.prod(shape) for shape in self.shapes]
        if isinstance(grads, torch.Tensor):
            if grads.shape != (sum(numels),):
                raise ValueError(f"gradient has shape {tuple(grads.shape)}, expected ({sum(numels)},)")
            return [g.view(shape) for g, shape in zip(grads.split(numels), self.shapes)]
        grads = list(grads)
        if len(grads) != len(self.shapes):
            raise ValueError(f"{len(grads)} gradients for {len(self.shapes)} parameters")
        for name, g, shape in zip(self.names, grads, self.shapes):
            if g is not None and tuple(g.shape) != shape:
                raise ValueError(f"gradient of {name} has shape {tuple(g.shape)}, expected {shape}")
        return grads
