"""`train.report_to`: one tiny run reported to TensorBoard, W&B (offline), MLflow (a file store in the run
folder) and a JSONL file, each read back from disk on its own; a resume; validation of the setting.

Nothing here reaches the network: W&B runs offline, MLflow writes files, and both have their telemetry
and user-level settings pointed away from this machine's home folder.
"""
from __future__ import annotations

import glob
import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import psutil
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtkit import config as config_mod
from mtkit.config import ConfigError

from conftest import CONFIGS, tiny_config, write_toy_data

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

pytestmark = pytest.mark.timeout(600)

ALL = ["tensorboard", "wandb", "mlflow", "jsonl"]
HEATMAP = "conflict/layer_heatmap"


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """The environment of every run here: offline, silent, nothing read from or written to $HOME."""
    home = tmp_path_factory.mktemp("home")
    had_file_store = "MLFLOW_ALLOW_FILE_STORE" in os.environ
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_PROJECT", "WANDB_CONSOLE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI",
                     "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(name, raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(name, str(home / name.lower()))
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("DO_NOT_TRACK", "true")
        yield home
    if not had_file_store:  # mtkit sets it for its own file store; leave the process as it was
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    return write_toy_data(tmp / "data"), tmp / "cache"


def cfg(data, **overrides):
    root, cache = data
    return tiny_config(root, cache, **{"train.epochs": 2, "train.report_to": ALL, **overrides})


@pytest.fixture(scope="module")
def reported(offline, data, tmp_path_factory):
    """18 steps with probe diagnostics every 4, reported everywhere; each backend read back at once
    (test_resume changes the folder afterwards)."""
    from mtkit.run import run
    out = tmp_path_factory.mktemp("reported") / "run"
    started = time.perf_counter()
    run(cfg(data), out)
    seconds = time.perf_counter() - started
    left = wandb_processes()
    return {"out": out, "seconds": seconds, "stray": left, "tb": read_tensorboard(out),
            "jsonl": read_jsonl(out), "mlflow": read_mlflow(out), "wandb": read_wandb(out)}


# ---------------------------------------------------------------- reading each backend from disk

def read_tensorboard(out: Path) -> dict:
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    images = {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}
    return {"scalars": scalars, "images": images}


def read_jsonl(out: Path) -> dict:
    records = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    scalars = {(r["tag"], r["step"]): r["value"] for r in records}
    assert len(scalars) == len(records), "a (tag, step) logged twice"
    return {"scalars": scalars, "records": records}


def read_mlflow(out: Path) -> dict:
    from mlflow.tracking import MlflowClient
    ids = json.loads((out / "tracking.json").read_text())["mlflow"]
    assert ids["tracking_uri"] is None  # the run folder's own store
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    run = client.get_run(ids["run_id"])
    history = {key: client.get_metric_history(ids["run_id"], key) for key in run.data.metrics}
    scalars = {(key, m.step): m.value for key, points in history.items() for m in points}
    folder = Path(run.info.artifact_uri.removeprefix("file://")) / HEATMAP
    return {"scalars": scalars, "points": {key: [m.step for m in points] for key, points in history.items()},
            "status": run.info.status, "run_id": ids["run_id"],
            "images": sorted(p.name for p in folder.iterdir()) if folder.is_dir() else [],
            "image_bytes": {p.name: p.read_bytes()[:8] for p in folder.glob("*.png")}}


def wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (`run-<id>.wandb`). W&B's SDK no longer ships a reader
    for it; the format is LevelDB's log format (32 KiB blocks of chunks: CRC-32 of type and data, length,
    type FULL/FIRST/MIDDLE/LAST) after a 7-byte header, each record a `wandb_internal_pb2.Record`. Every
    chunk's checksum is verified and the whole file must be consumed, so a misread fails loudly."""
    from wandb.proto import wandb_internal_pb2
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, None
    while pos < len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            assert data[pos:pos + left] == b"\0" * left
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert len(chunk) == length and zlib.crc32(bytes([kind]) + chunk) == crc, f"bad chunk at byte {pos}"
        pos += 7 + length
        if kind == 1:
            whole = chunk
        elif kind == 2:
            pending, whole = chunk, None
        elif kind == 3:
            pending, whole = pending + chunk, None
        elif kind == 4:
            whole, pending = pending + chunk, None
        else:
            raise AssertionError(f"chunk type {kind} at byte {pos}")
        if whole is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(whole)
            yield record


def read_wandb(out: Path) -> dict:
    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    run_id = json.loads((out / "tracking.json").read_text())["wandb"]["run_id"]
    starts = []
    for folder in runs:
        scalars, images, kinds = {}, {}, set()
        for record in wandb_records(Path(folder) / f"run-{run_id}.wandb"):
            kinds.add(record.WhichOneof("record_type"))
            if record.WhichOneof("record_type") != "history":
                continue
            step = record.history.step.num
            media = {}
            for item in record.history.item:
                key = list(item.nested_key) or [item.key]
                if len(key) == 1 and not key[0].startswith("_"):  # _step, _runtime, _timestamp: W&B's own
                    scalars[(key[0], step)] = json.loads(item.value_json)
                elif len(key) == 2:
                    media.setdefault(key[0], {})[key[1]] = json.loads(item.value_json)
            for tag, fields in media.items():
                assert fields["_type"] == "image-file", fields
                images.setdefault(tag, []).append((step, Path(folder) / "files" / fields["path"]))
        starts.append({"folder": folder, "scalars": scalars, "images": images, "kinds": kinds})
    return {"run_id": run_id, "starts": starts}


def wandb_processes() -> list[str]:
    """W&B service processes started by this test process and still alive, after a grace period."""
    deadline = time.monotonic() + 15
    while True:
        left = [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)
                if "wandb" in " ".join(_cmdline(p))]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


# ---------------------------------------------------------------- one run, four backends

def assert_same_scalars(got: dict, want: dict, backend: str) -> None:
    assert sorted(got) == sorted(want), f"{backend}: (tag, step) pairs differ from TensorBoard's"
    for key, value in want.items():  # TensorBoard stores float32
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-30), (backend, key)


def test_every_backend_carries_the_same_scalars(reported):
    tb = reported["tb"]["scalars"]
    tags = {tag for tag, _ in tb}
    for family in ("train/loss/", "lr/", "throughput/", "dev/", "conflict/", "pcgrad/", "grad/"):
        assert any(tag.startswith(family) for tag in tags), family
    assert {("dev/overall", s) for s in (6, 12, 18)} <= set(tb)
    assert {("conflict/rate", s) for s in (4, 8, 12, 16)} <= set(tb)
    assert_same_scalars(reported["jsonl"]["scalars"], tb, "jsonl")
    assert_same_scalars(reported["mlflow"]["scalars"], tb, "mlflow")
    (start,) = reported["wandb"]["starts"]
    assert_same_scalars(start["scalars"], tb, "wandb")
    assert "exit" in start["kinds"]  # the transaction log was written out to its end
    assert reported["mlflow"]["status"] == "FINISHED"


def test_images_go_where_images_are_supported(reported):
    steps = reported["tb"]["images"][HEATMAP]
    assert steps == [4, 8, 12, 16]
    assert reported["mlflow"]["images"] == sorted(f"step_{s}.png" for s in steps)
    assert set(reported["mlflow"]["image_bytes"].values()) == {b"\x89PNG\r\n\x1a\n"}
    (start,) = reported["wandb"]["starts"]
    assert [s for s, _ in start["images"][HEATMAP]] == steps
    assert all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for _, path in start["images"][HEATMAP])
    assert not any(r["tag"] == HEATMAP for r in reported["jsonl"]["records"])  # jsonl takes scalars only


def test_everything_stays_in_the_run_folder_and_no_wandb_process_is_left(reported, offline):
    out = reported["out"]
    assert {"tb", "scalars.jsonl", "wandb", "mlruns", "tracking.json"} <= {p.name for p in out.iterdir()}
    assert not any((offline / "wandb_dir").glob("**/*.wandb"))  # WANDB_DIR is not where mtkit puts it
    assert reported["stray"] == []
    print(f"\nthe 18-step run reporting to {', '.join(ALL)} took {reported['seconds']:.1f} s")


def test_resume_keeps_each_step_once_in_jsonl_and_continues_the_same_runs(reported, data):
    """Resumed from step 12 in the same folder (test last: it changes the folder the fixture read)."""
    from mtkit.run import run
    out = reported["out"]
    run(cfg(data), out, resume=str(out / "checkpoints" / "step_12"))
    again = read_jsonl(out)  # asserts that no (tag, step) appears twice
    want = reported["jsonl"]["scalars"]
    assert sorted(again["scalars"]) == sorted(want)
    for key, value in want.items():
        if not key[0].startswith("throughput/"):  # wall-clock, the rest is the same training
            assert again["scalars"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert read_tensorboard(out)["scalars"].keys() == reported["tb"]["scalars"].keys()  # purge_step
    # MLflow: the same run continues; its history is append-only, so the steps after the checkpoint
    # that the first start logged are there twice (the resumed values last), as the README says.
    mlflow = read_mlflow(out)
    assert mlflow["run_id"] == reported["mlflow"]["run_id"] and mlflow["status"] == "FINISHED"
    assert sorted(mlflow["points"]["dev/overall"]) == [6, 12, 18, 18]
    # W&B: the same run id, a second offline folder holding only the steps after the checkpoint.
    wandb = read_wandb(out)
    assert wandb["run_id"] == reported["wandb"]["run_id"] and len(wandb["starts"]) == 2
    assert min(step for _, step in wandb["starts"][1]["scalars"]) > 12
    assert wandb_processes() == []


# ---------------------------------------------------------------- validation

def test_unknown_backend_is_refused_at_its_line(tmp_path):
    text = (CONFIGS / "debug_tiny.yaml").read_text()
    assert text.rstrip().splitlines()[-1].startswith("  ")  # train: is the last section
    path = tmp_path / "x.yaml"
    path.write_text(text.rstrip() + "\n  report_to: [tensorboard, tb]\n")
    line = len(path.read_text().splitlines())
    with pytest.raises(ConfigError) as e:
        config_mod.load(path)
    assert str(e.value) == (f"{path}:{line}: train.report_to = 'tb'; choose one of "
                            "['jsonl', 'mlflow', 'tensorboard', 'wandb']")
    with pytest.raises(ConfigError, match="override --train.report_to: .* name each backend once"):
        config_mod.load(CONFIGS / "debug_tiny.yaml", {"train.report_to": "jsonl,jsonl"})


@pytest.mark.parametrize("backend", ["wandb", "mlflow"])
def test_a_backend_that_is_not_installed_fails_validation_before_anything_is_built(backend, monkeypatch,
                                                                                    tmp_path):
    import mtkit
    monkeypatch.setitem(sys.modules, backend, None)  # what importing a missing package finds
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        mtkit.train(str(CONFIGS / "debug_tiny.yaml"), out=out, train__report_to=["tensorboard", backend])
    assert str(e.value) == (f"override --train.report_to: train.report_to = ['tensorboard', '{backend}']; "
                            f"{backend} needs the {backend} package, which is not installed: "
                            f"pip install 'mtkit[{backend}]'")
    assert not out.exists()
    assert config_mod.load(CONFIGS / "debug_tiny.yaml", {"train.report_to": backend}, report=False)


def test_report_to_is_in_train_help():
    from mtkit.args import parser
    text = parser("mtkit train").format_help()
    assert "train.report_to" in text and "each one of jsonl, mlflow, tensorboard, wandb" in text


def test_mlflow_records_how_a_run_ended_and_a_moved_folder_keeps_its_artifacts_at_home(offline, tmp_path,
                                                                                         caplog):
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

    from mtkit.loop import TrainingStopped
    from mtkit.report import Reporter

    def start(out, resumed_at=None):
        return Reporter.open(["mlflow"], out, "unit", {"name": "unit"}, resumed_at)

    def run_of(out):
        run_id = json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"]
        client = MlflowClient((out / "mlruns").resolve().as_uri())
        return run_id, client.get_run(run_id).info.status, client.get_metric_history(run_id, "train/loss/a_b")

    out = tmp_path / "a"
    out.mkdir()
    reporter = start(out)
    reporter.add_scalar("train/loss/a+b", 1.0, 1)  # a character MLflow refuses in a name
    reporter.close(TrainingStopped("stopped", exit_code=0))
    first, ended, _ = run_of(out)
    assert ended == "KILLED"
    reporter = start(out, resumed_at=1)
    reporter.add_scalar("train/loss/a+b", 2.0, 2)
    reporter.close(RuntimeError("boom"))
    again, ended, history = run_of(out)
    assert (again, ended) == (first, "FAILED")  # the same run, reopened
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 2.0)]

    moved = tmp_path / "b"
    out.rename(moved)
    reporter = start(moved, resumed_at=2)
    reporter.add_scalar("train/loss/a+b", 3.0, 3)
    reporter.add_figure("conflict/layer_heatmap", Figure(), 3)
    reporter.close()
    again, ended, history = run_of(moved)
    assert (again, ended) == (first, "FINISHED") and [m.step for m in history] == [1, 2, 3]
    assert "outside this run folder (moved since the run started?)" in caplog.text
    assert not out.exists()  # nothing written where the folder used to be
