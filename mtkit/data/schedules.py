"""Task schedules: how the steps of an epoch are shared among tasks.

A schedule turns per-task sizes (the number of training batches of each task
in one epoch) into normalised shares. ``Schedule.allocate`` rounds the shares
times the epoch length to whole step counts with the largest-remainder method,
and ``Schedule.order`` arranges those steps into the epoch's task sequence.
How long an epoch is, is decided by the sampler (see ``mtkit.data.sampler``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable

import numpy as np


def largest_remainder(weights: dict[str, float], total: int) -> dict[str, int]:
    """Round ``weights[t] * total`` to integers that sum exactly to ``total``.

    Every task gets the floor of its quota; the steps still missing go, one
    each, to the tasks with the largest fractional parts (ties: earlier task
    first). Tasks with weight 0 always get 0.
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    quotas = {task: w * total for task, w in weights.items()}
    counts = {task: math.floor(q) for task, q in quotas.items()}
    missing = total - sum(counts.values())
    position = {task: i for i, task in enumerate(weights)}
    # Zero-weight tasks are excluded so float error can never hand them a step.
    candidates = sorted(
        (task for task in weights if weights[task] > 0),
        key=lambda task: (-(quotas[task] - counts[task]), position[task]),
    )
    for task in candidates[:missing]:
        counts[task] += 1
    return counts


class Schedule(ABC):
    """Decides each task's share of an epoch and the order of the steps."""

    name: str

    @abstractmethod
    def weights(self, sizes: dict[str, int]) -> dict[str, float]:
        """Normalised share of each task, given its number of training batches."""

    def allocate(self, sizes: dict[str, int], total: int) -> dict[str, int]:
        """Steps per task for an epoch of ``total`` steps."""
        return largest_remainder(self.weights(sizes), total)

    def order(self, counts: dict[str, int], rng: np.random.Generator) -> list[str]:
        """The epoch's task sequence: here a seeded shuffle of all steps."""
        steps = [task for task, count in counts.items() for _ in range(count)]
        return [steps[i] for i in rng.permutation(len(steps))]


def _normalise(raw: dict[str, float]) -> dict[str, float]:
    total = sum(raw.values())
    if not raw or total <= 0:
        raise ValueError(f"cannot derive task shares from sizes {raw}")
    return {task: value / total for task, value in raw.items()}


def _check_sizes(sizes: dict[str, int]) -> None:
    negative = {task: n for task, n in sizes.items() if n < 0}
    if negative:
        raise ValueError(f"task sizes must be >= 0, got {negative}")


class RoundRobin(Schedule):
    """Equal share for every task, interleaved deterministically."""

    name = "round_robin"

    def weights(self, sizes: dict[str, int]) -> dict[str, float]:
        _check_sizes(sizes)
        return _normalise({task: 1.0 for task in sizes})

    def order(self, counts: dict[str, int], rng: np.random.Generator) -> list[str]:
        # Step k of a task sits at (k + 0.5) / count along the epoch, so tasks
        # with unequal counts are spread evenly; equal counts give t0,t1,t2,t0,...
        keyed = [
            ((k + 0.5) / count, index, task)
            for index, (task, count) in enumerate(counts.items())
            for k in range(count)
        ]
        return [task for _, _, task in sorted(keyed)]


class Proportional(Schedule):
    """Share proportional to the task's number of training batches."""

    name = "proportional"

    def weights(self, sizes: dict[str, int]) -> dict[str, float]:
        _check_sizes(sizes)
        return _normalise({task: float(n) for task, n in sizes.items()})


class Temperature(Schedule):
    """Share proportional to ``n ** (1 / T)`` (n = number of training batches).

    ``T = 1`` equals ``proportional``; as ``T`` grows the shares approach
    uniform (``T = inf`` is allowed and gives uniform over non-empty tasks).
    """

    name = "temperature"

    def __init__(self, temperature: float = 2.0) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def weights(self, sizes: dict[str, int]) -> dict[str, float]:
        _check_sizes(sizes)
        # Guard n = 0 explicitly: 0 ** 0 == 1 would give empty tasks a share at T = inf.
        return _normalise(
            {task: n ** (1.0 / self.temperature) if n > 0 else 0.0 for task, n in sizes.items()}
        )


SCHEDULES: dict[str, Callable[[float], Schedule]] = {
    "round_robin": lambda temperature: RoundRobin(),
    "proportional": lambda temperature: Proportional(),
    "temperature": Temperature,
}


def make_schedule(name: str, temperature: float = 2.0) -> Schedule:
    """Build a schedule by name; ``temperature`` is used by ``temperature`` only."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[name](temperature)
