"""Multi-process helpers for tests: gloo ranks spawned in-process, and real DeepSpeed/torchrun launches."""
from __future__ import annotations

import contextlib
import datetime
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO
from mtkit.distributed import SHM_DIR, SHM_PREFIX

TIMEOUT_S = 300  # a hung launch fails the test instead of CI
# Launches compile into this folder if they compile anything; mtkit's DeepSpeed engine must not (see deepspeed()).
_EXTENSIONS = tempfile.TemporaryDirectory(prefix="mtkit-test-torch-extensions-")


# ---------------------------------------------------------------- gloo ranks spawned in-process

# Ranks are forked from one server process that imported these once, rather than each importing them
# afresh (2-3 s a rank on two cores, for every spawn). The server starts with one BLAS and OpenMP thread,
# so it holds no thread pools when it forks: as safe as starting a new interpreter.
_PRELOAD = ["torch", "torch.distributed", "transformers", "scipy.stats", "mtkit.model", "mtkit.distributed",
            "mtkit.run", "diagnostics"]
_ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_IN_FORK_SERVER = "MTKIT_TEST_FORK_SERVER"


def spawn_ranks(body: Callable[[int], dict], out_dir: Path, world: int, timeout_s: float = 180,
                group: bool = True) -> list[dict]:
    """Run `body(rank)` on `world` gloo ranks and return each rank's result, in rank order.

    The helper owns the whole life cycle, so no test repeats it: the ranks meet through a file store in
    `out_dir` (no TCP port to race other processes for), every rank passes a barrier before the process
    group is destroyed (a rank that tears gloo down while its peer still talks to it can abort the
    peer's process with SIGABRT), results are written atomically, and collectives time out before the
    outer deadline so a hang surfaces as a Python error in the rank, not as a kill. `body` must be a
    module-level function (the ranks import it).

    With `group=False` the body builds its own process group (e.g. through `mtkit.distributed`, with the
    timeouts under test) and may leave it broken on purpose: each rank then waits on the file system for
    every rank's result and exits without a collective or a teardown.

    Each rank runs with the parent's environment and working directory of the moment (what the modules
    in `_PRELOAD` read from the environment at import, they read once, in the server); its output goes to
    `rank{r}.log` in `out_dir`, whose end a failure message quotes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="rendezvous-", dir=out_dir)) / "store"  # fresh per spawn
    collective_timeout_s = timeout_s / 2
    setting = {"env": {**os.environ, **_ONE_THREAD}, "cwd": os.getcwd(), "group": group}
    context = mp.start_processes(_rank_main, args=(body, world, str(store), str(out_dir), collective_timeout_s,
                                                   setting),
                                 nprocs=world, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1, grace_period=5):
            if time.monotonic() > deadline:
                hung = [r for r, p in enumerate(context.processes) if p.is_alive()]
                for p in context.processes:
                    p.kill()
                pytest.fail(f"ranks {hung} still running after {timeout_s:.0f} s (collective timeout "
                            f"{collective_timeout_s:.0f} s); {_report(out_dir, world)}", pytrace=False)
    except mp.ProcessRaisedException as err:
        pytest.fail(f"rank {err.error_index} raised; {_report(out_dir, world)}{err}", pytrace=False)
    except mp.ProcessExitedException as err:
        how = f"signal {err.signal_name}" if err.signal_name else f"exit code {err.exit_code}"
        pytest.fail(f"rank {err.error_index} (pid {err.error_pid}) died with {how} and no Python error; "
                    f"{_report(out_dir, world)}", pytrace=False)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _start_fork_server() -> None:
    import multiprocessing.forkserver as forkserver
    with pytest.MonkeyPatch.context() as patch:
        for k, v in {**_ONE_THREAD, _IN_FORK_SERVER: "1"}.items():
            patch.setenv(k, v)
        forkserver.set_forkserver_preload(_PRELOAD)
        forkserver.ensure_running()  # returns at once; the first spawn waits for the imports


if _IN_FORK_SERVER not in os.environ:  # not in a rank, which imports this module too
    _start_fork_server()  # now: its imports run on the other core while pytest collects the tests


def _rank_main(rank: int, body, world: int, store: str, out_dir: str, timeout_s: float, setting: dict) -> None:
    # Forked from the server, which started when this module was first imported: take this spawn's
    # environment and folder, and streams of its own.
    os.environ.clear()
    os.environ.update(setting["env"])
    os.chdir(setting["cwd"])
    log = os.open(Path(out_dir) / f"rank{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd in (1, 2):
        os.dup2(log, fd)
    torch.set_num_threads(1)
    if not setting["group"]:
        _save_result(body(rank), out_dir, rank)
        while len(_written(Path(out_dir), world)) < world:  # a barrier that needs no process group
            time.sleep(0.02)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        _save_result(body(rank), out_dir, rank)
        dist.barrier()  # nobody destroys the group while a peer may still be using it
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _save_result(result: dict, out_dir: str, rank: int) -> None:
    path = Path(out_dir) / f"rank{rank}.pt"
    torch.save(result, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)  # the parent never reads half a file


def _written(out_dir: Path, world: int) -> list[int]:
    return [r for r in range(world) if (out_dir / f"rank{r}.pt").exists()]


def _report(out_dir: Path, world: int) -> str:
    logs = "".join(f"\n--- end of rank{r}.log ---\n{_tail(out_dir / f'rank{r}.log')}" for r in range(world))
    return f"results written: {_written(out_dir, world)}{logs}\n"


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(none)"


# ---------------------------------------------------------------- real launches (deepspeed, torchrun)

# The launchers rendezvous over TCP, so they need a port. Ports below the kernel's ephemeral range
# (32768-60999 by default) are never handed out for outgoing connections, and each test process walks
# its own pid-seeded sequence, so parallel test sessions rarely try the same one; a launch that still
# loses a race fails with this message and is retried on another port.
PORTS = range(20000, 32000)
ADDRESS_IN_USE = re.compile(r"EADDRINUSE|address already in use", re.IGNORECASE)
LAUNCH_ATTEMPTS = 3
_port_rng = random.Random(os.getpid())


def launch_port() -> int:
    while True:
        port = _port_rng.choice(PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def env() -> dict:
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = "1"
    e["TORCH_EXTENSIONS_DIR"] = _EXTENSIONS.name
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    """`subprocess.run` in its own process group: a launch that hangs is killed with all its ranks (and
    compilers), instead of leaving orphans that slow every later test."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                          env=env(), start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{' '.join(cmd)} hung for {TIMEOUT_S} s:\n{out[-4000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def port_attempts():
    """(fresh port, is it the last try) for each try of a launch: a launch moves on to the next port only
    when it failed because another process took its port first (ADDRESS_IN_USE in its output)."""
    for attempt in range(1, LAUNCH_ATTEMPTS + 1):
        yield launch_port(), attempt == LAUNCH_ATTEMPTS


def retry_on_another_port(port: int, last: bool, outputs: list[str]) -> bool:
    """Whether a failed launch is tried again: only when it lost its port to another process, and tries remain."""
    if last or not any(ADDRESS_IN_USE.search(o) for o in outputs):
        return False
    print(f"port {port} was taken during the launch; retrying on another one", file=sys.stderr)
    return True


def launch(cmd_for_port: Callable[[int], list[str]]) -> tuple[subprocess.CompletedProcess, int]:
    """Run the launch command built for a fresh port to its end; again on another port if the port was taken."""
    for port, last in port_attempts():
        proc = run(cmd_for_port(port))
        if proc.returncode == 0 or not retry_on_another_port(port, last, [proc.stdout + proc.stderr]):
            return proc, port


# ---------------------------------------------------------------- live launches (signalled while they run)

class Started:
    """A command in its own session, output in files; `close()` kills whatever of it is still alive. Every
    wait has a deadline, and a missed one fails with each process's stack (mtkit prints it on SIGUSR1) and
    signal masks, so a hang says where it is instead of running into an outer time limit."""

    def __init__(self, cmd: list[str], logs: Path, extra_env: dict | None = None):
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = [logs / "stdout", logs / "stderr"]
        self.out, self.err = (open(path, "wb") for path in self.logs)
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=self.err, stdin=subprocess.DEVNULL, cwd=REPO,
                                     env={**env(), **(extra_env or {})}, start_new_session=True)
        # psutil.Process objects, not pids: killing one checks it is still the same process, so a pid that a
        # dead child freed and the system gave to an unrelated process is never signalled.
        self.seen: dict[int, psutil.Process] = {}
        self.ranks: list[psutil.Process] = []  # the training processes among them, alive or not
        with contextlib.suppress(psutil.Error):
            self.seen[self.proc.pid] = psutil.Process(self.proc.pid)

    def output(self) -> str:
        # Read while the process may be writing: the files can end inside a multi-byte character (a
        # progress bar's blocks), which a strict decoder would turn into an error.
        return "".join(path.read_bytes().decode("utf-8", "replace") for path in self.logs)

    def processes(self) -> list[psutil.Process]:
        """The launch and every process it started, remembered: orphans are found too, and what they start."""
        for p in [p for p in self.seen.values() if _alive(p)]:
            with contextlib.suppress(psutil.Error):
                for child in p.children(recursive=True):
                    if not _alive(self.seen.get(child.pid)):  # new, or a dead one's pid given again
                        self.seen[child.pid] = child
        alive = [p for p in self.seen.values() if _alive(p)]
        # Asked again while alive: a child seen between its fork and its exec still shows its parent's command.
        self.ranks += [p for p in alive if p not in self.ranks and _is_training(p)]
        return alive

    def rank(self, r: int) -> psutil.Process:
        return next(p for p in self.processes() if f"--local_rank={r}" in p.cmdline())

    def fail(self, what: str) -> None:
        states = []
        for p in self.processes():
            with contextlib.suppress(psutil.Error, OSError):
                status = Path(f"/proc/{p.pid}/status").read_text()
                masks = " ".join(line.replace("\t", "") for line in status.splitlines()
                                 if line.startswith(("State", "SigBlk", "SigIgn", "SigCgt")))
                states.append(f"{p.pid} {' '.join(p.cmdline()[:3])}: {masks}")
                if _is_training(p):  # not a launcher: SIGUSR1 would kill those
                    p.send_signal(signal.SIGUSR1)  # mtkit's faulthandler prints every thread's stack
        time.sleep(2)
        pytest.fail(f"{what}\nprocesses:\n" + "\n".join(states) + f"\noutput:\n{self.output()[-8000:]}")

    def wait_for(self, condition, what: str, deadline_s: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + deadline_s
        while not condition():
            self.processes()  # keep track of children while they live
            if self.proc.poll() is not None:
                pytest.fail(f"exited ({self.proc.returncode}) before {what}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                self.fail(f"no {what} after {deadline_s} s")
            time.sleep(0.1)

    def wait_exit(self, deadline_s: float = TIMEOUT_S) -> int:
        try:
            return self.proc.wait(deadline_s)
        except subprocess.TimeoutExpired:
            self.fail(f"still running {deadline_s} s later")

    def wait_gone(self, deadline_s: float) -> None:
        deadline = time.monotonic() + deadline_s
        while self.processes():
            if time.monotonic() > deadline:
                self.fail(f"still running after {deadline_s} s")
            time.sleep(0.2)
        self.proc.wait()

    def wait_ranks_gone(self, deadline_s: float) -> None:
        """Wait until the launch's training processes have started and all of them have exited. What is
        tested is that the ranks stop; DeepSpeed's launchers take a few seconds more to notice and exit."""
        deadline = time.monotonic() + deadline_s
        while True:
            alive = self.processes()
            if self.ranks and not any(_alive(p) for p in self.ranks):
                return
            if not alive:
                pytest.fail(f"the launch ended before its ranks started:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                self.fail(f"ranks still running after {deadline_s} s")
            time.sleep(0.2)

    def close(self) -> None:
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.out.close(), self.err.close()


def _is_training(p: psutil.Process) -> bool:
    """A training process (a rank), not a launcher: its script is launchers/train.py."""
    with contextlib.suppress(psutil.Error):
        return [a for a in p.cmdline()[1:] if not a.startswith("-")][:1] == ["launchers/train.py"]
    return False


def _alive(p: psutil.Process | None) -> bool:
    with contextlib.suppress(psutil.Error):
        return p is not None and p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    return False


@contextlib.contextmanager
def started(cmd: list[str], logs: Path, extra_env: dict | None = None):
    run = Started(cmd, logs, extra_env)
    try:
        yield run
    finally:
        run.close()


@contextlib.contextmanager
def launch_ready(processes_for_port, logs: Path, ready, what: str):
    """Start the processes `processes_for_port(port)` gives ([(cmd, extra_env), ...]) on a fresh port and wait
    until `ready()`; yields (port, [Started, ...]). Retried on another port like `launch`."""
    for port, last in port_attempts():
        with contextlib.ExitStack() as stack:
            runs = [stack.enter_context(started(cmd, logs / f"port{port}-{i}", extra_env))
                    for i, (cmd, extra_env) in enumerate(processes_for_port(port))]
            try:
                runs[0].wait_for(ready, what)
            except pytest.fail.Exception:
                if retry_on_another_port(port, last, [r.output() for r in runs]):
                    continue
                raise
            yield port, runs
            return


def shm_workspaces(port: int) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{SHM_PREFIX}_*_{port}_*"))


def deepspeed(script: str, *args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).with_name("deepspeed")
    proc, port = launch(lambda port: [str(launcher), "--num_gpus", str(ranks), "--master_port", str(port),
                                      script, *args])
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(proc.args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    # mtkit's DeepSpeed engine skips the CPU shared-memory all-reduce: no compiler run on a first launch (tens
    # of seconds), and no ~70 MB of /dev/shm per rank left behind until reboot.
    assert not shm_workspaces(port), f"DeepSpeed shared-memory workspaces left behind: {shm_workspaces(port)}"
    assert not os.listdir(_EXTENSIONS.name), f"the launch compiled {os.listdir(_EXTENSIONS.name)}"
    return proc


def torchrun(script: str, *args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).with_name("torchrun")
    proc, _ = launch(lambda port: [str(launcher), "--nproc_per_node", str(ranks), "--master_port", str(port),
                                   script, *args])
    return proc


def torchrun_nodes(script: str, *args: str, logs: Path, nodes: int = 2) -> list[tuple[int, str]]:
    """A `nodes`-node job with one rank per node, every node on this machine: one `torchrun --nnodes N
    --node_rank K` each, meeting at node 0's TCP store on loopback. Returns (exit code, output) per node."""
    launcher = Path(sys.executable).with_name("torchrun")
    for port, last in port_attempts():
        with contextlib.ExitStack() as stack:
            runs = [stack.enter_context(started(
                [str(launcher), "--nnodes", str(nodes), "--node_rank", str(k), "--nproc_per_node", "1",
                 "--master_addr", "127.0.0.1", "--master_port", str(port), script, *args],
                logs / f"port{port}-node{k}")) for k in range(nodes)]
            ends = [(r.wait_exit(), r.output()) for r in runs]
        if all(code == 0 for code, _ in ends) or not retry_on_another_port(port, last, [o for _, o in ends]):
            return ends


def train(out: Path, *overrides: str, ranks: int = 2, resume: str | None = None):
    args = ["--config", "configs/debug_tiny.yaml", "--out", str(out), *overrides]
    if resume:
        args += ["--resume", resume]
    if ranks == 1:
        proc = run([sys.executable, "launchers/train.py", *args])
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc
    return deepspeed("launchers/train.py", *args, ranks=ranks)
