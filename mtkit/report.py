"""Where a run's scalars and figures go: `train.report_to` picks any of TensorBoard, Weights & Biases,
MLflow and a JSONL file, and one `Reporter` hands every call to each of them.

The loop and the diagnostics writer only call `add_scalar` / `add_figure` / `flush` (the surface of
TensorBoard's `SummaryWriter` they were written against), so they never learn which backends are on.
Each backend is a small `Backend` subclass in `BACKENDS`; wandb and mlflow are imported only when chosen,
and config validation refuses a chosen backend whose package is missing (`missing_package`) before
anything is built. Only rank 0 reports.

Everything lands in the run folder and needs no network: TensorBoard in `tb/`, the JSONL file in
`scalars.jsonl`, W&B offline in `wandb/` (unless WANDB_MODE says otherwise), MLflow in a file store in
`mlruns/` (unless MLFLOW_TRACKING_URI names another). `tracking.json` keeps the W&B and MLflow run ids,
so a resumed run continues the same run there.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger("mtkit")

JSONL_FILE = "scalars.jsonl"
IDS_FILE = "tracking.json"
# What the backends may write into a run folder (`--overwrite` removes them with the rest of a run).
OUTPUTS = ("tb", JSONL_FILE, "wandb", "mlruns", IDS_FILE)


@dataclass
class RunInfo:
    """What a backend needs to open: the run folder, names, the config, and whether this is a resume."""
    out: Path
    name: str                       # the config's name: W&B project, MLflow experiment (unless set by env)
    config: dict = field(default_factory=dict)
    resumed_at: int | None = None   # the checkpoint's step when resuming, else None
    ids: dict = field(default_factory=dict)  # tracking.json as the previous start left it

    @property
    def run_name(self) -> str:
        return self.out.resolve().name


class Backend:
    """One destination. `add_scalar` gets a float and an int step, in non-decreasing step order."""

    name: ClassVar[str]
    package: ClassVar[str | None] = None   # the module that must be importable
    extra: ClassVar[str | None] = None     # mtkit's pip extra that installs it
    images: ClassVar[bool] = True          # add_figure is called only when True

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        raise NotImplementedError

    def add_figure(self, tag: str, figure, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, error: BaseException | None = None) -> None:
        pass

    def ids(self) -> dict | None:
        """What a resumed run needs to continue this backend's run (kept in tracking.json)."""
        return None


BACKENDS: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator adding a backend to `BACKENDS` under `cls.name` (a `train.report_to` value)."""
    BACKENDS[cls.name] = cls
    return cls


def missing_package(name: str) -> str | None:
    """Why the backend `name` cannot run here (its package is not installed), or None. Looks the package
    up without importing it, so validating a config stays cheap."""
    cls = BACKENDS[name]
    if cls.package is None or importlib.util.find_spec(cls.package) is not None:
        return None
    install = f"pip install 'mtkit[{cls.extra}]'" if cls.extra else f"pip install {cls.package}"
    return f"{name} needs the {cls.package} package, which is not installed: {install}"


def _render(figure):
    """A matplotlib figure as an RGB array [H, W, 3] (uint8), drawn without pyplot."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


@register
class TensorBoard(Backend):
    name, package = "tensorboard", "tensorboard"

    def __init__(self, run: RunInfo):
        from torch.utils.tensorboard import SummaryWriter
        # Events past the checkpoint, logged before a crash, are hidden: every step shows once.
        purge = run.resumed_at + 1 if run.resumed_at is not None else None
        self.writer = SummaryWriter(str(run.out / "tb"), purge_step=purge)

    def add_scalar(self, tag, value, step):
        self.writer.add_scalar(tag, value, step)

    def add_figure(self, tag, figure, step):
        self.writer.add_figure(tag, figure, step)

    def flush(self):
        self.writer.flush()

    def close(self, error=None):
        self.writer.close()


@register
class JsonLines(Backend):
    """One line per scalar: {"step", "tag", "value", "time"}. No images (a figure is not a scalar);
    the diagnostics behind the heatmap are in diagnostics.jsonl. Records past a resumed checkpoint are
    dropped when the run folder is prepared (`mtkit.run`), as for diagnostics.jsonl."""

    name, images = "jsonl", False

    def __init__(self, run: RunInfo):
        self.path = run.out / JSONL_FILE
        self.file = open(self.path, "a", encoding="utf-8")

    def add_scalar(self, tag, value, step):
        try:
            self.file.write(json.dumps({"step": step, "tag": tag, "value": value,
                                        "time": round(time.time(), 3)}) + "\n")
            self.file.flush()  # a killed run keeps every line it logged
        except OSError as e:  # a full disk: say which file, the bare error does not
            raise OSError(e.errno, f"cannot write scalars to {self.path}: {e.strerror}") from e

    def flush(self):
        self.file.flush()

    def close(self, error=None):
        self.file.close()


@register
class WandB(Backend):
    """A W&B run in the run folder (`wandb/`), offline unless WANDB_MODE is set: training never waits on
    the network, and `wandb sync` uploads it later. A resume continues the same run id."""

    name = package = extra = "wandb"

    def __init__(self, run: RunInfo):
        import wandb
        self.wandb = wandb
        stored = (run.ids.get(self.name) or {}).get("run_id") if run.resumed_at is not None else None
        # Arguments given to wandb.init win over its environment variables, so the user's are read here.
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or run.name, name=run.run_name, dir=str(run.out),
            id=stored, resume="allow" if stored else None, config=run.config,
            mode=os.environ.get("WANDB_MODE") or "offline",
            # A run of its own, leaving any run the caller has open alone.
            reinit="create_new",
            settings=wandb.Settings(console=os.environ.get("WANDB_CONSOLE") or "off"))

    def add_scalar(self, tag, value, step):
        self.run.log({tag: value}, step=step)

    def add_figure(self, tag, figure, step):
        self.run.log({tag: self.wandb.Image(_render(figure))}, step=step)

    def close(self, error=None):
        self.run.finish(exit_code=0 if error is None else getattr(error, "exit_code", 1))
        # finish() returns before wandb's service process has written the run's transaction log out;
        # shutting the service down waits for it, and leaves no process behind. Only when no other run
        # of this process still needs the service.
        if not self._other_runs_open():
            self.wandb.teardown()

    def _other_runs_open(self) -> bool:
        try:  # wandb's own bookkeeping (not public API); on any doubt the service stays up
            from wandb.sdk import wandb_setup
            return wandb_setup.singleton().most_recent_active_run is not None
        except Exception:  # noqa: BLE001 - then wandb's exit hook shuts the service down at process exit
            return True

    def ids(self):
        return {"run_id": self.run.id}


@register
class MLflow(Backend):
    """An MLflow run, in a file store inside the run folder (`mlruns/`) unless MLFLOW_TRACKING_URI names
    another store; experiment: MLFLOW_EXPERIMENT_NAME, else the config's name. A resume reopens the same
    run when the store is the same. Figures are artifacts `<tag>/step_<N>.png`."""

    name = package = extra = "mlflow"
    BATCH = 1000  # MLflow's limit of metrics per log_batch call

    def __init__(self, run: RunInfo):
        from mlflow.tracking import MlflowClient
        uri = os.environ.get("MLFLOW_TRACKING_URI") or None
        if uri is None:
            # MLflow 3 keeps the file store behind this switch (it recommends a database); a store in the
            # run folder needs neither a server nor a database package, which is what a run folder is for.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri or (run.out / "mlruns").resolve().as_uri())
        self.uri = uri  # None: the run folder's own store, wherever the folder has moved since
        stored = run.ids.get(self.name) or {}
        self.run_id = None
        if run.resumed_at is not None and stored.get("run_id") and stored.get("tracking_uri") == uri:
            self.run_id = self._reopen(stored["run_id"])
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            self.client.set_tag(self.run_id, "mtkit.resumed_at_step", str(run.resumed_at))
        else:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or run.name
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=run.run_name).info.run_id
        artifacts = self.client.get_run(self.run_id).info.artifact_uri
        # The file store records absolute paths: in a run folder moved since the store was made, artifacts
        # would be written where the folder used to be. Metrics are stored relative to the store's root.
        self.artifacts = uri is not None or artifacts.startswith((run.out / "mlruns").resolve().as_uri())
        if self.artifacts:
            self.client.log_dict(self.run_id, run.config, "config.json")
        else:
            log.warning("mlflow: run %s keeps its artifacts in %s, outside this run folder (moved since the run "
                        "started?); logging its metrics only", self.run_id, artifacts)
        self.pending: list = []

    def _reopen(self, run_id: str) -> str | None:
        """The stored run, when the store still has it; else None (a new run starts, with a warning)."""
        from mlflow.exceptions import MlflowException
        try:
            self.client.get_run(run_id)
        except MlflowException as e:
            log.warning("mlflow: cannot continue run %s (%s); starting a new MLflow run", run_id, e)
            return None
        return run_id

    def add_scalar(self, tag, value, step):
        from mlflow.entities import Metric
        if self.pending and (self.pending[-1].step != step or len(self.pending) >= self.BATCH):
            self.flush()  # one request per logged step, not per scalar
        self.pending.append(Metric(_mlflow_key(tag), value, int(time.time() * 1000), step))

    def add_figure(self, tag, figure, step):
        if self.artifacts:
            self.client.log_figure(self.run_id, figure, f"{_mlflow_key(tag)}/step_{step}.png")

    def flush(self):
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []

    def close(self, error=None):
        self.flush()
        status = "FINISHED" if error is None else "KILLED" if getattr(error, "exit_code", 1) == 0 else "FAILED"
        self.client.set_terminated(self.run_id, status)

    def ids(self):
        return {"run_id": self.run_id, "tracking_uri": self.uri}


def _mlflow_key(tag: str) -> str:
    """MLflow refuses metric names with characters other than these (a task name could bring one)."""
    return re.sub(r"[^/\w.\- ]", "_", tag)


class Reporter:
    """Every chosen backend behind the `SummaryWriter` surface the loop and diagnostics use."""

    def __init__(self, backends: list[Backend]):
        self.backends = backends

    @classmethod
    def open(cls, names: list[str], out: Path, name: str, config: dict, resumed_at: int | None) -> Reporter:
        out = Path(out)
        ids_path = out / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
        run = RunInfo(out, name, config, resumed_at, ids)
        backends: list[Backend] = []
        try:
            for backend in names:
                backends.append(BACKENDS[backend](run))
        except BaseException as e:
            cls(backends).close(e)
            raise
        for backend in backends:
            if backend.ids() is not None:
                ids[backend.name] = backend.ids()
        if ids:
            from mtkit.checkpoint import write_json
            write_json(ids_path, ids)
        return cls(backends)

    def add_scalar(self, tag: str, scalar_value: Any, global_step: int) -> None:
        value, step = float(scalar_value), int(global_step)  # every backend gets the same number
        for b in self.backends:
            b.add_scalar(tag, value, step)

    def add_figure(self, tag: str, figure, global_step: int) -> None:
        for b in self.backends:
            if b.images:
                b.add_figure(tag, figure, int(global_step))

    def flush(self) -> None:
        for b in self.backends:
            b.flush()

    def close(self, error: BaseException | None = None) -> None:
        """Close every backend, even when one fails (the first failure is raised after). `error`: what
        ended the run early, if anything, for backends that record a run's status."""
        failure = None
        for b in self.backends:
            try:
                b.close(error)
            except Exception as e:  # noqa: PERF203 - each backend must get its close
                log.warning("closing the %s reporter failed: %s", b.name, e)
                failure = failure or e
        self.backends = []
        if failure is not None and error is None:
            raise failure
