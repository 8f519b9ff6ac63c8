"""Timeouts of `mtkit.distributed` on two gloo ranks: a hung rank ends the collective it never joins at the
collective timeout, while a barrier waits for a rank that is slow (writing the best model, say) for longer."""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import torch

from distributed_util import spawn_ranks
from mtkit.distributed import init_distributed

# The collective timeout also bounds the rendezvous: the ranks start it together (below).
COLLECTIVE_S = 2
SLOW_S = COLLECTIVE_S + 1
BARRIER_S = 120


def _slow_then_hung(store: str, rank: int) -> dict:
    """Rank 0 is slow to reach a barrier (longer than the collective timeout); rank 1 waits there. Then rank
    0 starts an all-reduce that rank 1, hung, never joins (it waits in the helper for rank 0's result)."""
    folder = Path(store).parent
    (folder / f"started{rank}").touch()
    while not all((folder / f"started{r}").exists() for r in (0, 1)):
        time.sleep(0.02)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank))
    dist = init_distributed("cpu", timeout_s=COLLECTIVE_S, barrier_timeout_s=BARRIER_S,
                            init_method=f"file://{store}")
    if rank == 0:
        time.sleep(SLOW_S)
    start = time.monotonic()
    dist.barrier()
    result = {"barrier_s": time.monotonic() - start}
    if rank == 0:
        start = time.monotonic()
        try:
            dist.any(torch.ones(1, dtype=torch.int32))
            result["error"] = None
        except RuntimeError as e:
            result["error"] = str(e)
        result["all_reduce_s"] = time.monotonic() - start
    return result


def test_collectives_time_out_but_barriers_wait_for_a_slow_rank(tmp_path):
    (tmp_path / "rendezvous").mkdir()
    # The ranks build their group through mtkit, with its timeouts, and leave it broken: no teardown.
    rank0, rank1 = spawn_ranks(functools.partial(_slow_then_hung, str(tmp_path / "rendezvous" / "store")),
                               tmp_path / "ranks", world=2, timeout_s=BARRIER_S, group=False)
    # The barrier waited for the slow rank past the collective timeout...
    assert COLLECTIVE_S < rank1["barrier_s"] < BARRIER_S, rank1
    # ...and the all-reduce the hung rank never joined ended at the collective's own timeout.
    assert rank0["error"] and "Timed out" in rank0["error"], rank0
    assert COLLECTIVE_S - 0.5 < rank0["all_reduce_s"] < COLLECTIVE_S + 30, rank0
