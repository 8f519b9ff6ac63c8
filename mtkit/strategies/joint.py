"""Joint steps: one optimizer step sees a batch of every task, combined by a gradient strategy.

`JointStep.passes(group)` takes every (task, batch) of one optimizer step (T tasks x grad_accum
micro-batches) and works in two phases:

1. Side passes: each batch's loss and its gradient of the shared parameters with `torch.autograd.grad` on
   the raw module (never through a loss the engine hooked, so no ZeRO hook fires), under the engine's
   autocast, in the current train/eval mode. A task's gradients are summed over its micro-batches, the
   Gram of the [T, P] result is reduced across ranks, and the strategy turns it into one weight per task.
2. Engine passes: it yields (task, batch, w_task) for the loop to run through the engine. The engine's
   forward scales only the encoder gradient by w (see `MultiTaskModel.forward`), so heads keep their own.

The weights must apply to the very gradients they were computed from. Dropout draws fresh masks on every
forward, so before yielding a batch the RNG is set back to the state its side pass started from: the
engine pass draws the same masks and its encoder gradient is exactly w_t * g_t. The engine then applies
sum_t w_t * G_t (G_t summed over micro-batches; the engine divides by the number of passes) under any
engine, ZeRO stage or world size. The RNG ends where a single pass over the batches would leave it.

Cost: every batch is forwarded and back-propagated twice (side and engine pass), about twice the compute
of a plain step on the same batches, plus T flattened gradient vectors in memory and one small reduction.
A strategy whose weights do not depend on the Gram (`sum`) skips the side passes: one pass per batch, the
same masks and the same update as with them (tested).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from mtkit.strategies.base import Strategy


class JointStep:
    def __init__(self, strategy: Strategy, model: torch.nn.Module,
                 gram_fn: Callable[[torch.Tensor], torch.Tensor],
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        """gram_fn: local per-task gradients [T, P] -> Gram [T, T] of the global (rank-mean) gradients.
        autocast: the engine's precision context, so the side passes compute what the engine passes do."""
        self.strategy = strategy
        self.model = model
        self.params = [p for _, p in model.shared_parameters()]
        self.gram_fn = gram_fn
        self.autocast = autocast

    def passes(self, group: list[tuple[str, dict]]) -> Iterator[tuple[str, dict, float]]:
        """group: every (task, batch) of one optimizer step. Yields (task, batch, weight) for the engine;
        run each yielded pass before taking the next (the RNG is set for it)."""
        if not self.strategy.uses_gram:  # weights that ignore the Gram: nothing to measure, one pass per batch
            tasks = list(dict.fromkeys(task for task, _ in group))
            w = self.strategy.weights(torch.zeros(len(tasks), len(tasks), dtype=torch.float64))  # [T]
            for task, batch in group:
                yield task, batch, float(w[tasks.index(task)])
            return
        states, sums = [], {}                                                  # sums: task -> [P]
        for task, batch in group:
            states.append(_rng_state())
            g = self._gradient(task, batch)
            sums[task] = sums[task].add_(g) if task in sums else g
        tasks = list(sums)
        w = self.strategy.weights(self.gram_fn(torch.stack([sums.pop(t) for t in tasks])))  # [T]
        for (task, batch), state in zip(group, states):
            _set_rng_state(state)
            yield task, batch, float(w[tasks.index(task)])

    def _gradient(self, task: str, batch: dict) -> torch.Tensor:
        """d loss / d shared parameters, flattened [P] in float32 (zeros where the loss does not reach)."""
        with self.autocast():
            loss = self.model(task, batch)
        # A frozen encoder under a parameter-free head leaves nothing to differentiate.
        grads = (torch.autograd.grad(loss, self.params, allow_unused=True) if loss.requires_grad
                 else [None] * len(self.params))
        return torch.cat([(g if g is not None else torch.zeros_like(p)).float().flatten()
                          for g, p in zip(grads, self.params)])

    def state_dict(self) -> dict:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state)


def _rng_state() -> tuple:
    """The CPU and (current device's) CUDA generator states: dropout draws from one of them."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
