"""End-to-end runs of the tiny config: pinned losses, outputs on disk, exact resume, `mtkit eval`."""
import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mtkit.run import run

from conftest import REPO, GradientRecorder, require_real_data, run_observed


def scalars(run_dir, prefix):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if tag.startswith(prefix)}


# Mean training loss per task over each 2-step log window, from the run below. Any change in data order,
# initialisation, model or optimizer shows up here.
PINNED = {
    "train/loss/quora": [0.7503, 0.7073, 0.6726, 0.73, 0.5997, 0.8146],
    "train/loss/sst": [1.622, 1.6377, 1.6229, 1.5702, 1.5548, 1.5494],
    "train/loss/sts": [9.097, 7.1595, 6.1518, 5.6467, 5.9973, 8.055],
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import tiny_config, write_toy_data
    tmp = tmp_path_factory.mktemp("smoke")
    cfg = tiny_config(write_toy_data(tmp / "data"), tmp / "cache", **{"train.epochs": 2})
    out = tmp / "run"
    results = run(cfg, out)
    return cfg, out, results


def test_pinned_losses(tiny_run):
    _, out, _ = tiny_run
    got = scalars(out, "train/loss/")
    assert sorted(got) == sorted(PINNED)
    for tag, expected in PINNED.items():
        values = [round(v, 4) for _, v in got[tag]]
        assert values == pytest.approx(expected, abs=2e-4), (tag, values)


def test_outputs_on_disk(tiny_run):
    cfg, out, results = tiny_run
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"] == 18 and saved["world_size"] == 1 and saved["engine"] == "torch"
    assert saved["seed"] == 0 and saved["git_commit"] and saved["config"]["name"] == "debug_tiny"
    assert set(saved["dev"]) == {"sst", "quora", "sts", "overall"}
    assert set(saved["dev"]["sts"]) == {"pearson", "spearman", "cosine_pearson", "cosine_spearman"}
    overall = (saved["dev"]["sst"]["acc"] + saved["dev"]["quora"]["acc"]
               + (saved["dev"]["sts"]["pearson"] + 1) / 2) / 3
    assert saved["dev"]["overall"] == pytest.approx(overall)
    assert saved["train_samples_per_s"] > 0 and saved["sizes"]["sst"] == {"train": 48, "dev": 48}
    tb = scalars(out, "")
    assert {"dev/overall", "dev/sts/pearson", "lr/encoder", "lr/head.sst",
            "throughput/samples_per_s"} <= set(tb)
    assert [s for s, _ in tb["dev/overall"]] == [6, 12, 18]
    assert max(v for _, v in tb["dev/overall"]) == pytest.approx(saved["dev"]["overall"], abs=1e-6)
    lines = (out / "predictions" / "sst-dev-output.csv").read_text().splitlines()
    assert lines[0] == "id \t Predicted_Sentiment " and len(lines) == 49
    assert (out / "best" / "model.pt").exists()
    assert (out / "checkpoints" / "latest").read_text() == "step_18"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_12", "step_18"]


def test_probe_diagnostics_leave_training_bit_identical(tiny_run, tmp_path):
    cfg, out, _ = tiny_run
    assert cfg.diagnostics.mode == "probe"
    off = tmp_path / "off"
    run(dataclasses.replace(cfg, diagnostics=dataclasses.replace(cfg.diagnostics, mode="off")), off)
    assert scalars(off, "train/loss/") == scalars(out, "train/loss/")
    assert not scalars(off, "conflict/")
    steps = [s for s, _ in scalars(out, "conflict/rate")["conflict/rate"]]
    assert steps == list(range(cfg.diagnostics.every, 19, cfg.diagnostics.every))
    a = torch.load(out / "best" / "model.pt")
    b = torch.load(off / "best" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stream_diagnostics_are_running_averages_of_the_step_gradients(tiny_cfg, tmp_path):
    out = tmp_path / "stream"
    cfg = tiny_cfg(**{"diagnostics.mode": "stream", "diagnostics.every": 3})
    recorder = GradientRecorder()
    run_observed(cfg, out, recorder)
    records = [json.loads(x) for x in (out / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 9] and all(r["mode"] == "stream" for r in records)
    assert set(records[0]["cos"]) == {"sst__quora", "sst__sts", "quora__sts"}
    assert scalars(out, "conflict/cos/sst__sts")
    # StreamTracker's documented average, m ← β m + (1 − β) g (the first g sets m), recomputed in float64
    # from each step's encoder gradient as the recorder read it off `.grad`; one backward per step.
    beta = cfg.diagnostics.stream_beta
    for record in records:
        m = {}
        for task, g, _ in recorder.steps[:record["step"]]:
            m[task] = g if task not in m else beta * m[task] + (1 - beta) * g
        assert set(m) == set(record["norm"])
        for task, value in record["norm"].items():
            assert value == pytest.approx(m[task].norm().item(), rel=1e-5), (record["step"], task)
        for pair, value in record["cos"].items():
            a, b = pair.split("__")
            cos = (m[a] @ m[b] / (m[a].norm() * m[b].norm())).item()
            assert value == pytest.approx(cos, abs=1e-5), (record["step"], pair)


def test_resume_continues_exactly(tiny_run, tmp_path):
    cfg, out, _ = tiny_run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step_12", resumed / "checkpoints" / "step_12")
    (resumed / "checkpoints" / "latest").write_text("step_12")
    run(cfg, resumed, resume="auto")
    full, again = scalars(out, "train/loss/"), scalars(resumed, "train/loss/")
    for tag in full:
        assert again[tag] == [(s, v) for s, v in full[tag] if s > 12]
    a = torch.load(out / "checkpoints" / "step_18" / "engine.pt", weights_only=False)["model"]
    b = torch.load(resumed / "checkpoints" / "step_18" / "engine.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_eval_reproduces_best_dev(tiny_run):
    _, out, results = tiny_run
    proc = subprocess.run([sys.executable, "-m", "mtkit.cli", "eval", str(out)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert metrics["overall"] == pytest.approx(results["dev"]["overall"], abs=1e-6)


def test_debug_tiny_on_the_real_data(tmp_path):
    root = require_real_data()
    out = tmp_path / "real"
    proc = subprocess.run([sys.executable, "launchers/train.py", "--config", "configs/debug_tiny.yaml",
                           "--out", str(out), f"--data.root={root}", f"--data.cache_dir={tmp_path / 'c'}"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 2 row(s) with an empty label" in proc.stderr
    saved = json.loads((out / "results.json").read_text())
    assert saved["sizes"]["quora"] == {"train": 256, "dev": 128}
    assert 0 <= saved["dev"]["sst"]["acc"] <= 1
    cos = scalars(out, "conflict/cos/")
    assert set(cos) == {"conflict/cos/sst__quora", "conflict/cos/sst__sts", "conflict/cos/quora__sts"}
    assert all(-1 <= v <= 1 for series in cos.values() for _, v in series)


def test_bad_data_fails_with_file_and_line(toy_root, tiny_cfg, tmp_path):
    path = toy_root / "sts" / "sts-train.csv"
    lines = path.read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\tseven"
    path.write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, "launchers/train.py", "--config", "configs/debug_tiny.yaml",
                           "--out", str(tmp_path / "o"), f"--data.root={toy_root}",
                           f"--data.cache_dir={tmp_path / 'c'}"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert f"{path}:4:" in proc.stderr and "seven" in proc.stderr


def test_an_error_inside_the_loop_closes_its_bar_and_files(tiny_cfg, tmp_path, monkeypatch):
    # In a process that lives on (a notebook, a test session), a bar left open is redrawn later, after
    # whatever was printed since, and an unclosed trace may miss its last lines.
    import mtkit.loop as loop
    bars = []

    def recorded_bar(*args, **kwargs):
        bars.append(real_bar(*args, **kwargs))
        return bars[-1]

    def failing_evaluation(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    real_bar = loop.progress.bar
    monkeypatch.delenv("MTKIT_QUIET", raising=False)
    monkeypatch.setattr(loop.progress, "bar", recorded_bar)
    monkeypatch.setattr(loop, "_evaluate_and_keep_best", failing_evaluation)
    cfg = tiny_cfg(**{"train.trace": True, "train.eval_every": 3})
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run(cfg, tmp_path / "run")
    (train_bar,) = [b for b in bars if b.desc == "train"]
    assert train_bar.n == 3 and train_bar.disable  # tqdm.close() disables the bar
    trace = [json.loads(line) for line in (tmp_path / "run" / "trace" / "rank0.jsonl").read_text().splitlines()]
    assert [t["step"] for t in trace] == [0, 1, 2]
