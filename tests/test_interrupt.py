"""Interruption, for real: signals to a training process, to one DeepSpeed rank, to the launcher's process
group; the launcher killed; a rank killed (a hung one: `test_collective_timeouts.py`). Progress is detected
by watching the run folder, never by sleeping; every launch runs in its own session and is killed with all
its processes if a test fails."""
from __future__ import annotations

import json
import os
import re
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import write_toy_data
from distributed_util import launch_port, launch_ready, shm_workspaces, started, train
from mtkit import checkpoint
from mtkit.distributed import StopRequest
from mtkit.lineage import is_deepspeed_launch
from test_smoke import scalars

# A stop takes one tiny step and a checkpoint: seconds. A stop that has not happened by then will not, and
# failing early (with the stacks) beats running into an outer time limit with no output.
STOP_S = 120
ENDLESS = "--train.max_steps=100000"  # runs until stopped
# A resume with a finite max_steps changes a setting, so it says so (constant lr, no warmup: the run stays exact).
FINITE = "--allow-config-change"


def common(root: Path, cache: Path) -> list[str]:
    # Constant lr without warm-up: the schedule does not depend on max_steps, so a run stopped at step s
    # and resumed with max_steps = s + k must equal a run of s + k steps. Losses logged at every step.
    return [f"--data.root={root}", f"--data.cache_dir={cache}", "--diagnostics.mode=off", "--train.log_every=1",
            "--train.eval_every=4", "--optim.lr_schedule=constant", "--optim.warmup_ratio=0"] + [
        f"--tasks.{t}.{k}=none" for t in ("sst", "quora", "sts") for k in ("max_train", "max_eval")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interrupt")
    return write_toy_data(tmp / "data"), tmp / "cache"


def deepspeed_cmd(out: Path, *args: str, port: int) -> list[str]:
    return [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(port),
            "launchers/train.py", "--config", "configs/debug_tiny.yaml", "--out", str(out), *args]


def latest_step(out: Path) -> int | None:
    latest = out / "checkpoints" / "latest"
    return checkpoint.step_of(Path(latest.read_text().strip())) if latest.exists() else None


def has_checkpoint(out: Path, past: int = -1):
    """A condition: `latest` names a checkpoint of a step after `past`."""
    def ready() -> bool:
        step = latest_step(out)
        return step is not None and step > past
    return ready


def stop_step(out: Path, ranks: int = 1) -> int:
    """The step of the checkpoint `latest` names, after checking it is complete for every rank."""
    step = latest_step(out)
    for r in range(ranks):
        client = torch.load(out / "checkpoints" / f"step_{step}" / f"client_rank{r}.pt", weights_only=False)
        assert client["client"]["step"] == step
    return step


# ---------------------------------------------------------------- one process

def test_stop_request_keeps_the_first_signal_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert stop.reason is None
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)  # e.g. the DeepSpeed launcher forwarding a second signal
        assert stop.reason == "SIGTERM"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_stop_request_receives_the_signals_a_parent_blocked():
    # A job runner may start training with SIGTERM and SIGINT blocked, and the mask survives fork and exec:
    # the run would then be stoppable only by SIGKILL, losing everything since its last checkpoint.
    signals = set(StopRequest.SIGNALS)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        with StopRequest() as stop:
            signal.raise_signal(signal.SIGTERM)
            assert stop.reason == "SIGTERM"
        assert signals <= signal.pthread_sigmask(signal.SIG_BLOCK, set())  # the parent's mask is back
    finally:
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
        signal.pthread_sigmask(signal.SIG_SETMASK, before)  # a signal left pending is dropped, not fatal
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_sigterm_checkpoints_exits_0_and_resume_equals_an_uninterrupted_run(data, tmp_path):
    args = common(*data)
    out = tmp_path / "run"
    cmd = [sys.executable, "launchers/train.py", "--config", "configs/debug_tiny.yaml", "--out", str(out), *args]
    with started([*cmd, ENDLESS], tmp_path / "logs") as run:
        run.wait_for(has_checkpoint(out), "first checkpoint")
        run.proc.send_signal(signal.SIGUSR1)  # where is it? every thread's stack, and training goes on
        run.wait_for(lambda: "(most recent call first)" in run.output(), "stack on SIGUSR1")
        run.proc.send_signal(signal.SIGTERM)
        run.proc.send_signal(signal.SIGINT)  # a second signal while stopping changes nothing
        assert run.wait_exit(STOP_S) == 0, run.output()[-4000:]
        output = run.output()
    s = stop_step(out)
    # Pending together, the signals are delivered in signal-number order: either one names the stop.
    assert re.search(f"stopped after step {s} of 100000 \\((SIGTERM|SIGINT)\\)", output), output[-2000:]
    assert "--resume auto" in output
    assert not (out / "results.json").exists()  # a stopped run is not a finished one

    reference = tmp_path / "reference"
    with ThreadPoolExecutor(2) as pool:  # independent single-threaded runs: side by side, a core each
        runs = [pool.submit(train, out, *args, f"--train.max_steps={s + 3}", FINITE, ranks=1, resume="auto"),
                pool.submit(train, reference, *args, f"--train.max_steps={s + 3}", ranks=1)]
        for r in runs:
            r.result()
    assert json.loads((out / "results.json").read_text())["steps"] == s + 3
    assert scalars(out, "train/loss/") == scalars(reference, "train/loss/")  # every step, before and after s
    digests = [json.loads((d / "results.json").read_text())["rank_weight_digests"] for d in (out, reference)]
    assert digests[0] == digests[1]


# ---------------------------------------------------------------- DeepSpeed, 2 ranks

def ds_args(data) -> list[str]:
    return [*common(*data), "--train.batch_size=8"]


@pytest.fixture(scope="module")
def stopped_by_rank1(data, tmp_path_factory):
    """A 2-rank DeepSpeed run stopped by SIGTERM to rank 1 alone: (run folder, stop step, output, port). Its
    values are read here, once: a later test continues the run in the same folder."""
    tmp = tmp_path_factory.mktemp("stopped_by_rank1")
    out = tmp / "run"
    with launch_ready(lambda port: [(deepspeed_cmd(out, *ds_args(data), ENDLESS, port=port), None)], tmp / "logs",
                      has_checkpoint(out), "first checkpoint") as (port, (run,)):
        run.rank(1).send_signal(signal.SIGTERM)  # rank 0 learns of it through the step's all-reduce
        code = run.wait_exit(STOP_S)
        output = run.output()
    assert code == 0, output[-4000:]
    return out, stop_step(out, ranks=2), output, port


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(stopped_by_rank1):
    out, s, output, port = stopped_by_rank1
    assert f"stopped after step {s} of 100000" in output and "--resume auto" in output
    assert not shm_workspaces(port)


@pytest.mark.slow
def test_sigterm_to_the_launch_group_stops_every_rank_with_a_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    with launch_ready(lambda port: [(deepspeed_cmd(out, *ds_args(data), ENDLESS, port=port), None)],
                      tmp_path / "logs", has_checkpoint(out), "first checkpoint") as (port, (run,)):
        # Ctrl-C in a terminal or a scheduler: every process of the launch gets the signal, and DeepSpeed's
        # launch.py sends its ranks a second one. The `deepspeed` command itself has no handler and dies of
        # it; the ranks checkpoint and exit 0 before launch.py's 30 s grace ends.
        os.killpg(run.proc.pid, signal.SIGTERM)
        run.wait_ranks_gone(STOP_S)
        output = run.output()
    s = stop_step(out, ranks=2)
    assert f"stopped after step {s} of 100000" in output and "--resume auto" in output
    assert not shm_workspaces(port)


@pytest.mark.slow
def test_a_stopped_run_resumes_and_its_ranks_stop_when_the_launcher_is_killed(stopped_by_rank1, data):
    out, s, _, _ = stopped_by_rank1
    # The stop checkpoint resumes under DeepSpeed like any other; the resumed run goes on past it...
    with launch_ready(lambda port: [(deepspeed_cmd(out, *ds_args(data), ENDLESS, "--resume", "auto", port=port),
                                     None)], out.parent / "resumed", has_checkpoint(out, past=s),
                      "a checkpoint past the stop") as (_, (run,)):
        # ...until its `deepspeed` command is killed: DeepSpeed's launch.py under it neither notices nor stops
        # its ranks, which poll their launcher chain every second, then finish a step and save.
        run.proc.kill()
        run.wait_ranks_gone(STOP_S)
        output = run.output()
    s2 = stop_step(out, ranks=2)
    assert s2 > s and re.search(rf"resuming from \S*step_{s} \(step {s}\)", output), output[-4000:]
    # The stop came from a rank's launcher watch: nothing else signalled the ranks.
    assert f"stopped after step {s2} of 100000 (" in output


@pytest.mark.slow
def test_ranks_stop_when_the_launcher_was_killed_before_they_started(data, tmp_path):
    # The `deepspeed` command killed while DeepSpeed's launch.py is still importing: launch.py belongs to init
    # by the time it starts the ranks, so no later look at their ancestors sees a change.
    out = tmp_path / "run"
    with started(deepspeed_cmd(out, *ds_args(data), ENDLESS, port=launch_port()), tmp_path / "logs") as run:
        run.wait_for(lambda: any(is_deepspeed_launch(p.pid) for p in run.processes()), "DeepSpeed's launch.py")
        run.proc.kill()
        run.wait_ranks_gone(STOP_S)  # launch.py goes on to start the ranks: they must notice, stop and save
        output = run.output()
    s = stop_step(out, ranks=2)  # they stopped by themselves, with a checkpoint
    # Rank 0 speaks for both: it saw the launcher gone itself, or learned of it from rank 1 in the step.
    assert re.search(rf"stopped after step {s} of 100000 \((the launcher exited|another rank was asked)", output)


@pytest.mark.slow
def test_a_killed_rank_ends_the_other(data, tmp_path):
    # Ranks started by hand, as torchrun would: no launcher cleans up after the dead rank, so the survivor
    # must end on its own, through the closed connections (a hung rank: `test_collective_timeouts.py`).
    out = tmp_path / "run"
    cmd = [sys.executable, "launchers/train.py", "--config", "configs/debug_tiny.yaml", "--out", str(out),
           *common(*data), "--train.batch_size=8", ENDLESS]

    def ranks(port: int) -> list:
        world = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        return [(cmd, {**world, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]

    with launch_ready(ranks, tmp_path / "ranks", has_checkpoint(out), "first checkpoint") as (_, (rank0, rank1)):
        rank1.proc.kill()
        rank1.proc.wait()
        rank0.wait_gone(60 + 30)
        assert rank0.proc.returncode != 0
