import math
from collections import Counter

import numpy as np
import pytest

from mtkit.data.sampler import TaskBatchSampler, shard_for_eval
from mtkit.data.schedules import SCHEDULES, largest_remainder, make_schedule

# Distinct lengths so "sorted by length" has exactly one meaning.
TOY = {"toy": np.random.default_rng(123).permutation(np.arange(10, 10 + 3 * 25, 3)).tolist()}
THREE = {
    "a": [5 + i % 7 for i in range(25)],
    "b": [3 + (i * 5) % 11 for i in range(40)],
    "c": [20 - i for i in range(13)],
}


def make_ranks(lengths, world_size, schedule="proportional", batch_size=2, **kwargs):
    return [
        TaskBatchSampler(
            lengths, batch_size, make_schedule(schedule), world_size=world_size, rank=r, **kwargs
        )
        for r in range(world_size)
    ]


def global_batches(samplers):
    """Per step: the task and the rank slices concatenated in rank order."""
    runs = [list(s) for s in samplers]
    return [
        (steps[0][0], [i for _, idx in steps for i in idx]) for steps in zip(*runs, strict=True)
    ]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("lengths", [TOY, THREE], ids=["toy", "three"])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_ranks_agree_and_shards_are_disjoint(world_size, lengths, schedule):
    samplers = make_ranks(lengths, world_size, schedule)
    runs = [list(s) for s in samplers]
    assert [len(s) for s in samplers] == [len(samplers[0])] * world_size
    assert [len(run) for run in runs] == [len(samplers[0])] * world_size
    assert all([t for t, _ in run] == [t for t, _ in runs[0]] for run in runs)
    for steps in zip(*runs):
        shards = [idx for _, idx in steps]
        assert all(len(shard) == 2 for shard in shards)
        assert len(set().union(*shards)) == 2 * world_size


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_first_pass_covers_all_but_remainder_once(world_size):
    # The first floor(n / B) global batches of a task form one pass: every
    # example exactly once except n mod B dropped ones.
    steps = global_batches(make_ranks(THREE, world_size))
    for task, lengths in THREE.items():
        n, global_batch = len(lengths), 2 * world_size
        first_pass = [idx for t, idx in steps if t == task][: n // global_batch]
        seen = [i for idx in first_pass for i in idx]
        assert len(seen) == len(set(seen)) == n - n % global_batch
        assert set(seen) <= set(range(n))


def test_single_task_epoch_continues_into_second_pass():
    # 25 rows, B = 4: 7 steps = 6 full batches (24 rows, 1 dropped) + 1 from pass two.
    steps = global_batches(make_ranks(TOY, world_size=2))
    assert len(steps) == 7
    assert len({i for _, idx in steps[:6] for i in idx}) == 24
    assert len(set(steps[6][1])) == 4


def test_epoch_length_and_counts():
    sampler = TaskBatchSampler(
        THREE, {"a": 1, "b": 4, "c": 1}, make_schedule("proportional"), world_size=2
    )
    expected = {"a": math.ceil(25 / 2), "b": math.ceil(40 / 8), "c": math.ceil(13 / 2)}
    assert sampler.task_counts() == expected == {"a": 13, "b": 5, "c": 7}
    assert len(sampler) == 25
    assert Counter(t for t, _ in sampler) == expected
    assert {t: len(idx) for t, idx in sampler} == {"a": 1, "b": 4, "c": 1}

    overridden = TaskBatchSampler(THREE, 2, make_schedule("round_robin"), steps_per_epoch=10)
    assert len(overridden) == 10 == len(list(overridden))
    assert overridden.task_counts() == {"a": 4, "b": 3, "c": 3}


def test_largest_remainder():
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    assert largest_remainder(weights, 7) == {"a": 4, "b": 2, "c": 1}
    # Plain rounding would give 5 + 3 + 2 = 10.
    assert largest_remainder(weights, 9) == {"a": 4, "b": 3, "c": 2}
    assert largest_remainder({"a": 0.0, "b": 1 / 3, "c": 2 / 3}, 4) == {"a": 0, "b": 1, "c": 3}


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0, math.inf])
def test_temperature_shares(temperature):
    sampler = TaskBatchSampler(
        THREE, 1, make_schedule("temperature", temperature), steps_per_epoch=1000
    )
    counts = sampler.task_counts()
    raw = {t: len(v) ** (1 / temperature) for t, v in THREE.items()}
    shares = {t: w / sum(raw.values()) for t, w in raw.items()}
    assert sum(counts.values()) == 1000
    assert counts == largest_remainder(shares, 1000)
    assert all(abs(counts[t] - 1000 * shares[t]) < 1 for t in THREE)
    assert Counter(t for t, _ in sampler) == counts


def test_temperature_limits():
    def counts(schedule):
        return TaskBatchSampler(THREE, 1, schedule, steps_per_epoch=100).task_counts()

    assert counts(make_schedule("temperature", 1.0)) == counts(make_schedule("proportional"))
    assert counts(make_schedule("proportional")) == {"a": 32, "b": 51, "c": 17}
    assert counts(make_schedule("temperature", math.inf)) == {"a": 34, "b": 33, "c": 33}


def test_round_robin_order():
    sampler = TaskBatchSampler(THREE, 2, make_schedule("round_robin"), steps_per_epoch=10)
    assert [t for t, _ in sampler] == ["a", "b", "c"] * 3 + ["a"]
    # Unequal counts are spread out rather than bunched.
    order = make_schedule("round_robin").order({"x": 4, "y": 2}, np.random.default_rng(0))
    assert order == ["x", "y", "x", "x", "y", "x"]
    order = make_schedule("round_robin").order({"x": 1, "y": 3}, np.random.default_rng(0))
    assert order == ["y", "x", "y", "y"]


def test_seed_and_epoch_determine_the_order():
    def run(seed=0, epoch=0):
        sampler = TaskBatchSampler(THREE, 2, make_schedule("proportional"), seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert run() == run()
    assert run(seed=1) != run()
    assert run(epoch=1) != run()
    assert [t for t, _ in run(seed=1)] != [t for t, _ in run()]

    sampler = TaskBatchSampler(THREE, 2, make_schedule("proportional"))
    first = list(sampler)
    assert list(sampler) == first  # no set_epoch: the same epoch again
    sampler.set_epoch(1)
    assert list(sampler) == run(epoch=1)
    sampler.set_epoch(0)
    assert list(sampler) == first


def mean_spread(bucket):
    lengths = np.array(TOY["toy"])
    steps = global_batches(make_ranks(TOY, 2, bucket=bucket))
    return np.mean([np.ptp(lengths[idx]) for _, idx in steps])


def test_batches_are_length_bucketed():
    # bucket=50 holds the whole pass in one chunk: the 6 global batches of the
    # first pass are consecutive runs of the sorted 24 kept examples.
    lengths = np.array(TOY["toy"])
    steps = global_batches(make_ranks(TOY, 2))[:6]
    runs = sorted((lengths[idx].tolist() for _, idx in steps), key=lambda run: run[0])
    joined = [x for run in runs for x in run]
    assert joined == sorted(joined) and len(joined) == 24
    # bucket=1 sorts only inside each batch, i.e. no bucketing at all.
    assert mean_spread(50) < 0.4 * mean_spread(1)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("stop", [0, 5, 13])
def test_mid_epoch_resume(world_size, stop):
    for rank in range(world_size):
        def fresh():
            return TaskBatchSampler(
                THREE, 2, make_schedule("temperature"), seed=3, world_size=world_size, rank=rank
            )

        sampler = fresh()
        sampler.set_epoch(2)
        full = list(sampler)
        it = iter(sampler)
        head = [next(it) for _ in range(stop)]
        state = sampler.state_dict()
        assert state == {"epoch": 2, "step": stop, "seed": 3}
        assert head == full[:stop]

        resumed = fresh()
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # the training loop's call must keep the resume
        assert list(resumed) == full[stop:]
        assert resumed.state_dict()["step"] == len(full)
        assert list(resumed) == full  # afterwards the epoch replays from the start


def test_set_epoch_to_another_epoch_drops_resume():
    sampler = TaskBatchSampler(THREE, 2, make_schedule("proportional"))
    sampler.load_state_dict({"epoch": 0, "step": 5, "seed": 0})
    sampler.set_epoch(1)
    assert sampler.state_dict()["step"] == 0
    assert len(list(sampler)) == len(sampler)


def test_errors():
    schedule = make_schedule("proportional")
    with pytest.raises(ValueError, match="'empty' has no examples"):
        TaskBatchSampler({"a": [1, 2], "empty": []}, 1, schedule)
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        TaskBatchSampler(THREE, 0, schedule)
    with pytest.raises(ValueError, match="no entry for \\['b'\\]"):
        TaskBatchSampler(THREE, {"a": 1, "c": 1}, schedule)
    with pytest.raises(ValueError, match="'small' has 5 examples.*global batch of 6"):
        TaskBatchSampler({"small": [1] * 5}, 2, schedule, world_size=3, rank=0)
    with pytest.raises(ValueError, match="rank must be in"):
        TaskBatchSampler(THREE, 1, schedule, world_size=2, rank=2)
    with pytest.raises(ValueError, match="no tasks"):
        TaskBatchSampler({}, 1, schedule)
    with pytest.raises(ValueError, match="valid names: proportional, round_robin, temperature"):
        make_schedule("uniform")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        make_schedule("temperature", 0.0)
    with pytest.raises(ValueError, match="step must be in"):
        TaskBatchSampler(THREE, 2, schedule).load_state_dict({"epoch": 0, "step": 999, "seed": 0})


@pytest.mark.parametrize("n", [0, 1, 7, 25])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_for_eval(n, world_size):
    shards = [shard_for_eval(n, world_size, r) for r in range(world_size)]
    assert [i for shard in shards for i in shard] == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
