"""The ranks of `test_interrupt.py::test_collectives_time_out_but_barriers_wait_for_a_slow_rank`.

A module of their own: a spawned process imports the module of the function it runs, and this one needs
only torch and `mtkit.distributed` (about a second), not the test module's imports (about three)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from mtkit.distributed import init_distributed


def main(rank: int, out_dir: str, collective_s: float, slow_s: float) -> None:
    """Rank 0 is slow to reach a barrier (`slow_s`, longer than the collective timeout), as when it writes the
    best model; rank 1 waits there. Then rank 0 starts an all-reduce that rank 1, hung, never joins. Each
    rank saves what it saw in `rank{r}.pt`: how long the barrier took, and for rank 0 the all-reduce's error."""
    out = Path(out_dir)
    (out / f"started{rank}").touch()  # start the rendezvous together: its wait is bounded by the timeout too
    while not all((out / f"started{r}").exists() for r in (0, 1)):
        time.sleep(0.02)
    os.environ.update(WORLD_SIZE="2", RANK=str(rank))
    # A file store, as in the shared spawn helper: no TCP port for another process to take first.
    dist = init_distributed("cpu", timeout_s=collective_s, barrier_timeout_s=120,
                            init_method=f"file://{out / 'store'}")
    if rank == 0:
        time.sleep(slow_s)
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
    torch.save(result, out / f"rank{rank}.tmp")
    os.replace(out / f"rank{rank}.tmp", out / f"rank{rank}.pt")
    while not all((out / f"rank{r}.pt").exists() for r in (0, 1)):  # rank 1 "hangs" until rank 0 is done
        time.sleep(0.02)
    os._exit(0)  # no process-group teardown after a timed-out collective: it can abort the peer
