"""The shared helper for tests on spawned gloo ranks (`distributed_util.spawn_ranks`): its ranks are forked
from a server started once, so these check that each spawn still behaves as a fresh start would."""
from __future__ import annotations

import functools
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from distributed_util import spawn_ranks


def _what_a_rank_sees(rank: int) -> dict:
    total = torch.tensor([rank + 1])
    dist.all_reduce(total)
    return {"env": os.environ.get("MTKIT_TEST_SPAWN_VALUE"), "cwd": os.getcwd(), "threads": torch.get_num_threads(),
            "omp": os.environ.get("OMP_NUM_THREADS"), "sum": int(total), "world": dist.get_world_size()}


def test_ranks_see_the_environment_and_folder_of_the_spawn_and_one_thread(tmp_path, monkeypatch):
    threads = os.environ.get("OMP_NUM_THREADS")
    for value in ("first", "second"):  # the server started before either value was set
        monkeypatch.setenv("MTKIT_TEST_SPAWN_VALUE", value)
        (tmp_path / value).mkdir()
        monkeypatch.chdir(tmp_path / value)
        ranks = spawn_ranks(_what_a_rank_sees, tmp_path / f"ranks_{value}", world=2)
        assert ranks == [{"env": value, "cwd": str(tmp_path / value), "threads": 1, "omp": "1", "sum": 3,
                          "world": 2}] * 2
    assert os.environ.get("OMP_NUM_THREADS") == threads  # one thread for the ranks, not for the tests


def _rank_1_fails(folder: str, how: str, rank: int) -> dict:
    """Rank 1 fails once both ranks are up; rank 0 then leaves quietly, so that rank 1's failure is the only
    one (a rank left in a collective, or in the helper's barrier, would fail too and might be seen first)."""
    dist.barrier()
    failing = Path(folder) / "failing"
    if rank == 1:
        failing.touch()
        if how == "raise":
            raise ValueError("a mistake on rank 1")
        print("rank 1 about to die", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would; an abort could leave a core file
    while not failing.exists():
        time.sleep(0.01)
    os._exit(0)


def test_a_rank_killed_by_a_signal_is_named_with_the_end_of_its_output(tmp_path):
    with pytest.raises(pytest.fail.Exception) as failure:
        spawn_ranks(functools.partial(_rank_1_fails, str(tmp_path), "kill"), tmp_path, world=2, timeout_s=60)
    message = str(failure.value)
    assert "rank 1 " in message and "died with signal SIGKILL and no Python error" in message, message
    assert "--- end of rank1.log ---\nrank 1 about to die" in message, message


def test_a_rank_that_raises_is_named_with_its_error(tmp_path):
    with pytest.raises(pytest.fail.Exception) as failure:
        spawn_ranks(functools.partial(_rank_1_fails, str(tmp_path), "raise"), tmp_path, world=2, timeout_s=60)
    message = str(failure.value)
    assert message.startswith("rank 1 raised; results written: []"), message
    assert "ValueError: a mistake on rank 1" in message, message
