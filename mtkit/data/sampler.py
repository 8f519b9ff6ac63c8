"""Task-aware, length-bucketed, distributed batch sampler.

Every step trains one task on one global batch; each of the W ranks receives
its own disjoint slice of that global batch.

Epoch length
------------
With ``n_t`` the number of training examples of task ``t`` and
``B_t = b_t * W`` its global batch size (``b_t`` = per-rank batch size,
``W`` = world size), one epoch is::

    L = sum_t ceil(n_t / B_t)    global steps

unless ``steps_per_epoch`` is given, which replaces ``L``. ``L`` does not
depend on the schedule. Task ``t`` gets ``c_t`` of those steps, where ``c_t``
is the schedule's share of ``t`` (computed from the per-task batch counts
``ceil(n_t / B_t)``) times ``L``, rounded by the largest-remainder method so
that ``sum_t c_t == L`` exactly; a task with share 0 gets 0 steps. Under
``proportional`` this gives ``c_t = ceil(n_t / B_t)``, i.e. about one pass
over each task.

Passes and dropped examples
---------------------------
Each task has an endless stream of global batches made of passes over its
data. A pass takes a seeded permutation of the task's indices, drops the last
``n_t mod B_t`` of them (training uses full global batches only, so these
examples are skipped in that pass; the next pass drops different ones), cuts
the rest into chunks of ``bucket`` global batches, sorts each chunk by token
length, cuts it into global batches and shuffles the order of all global
batches of the pass. A task scheduled for more steps than one pass holds (for
example ``ceil`` instead of ``floor`` above) simply continues into a fresh
pass with a new permutation.

Determinism
-----------
All randomness comes from ``numpy.random.default_rng`` seeded by
``(seed, epoch)`` for the task sequence and ``(seed, epoch, task index)`` for a
task's batches, so every rank computes the same plan and the plan does not
depend on what was iterated before. As with torch's ``DistributedSampler``, a
new ``__iter__`` replays the current epoch until ``set_epoch`` is called.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from mtkit.data.schedules import Schedule

# Separate seed-sequence branches for the task order and the per-task batches.
_ORDER_STREAM = 0
_BATCH_STREAM = 1


class TaskBatchSampler:
    """Yields ``(task_name, indices)`` with the indices meant for this rank.

    ``lengths[task][i]`` is the token length of example ``i`` of ``task``;
    ``batch_size`` is per rank, for all tasks or per task.
    """

    def __init__(
        self,
        lengths: dict[str, Sequence[int]],
        batch_size: int | dict[str, int],
        schedule: Schedule,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        bucket: int = 50,
        steps_per_epoch: int | None = None,
    ) -> None:
        if not lengths:
            raise ValueError("no tasks given")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
        _check_non_negative("seed", seed)

        self.tasks = list(lengths)
        self.batch_sizes = _per_task_batch_sizes(batch_size, self.tasks)
        self.lengths = {task: np.asarray(lengths[task], dtype=np.int64) for task in self.tasks}
        for task in self.tasks:
            n, global_batch = len(self.lengths[task]), self.batch_sizes[task] * world_size
            if n == 0:
                raise ValueError(f"task {task!r} has no examples")
            if n < global_batch:
                raise ValueError(
                    f"task {task!r} has {n} examples, fewer than one global batch of "
                    f"{global_batch} (batch size {self.batch_sizes[task]} x world size {world_size})"
                )

        self.schedule = schedule
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.bucket = bucket
        batches = {
            task: math.ceil(len(self.lengths[task]) / (self.batch_sizes[task] * world_size))
            for task in self.tasks
        }
        self.steps_per_epoch = steps_per_epoch or sum(batches.values())
        self._counts = schedule.allocate(batches, self.steps_per_epoch)

        self.epoch = 0
        self._step = 0
        # Set by load_state_dict and consumed by the next __iter__.
        self._resume_step: int | None = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    def task_counts(self) -> dict[str, int]:
        """Steps per task in the current epoch."""
        return dict(self._counts)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate.

        A pending resume from ``load_state_dict`` survives when ``epoch`` is
        the restored epoch, so ``load_state_dict(...)`` followed by the usual
        ``set_epoch(epoch)`` at the top of the epoch loop still resumes.
        """
        _check_non_negative("epoch", epoch)
        if epoch != self.epoch:
            self._resume_step = None
        self.epoch = epoch
        self._step = self._resume_step or 0

    def state_dict(self) -> dict[str, int]:
        """``step`` is the number of batches already yielded in the current epoch."""
        return {"epoch": self.epoch, "step": self._step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a state so the next ``__iter__`` starts at the next batch."""
        if not 0 <= state["step"] <= len(self):
            raise ValueError(f"step must be in [0, {len(self)}], got {state['step']}")
        _check_non_negative("seed", state["seed"])
        _check_non_negative("epoch", state["epoch"])
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self._step = state["step"]
        self._resume_step = state["step"]

    def __iter__(self) -> Iterator[tuple[str, list[int]]]:
        start = self._resume_step or 0
        self._resume_step = None
        self._step = start
        return self._iterate(start)

    def _iterate(self, start: int) -> Iterator[tuple[str, list[int]]]:
        streams = {task: self._task_stream(i, task) for i, task in enumerate(self.tasks)}
        order_rng = np.random.default_rng([self.seed, self.epoch, _ORDER_STREAM])
        sequence = self.schedule.order(self._counts, order_rng)
        for step, task in enumerate(sequence):
            # Skipped steps still advance the stream so a resume sees the same batches.
            global_batch = next(streams[task])
            if step < start:
                continue
            self._step = step + 1
            b = self.batch_sizes[task]
            yield task, global_batch[self.rank * b : (self.rank + 1) * b].tolist()

    def _task_stream(self, task_index: int, task: str) -> Iterator[np.ndarray]:
        """Endless global batches of one task, pass after pass."""
        rng = np.random.default_rng([self.seed, self.epoch, _BATCH_STREAM, task_index])
        lengths = self.lengths[task]
        global_batch = self.batch_sizes[task] * self.world_size
        n_full = len(lengths) // global_batch * global_batch
        chunk = self.bucket * global_batch
        while True:
            # Dropping before sorting keeps the dropped examples random; dropping
            # the short tail of the last sorted chunk would favour long examples.
            perm = rng.permutation(len(lengths))[:n_full]
            batches = []
            for begin in range(0, n_full, chunk):
                part = perm[begin : begin + chunk]
                part = part[np.argsort(lengths[part], kind="stable")]
                batches.extend(part.reshape(-1, global_batch))
            for i in rng.permutation(len(batches)):
                yield batches[i]


def shard_for_eval(n: int, world_size: int, rank: int) -> list[int]:
    """Contiguous block of ``range(n)`` for ``rank``; blocks differ in size by at most 1.

    Concatenating the blocks of ranks 0..W-1 gives ``range(n)`` exactly once,
    with no padding, so gathered predictions can be put back in order.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(n, world_size)
    begin = rank * base + min(rank, extra)
    return list(range(begin, begin + base + (rank < extra)))


def _per_task_batch_sizes(batch_size: int | Mapping[str, int], tasks: list[str]) -> dict[str, int]:
    if isinstance(batch_size, Mapping):
        missing = [t for t in tasks if t not in batch_size]
        unknown = [t for t in batch_size if t not in tasks]
        if missing or unknown:
            raise ValueError(f"batch_size has no entry for {missing} and unknown tasks {unknown}")
        sizes = {task: batch_size[task] for task in tasks}
    else:
        sizes = {task: batch_size for task in tasks}
    bad = {task: b for task, b in sizes.items() if b < 1}
    if bad:
        raise ValueError(f"batch size must be >= 1, got {bad}")
    return sizes


def _check_non_negative(name: str, value: int) -> None:
    # numpy seed sequences only accept non-negative integers.
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
