"""A run folder is never damaged: a new run over an old one is refused, resume keeps the settings and logs
each step once, damaged or missing files are named, and a failed write leaves the last checkpoint usable.

Most tests work on copies of one uninterrupted reference run (18 steps, checkpoints at 12 and 18, probe
diagnostics every 4 steps) and compare what they get against it."""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtkit import checkpoint
from mtkit.checkpoint import RunFolderError
from mtkit.cli import CLI
from mtkit.pipeline import run_pipeline
from mtkit.run import Start, _prepare, run

from conftest import CONFIGS, REPO, tiny_config, write_toy_data
from test_smoke import scalars


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runfolder")
    return write_toy_data(tmp / "data"), tmp / "cache"


def cfg(data, **overrides):
    return tiny_config(*data, **{"train.epochs": 2, **overrides})


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """Uninterrupted; tests only read it (or copy it)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run(cfg(data), out)
    return out


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    return out


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def model_at(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step_{step}" / "engine.pt", weights_only=False)["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "diagnostics.jsonl").read_text().splitlines()]


def logged(run_dir: Path) -> dict:
    """Every TensorBoard scalar but throughput (wall-clock), as {tag: [(step, value)]}."""
    return {tag: series for tag, series in scalars(run_dir, "").items() if not tag.startswith("throughput")}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------- 1. a new run into a run folder

def test_new_run_into_a_run_folder_is_refused_and_changes_nothing(data, reference, tmp_path):
    out = copy_of(reference, tmp_path)
    before = snapshot(out)
    with pytest.raises(RunFolderError, match="already holds a run") as e:
        run(cfg(data, **{"train.seed": 1}), out)
    assert "--resume auto" in str(e.value) and "--overwrite" in str(e.value)
    assert snapshot(out) == before


def test_overwrite_leaves_only_the_new_run(data, reference, tmp_path):
    """The old run is longer (checkpoints 12, 18) than the new one (6): nothing of it may survive, and the
    folder must equal a fresh run's. Files mtkit does not write are left alone."""
    out = copy_of(reference, tmp_path)
    (out / "notes.txt").write_text("mine")
    short = {"train.max_steps": 6, "train.seed": 1}
    run(cfg(data, **short), out, overwrite=True)
    fresh = tmp_path / "fresh"
    run(cfg(data, **short), fresh)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_6"]
    assert checkpoint.latest(out / "checkpoints") == out / "checkpoints" / "step_6"
    assert len(list((out / "tb").iterdir())) == 1
    assert records(out) == records(fresh) and [r["step"] for r in records(out)] == [4]
    assert logged(out) == logged(fresh)
    assert json.loads((out / "results.json").read_text())["dev"] == json.loads(
        (fresh / "results.json").read_text())["dev"]
    assert same_weights(model_at(out, 6), model_at(fresh, 6))


def test_launcher_refuses_with_exit_code_2_and_no_traceback(data, reference, tmp_path):
    out = copy_of(reference, tmp_path)
    before = snapshot(out)
    proc = subprocess.run([sys.executable, "launchers/train.py", "--config", "configs/debug_tiny.yaml",
                           "--out", str(out), f"--data.root={data[0]}", f"--data.cache_dir={data[1]}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert f"{out} already holds a run" in proc.stderr and "--resume auto" in proc.stderr
    assert snapshot(out) == before


def test_pipeline_stage_folders_follow_the_same_rule(data, tmp_path):
    out = tmp_path / "pipe"
    (out / "multitask").mkdir(parents=True)
    (out / "multitask" / "config.json").write_text("{}")
    over = {"data.root": str(data[0]), "data.cache_dir": str(data[1])}
    with pytest.raises(RunFolderError, match=f"{out} already holds a pipeline run .*{out / 'multitask'}"):
        run_pipeline(CONFIGS / "debug_tiny_simcse.yaml", out, over)
    with pytest.raises(RunFolderError, match="a pipeline continues with --resume auto"):
        run_pipeline(CONFIGS / "debug_tiny_simcse.yaml", out, over, resume=str(out / "multitask"))


def test_pipeline_overwrite_starts_every_stage_over(data, tmp_path):
    out = tmp_path / "pipe"
    stale = out / "simcse" / "checkpoints" / "step_999"
    stale.mkdir(parents=True)
    (stale / "engine.pt").write_text("an older run's")
    (out / "results.json").write_text('{"dev": "stale"}')
    over = {"data.root": str(data[0]), "data.cache_dir": str(data[1])}
    summary = run_pipeline(CONFIGS / "debug_tiny_simcse.yaml", out, over, overwrite=True)
    assert not stale.exists() and checkpoint.steps(out / "simcse" / "checkpoints") == [2]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(summary))


# ---------------------------------------------------------------- 2. settings on resume

def test_resume_refuses_changed_settings_and_lists_them(data, reference, tmp_path):
    out = copy_of(reference, tmp_path)
    before = snapshot(out)
    changed = {"train.batch_size": 8, "optim.encoder_lr": 5e-4, "tasks.sts.decoder": "sbert",
               "train.eval_batch_size": 7, "train.log_every": 3}  # the last two are harmless
    with pytest.raises(RunFolderError) as e:
        run(cfg(data, **changed), out, resume="auto")
    message = str(e.value)
    assert f"resuming {out / 'checkpoints' / 'step_18'}" in message
    assert "train.batch_size: 16 -> 8" in message and "optim.encoder_lr: 0.001 -> 0.0005" in message
    assert "tasks.sts.decoder: 'cosine' -> 'sbert'" in message and "--allow-config-change" in message
    assert "eval_batch_size" not in message and "log_every" not in message
    assert snapshot(out) == before


@pytest.fixture(scope="module")
def resumed(data, reference, tmp_path_factory):
    """The reference run's folder taken back to its step-12 checkpoint and continued, with a harmless
    setting changed: everything it logged past step 12 must be replaced, not repeated."""
    out = copy_of(reference, tmp_path_factory.mktemp("resumed"))
    run(cfg(data, **{"train.eval_batch_size": 7}), out, resume=str(out / "checkpoints" / "step_12"))
    return out


def test_a_resume_points_latest_at_its_checkpoint_as_a_save_does(reference, tmp_path, caplog):
    # Until the resumed run writes its next checkpoint, `latest` must name the one it continued from, in the
    # form a save writes and DeepSpeed's zero_to_fp32.py reads: a bare folder name (it was once JSON-quoted).
    out = copy_of(reference, tmp_path)
    step_12 = out / "checkpoints" / "step_12"
    _prepare(out, Start(checkpoint=step_12, step=12, drop=[out / "checkpoints" / "step_18"]))
    assert (out / "checkpoints" / "latest").read_text() == "step_12"
    caplog.clear()  # of the warning that step 18 is removed
    assert checkpoint.latest(out / "checkpoints") == step_12 and not caplog.records


def test_harmless_change_resumes_exactly(reference, resumed):
    assert same_weights(model_at(resumed, 18), model_at(reference, 18))
    saved, ref = (json.loads((d / "results.json").read_text()) for d in (resumed, reference))
    assert saved["dev"] == ref["dev"] and saved["config_changes"] == []
    assert saved["config"]["train"]["eval_batch_size"] == 7


def test_resume_logs_every_step_once(reference, resumed):
    got, want = records(resumed), records(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [4, 8, 12, 16]
    for a, b in zip(got, want):
        assert a["cos"] == pytest.approx(b["cos"], abs=1e-6)
    tb_got, tb_want = logged(resumed), logged(reference)
    assert tb_got.keys() == tb_want.keys()
    for tag, series in tb_want.items():
        assert [s for s, _ in tb_got[tag]] == [s for s, _ in series], tag  # each step once
        assert [v for _, v in tb_got[tag]] == pytest.approx([v for _, v in series], abs=1e-5), tag
    assert len(list((resumed / "tb").iterdir())) == 2  # the old event file stays; its tail is purged


def test_allowed_config_change_is_recorded(data, reference, tmp_path):
    out = copy_of(reference, tmp_path)
    longer = cfg(data, **{"train.epochs": 3})
    run(longer, out, resume=str(out / "checkpoints" / "step_12"), allow_config_change=True)
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"] == 27
    assert saved["config"]["train"]["epochs"] == 2  # the config the run started with
    change = [{"key": "train.epochs", "old": 2.0, "new": 3.0, "resumed_at_step": 12}]
    assert saved["config_changes"] == change
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 3  # what the weights are
    # The history travels with the checkpoints: a later resume under the new settings keeps it.
    run(longer, out, resume="auto")
    assert json.loads((out / "results.json").read_text())["config_changes"] == change


# ---------------------------------------------------------------- 4. damaged and missing checkpoints

@pytest.mark.parametrize("damage", ["truncated", "same size"])
def test_damaged_latest_checkpoint_falls_back_to_the_one_before(damage, data, reference, tmp_path, caplog):
    out = copy_of(reference, tmp_path)
    weights = out / "checkpoints" / "step_18" / "engine.pt"
    if damage == "truncated":
        truncate(weights)
    else:  # a block's bits flipped in place, as a bad sector or a faulty copy leaves them
        with open(weights, "r+b") as f:
            f.seek(weights.stat().st_size // 2)
            block = f.read(4096)
            f.seek(-len(block), 1)
            f.write(bytes(b ^ 0xFF for b in block))
    run(cfg(data), out, resume="auto")
    assert f"{weights} is {'truncated or damaged' if damage == 'truncated' else 'damaged (same size'}" in caplog.text
    assert same_weights(model_at(out, 18), model_at(reference, 18))  # redone from step 12, exactly
    assert [r["step"] for r in records(out)] == [4, 8, 12, 16]


def test_resume_auto_without_a_checkpoint(data, tmp_path):
    """A run that died before its first checkpoint starts fresh (its debris cleared); a finished run with
    no checkpoint is not silently trained again."""
    out = tmp_path / "run"
    short = {"train.max_steps": 6, "train.save_checkpoints": False}
    run(cfg(data, **short), out)
    with pytest.raises(RunFolderError, match="holds a finished run .* no complete checkpoint"):
        run(cfg(data, **short), out, resume="auto")
    (out / "results.json").unlink()
    run(cfg(data, **short), out, resume="auto")
    fresh = tmp_path / "fresh"
    run(cfg(data, **short), fresh)
    assert len(list((out / "tb").iterdir())) == 1 and logged(out) == logged(fresh)
    assert records(out) == records(fresh)


def test_resume_from_a_missing_or_partial_path_names_it(data, reference, tmp_path):
    missing = tmp_path / "nonexistent"
    with pytest.raises(RunFolderError, match=f"--resume {missing}: no such checkpoint folder"):
        run(cfg(data), tmp_path / "new", resume=str(missing))
    out = copy_of(reference, tmp_path)
    (out / "checkpoints" / "step_12" / "client_rank0.pt").unlink()
    with pytest.raises(RunFolderError, match="step_12/client_rank0.pt is missing"):
        run(cfg(data), out, resume=str(out / "checkpoints" / "step_12"))


def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(data, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "step_12.tmp" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(RunFolderError) as e:
        run(cfg(data), out)
    root = out / "checkpoints"
    assert str(e.value).startswith(f"cannot write checkpoint {root / 'step_12.tmp'}: No space left on device")
    assert f"the last complete checkpoint, {root / 'step_6'}, is intact" in str(e.value)
    assert not (root / "step_12.tmp").exists()
    assert checkpoint.latest(root) == root / "step_6" and checkpoint.problem(root / "step_6") is None
    monkeypatch.undo()
    run(cfg(data), out, resume="auto")
    assert same_weights(model_at(out, 18), model_at(reference, 18))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (always-full device)")
def test_full_disk_while_writing_diagnostics_names_the_file():
    from diagnostics.writer import DiagnosticsWriter
    writer = DiagnosticsWriter(None, "/dev/full")
    with pytest.raises(OSError, match="cannot write diagnostics to /dev/full: No space left on device"):
        writer.write({"step": 1, "cos": {}})


# ---------------------------------------------------------------- 5. eval, export, diagnose

def fails(capsys, command, *args, **kwargs) -> str:
    with pytest.raises(SystemExit) as e:
        command(*args, **kwargs)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    return err


def test_commands_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "stuff.txt").write_text("x")
    for command in (CLI().eval, CLI().export):
        err = fails(capsys, command, str(tmp_path))
        assert f"{tmp_path} is not a run folder: it has no config.json" in err and "best/model.pt" in err
    assert "is not a run folder (no config.json)" in fails(capsys, CLI().diagnose, str(tmp_path))
    assert "no such run folder" in fails(capsys, CLI().eval, str(tmp_path / "nothing"))


def test_diagnose_without_diagnostics_says_how_to_enable_them(reference, tmp_path, capsys):
    out = copy_of(reference, tmp_path)
    (out / "diagnostics.jsonl").unlink()
    err = fails(capsys, CLI().diagnose, str(out))
    assert f"{out / 'diagnostics.jsonl'} not found" in err and "--diagnostics.mode=probe" in err


def test_eval_of_an_unknown_split_lists_the_splits(reference, capsys):
    err = fails(capsys, CLI().eval, str(reference), split="foo")
    assert "no task has a 'foo' split; splits: sst: dev, train; quora: dev, train; sts: dev, train" in err


def test_truncated_best_model_points_at_the_checkpoint(reference, tmp_path, capsys):
    out = copy_of(reference, tmp_path)
    truncate(out / "best" / "model.pt")
    step_18 = out / "checkpoints" / "step_18"
    err = fails(capsys, CLI().eval, str(out))
    assert f"{out / 'best' / 'model.pt'} is unreadable (truncated or corrupt)" in err
    assert f"--checkpoint {step_18}" in err
    assert f"{out / 'best' / 'model.pt'} is unreadable" in fails(capsys, CLI().export, str(out))
    # The suggested fallback works: it scores what the run logged for step 18.
    CLI().eval(str(out), checkpoint=str(step_18))
    stdout = capsys.readouterr().out
    metrics = json.loads(stdout[stdout.index("{"):])
    dev_18 = dict(scalars(reference, "dev/overall")["dev/overall"])[18]
    assert metrics["overall"] == pytest.approx(dev_18, abs=1e-6)


def test_cli_resume_of_a_nonexistent_path_exits_2(data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mtkit.cli", "train", "--config", "configs/debug_tiny.yaml",
                           "--out", str(tmp_path / "o"), "--resume", str(tmp_path / "nonexistent"),
                           f"--data.root={data[0]}", f"--data.cache_dir={data[1]}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: --resume {tmp_path / 'nonexistent'}: no such checkpoint folder" in proc.stderr


# ---------------------------------------------------------------- DeepSpeed, 2 ranks

def ds_model_at(run_dir: Path, step: int) -> dict:
    path = run_dir / "checkpoints" / f"step_{step}" / "mp_rank_00_model_states.pt"
    return torch.load(path, weights_only=False)["module"]


@pytest.mark.slow
def test_deepspeed_refuses_overwrites_and_resumes_once(tmp_path):
    from distributed_util import launch, train
    root, cache = write_toy_data(tmp_path / "data"), tmp_path / "cache"
    args = [f"--data.root={root}", f"--data.cache_dir={cache}", "--train.batch_size=8", "--train.eval_every=2",
            "--train.log_every=1", "--diagnostics.every=1"]
    out = tmp_path / "run"
    train(out, *args, "--train.max_steps=6")
    before = snapshot(out)
    launcher = Path(sys.executable).with_name("deepspeed")
    proc, _ = launch(lambda port: [str(launcher), "--num_gpus", "2", "--master_port", str(port), "launchers/train.py",
                                   "--config", "configs/debug_tiny.yaml", "--out", str(out), *args,
                                   "--train.max_steps=4"])
    assert proc.returncode != 0 and f"error: {out} already holds a run" in proc.stderr
    assert snapshot(out) == before
    # Over a longer run (checkpoints 4 and 6) a shorter one leaves nothing of it.
    train(out, *args, "--train.max_steps=4", "--overwrite")
    assert checkpoint.steps(out / "checkpoints") == [2, 4]
    assert (out / "checkpoints" / "latest").read_text() == "step_4"
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4] and len(list((out / "tb").iterdir())) == 1
    first, final = records(out), ds_model_at(out, 4)
    tb = logged(out)
    # Back to step 2 and on again: the same weights, each step logged once.
    train(out, *args, "--train.max_steps=4", resume=str(out / "checkpoints" / "step_2"))
    assert same_weights(ds_model_at(out, 4), final)
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]
    for a, b in zip(records(out), first):
        assert a["cos"] == pytest.approx(b["cos"], abs=1e-6)
    again = logged(out)
    assert {tag: [s for s, _ in v] for tag, v in again.items()} == {tag: [s for s, _ in v] for tag, v in tb.items()}
