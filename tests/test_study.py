"""mtkit study: shipped study files resolve to valid run configs; the debug study runs end to end through the
CLI, its table equals the runs' own results averaged here, and a second invocation trains nothing."""
import json
import os
import statistics
import subprocess
import sys

import pytest
from scipy.stats import ttest_rel

from mtkit import study as study_mod
from mtkit.study import StudyError

from conftest import CONFIGS, REPO

STUDIES = sorted((CONFIGS / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_cell_of_every_shipped_study_resolves_to_a_valid_config(path, tmp_path):
    study, lines = study_mod.load_study(path)
    if path.stem != "debug_tiny":
        assert {"quick", "full"} <= set(study.profiles), "shipped studies have a CPU and a GPU profile"
        assert study.reference is not None and study.reference.rows
    for profile in study.profiles:
        _, _, runs = study_mod.plan(path, tmp_path, profile)
        assert len(runs) == len(study.cells) * len(study_mod.seeds(study))
        for run in runs[:len(study.cells)]:  # one seed: the seed is the only difference between seeds
            study_mod.check_config(run, path, lines)
    metrics = set(study.metrics) | {study.metric}
    for row in study.reference.rows if study.reference else []:
        assert set(row) - {"name"} <= metrics, "reference rows use the table's metric names"


def test_per_task_baseline_of_the_leave_one_out_study():
    study, _ = study_mod.load_study(CONFIGS / "studies" / "table2_leave_one_out.yaml")
    cells = {c.name: c for c in study.cells}
    assert study_mod.baseline_of(study, cells["leave_out_sst"], "sst.acc") == "linear_probe"
    assert study_mod.baseline_of(study, cells["leave_out_sst"], "quora.acc") == "finetune"
    assert study_mod.baseline_of(study, cells["leave_out_sst"], "overall") == "finetune"
    assert study_mod.baseline_of(study, cells["leave_out_sts"], "sts.pearson") == "linear_probe"
    assert study_mod.baseline_of(study, cells["finetune"], "overall") is None


def test_paired_comparison_matches_scipy_and_marks_significance():
    base = {0: 0.50, 1: 0.52, 2: 0.51, 3: 0.53}
    better = {s: v + 0.02 + 0.001 * s for s, v in base.items()}   # the same gain on every seed: significant
    noisy = {0: 0.55, 1: 0.49, 2: 0.54, 3: 0.50}                  # gains and losses: not significant
    for cell in (better, noisy):
        got = study_mod.compare(cell, base)
        p = ttest_rel([cell[s] for s in sorted(base)], [base[s] for s in sorted(base)]).pvalue
        assert got["p"] == pytest.approx(p) and got["n"] == 4
        assert got["delta"] == pytest.approx(statistics.mean(cell.values()) - statistics.mean(base.values()))
        assert got["significant"] == (p < 0.05)
    assert study_mod.fmt_delta(study_mod.compare(better, base)).endswith("*")
    assert not study_mod.fmt_delta(study_mod.compare(noisy, base)).endswith("*")
    one = study_mod.compare({0: 0.6}, {0: 0.5, 1: 0.4})  # one shared seed: no test
    assert one["p"] is None and study_mod.fmt_delta(one) == "+0.150 n/a"


@pytest.mark.parametrize("text, problem", [
    ("name: s\nconfig: ../debug_tiny.yaml\ncells:\n  - name: a\n    overides: {}\n", "study.yaml:5: unknown key 'cells.a.overides'"),
    ("name: s\nconfig: ../debug_tiny.yaml\ncells:\n  - name: a\n  - name: b\n    baseline: c\n",
     "study.yaml:6: cell 'b' names baseline 'c', which is not a cell"),
    ("name: s\nconfig: ../debug_tiny.yaml\ncells:\n  - name: a\n  - name: a\n", "cell names must be unique"),
    ("name: s\nconfig: ../debug_tiny.yaml\nseeds: 0\ncells:\n  - name: a\n", "study.yaml:3: seeds = 0"),
    ("name: s\nconfig: ../debug_tiny.yaml\nprofiles: {quick: {}}\ncells:\n  - name: a\n    profiles: {gpu: {}}\n",
     "profile(s) ['gpu'] that the study does not declare"),
])
def test_bad_study_files_name_the_file_line_and_problem(tmp_path, text, problem):
    path = tmp_path / "studies" / "study.yaml"
    path.parent.mkdir()
    (tmp_path / "debug_tiny.yaml").write_text((CONFIGS / "debug_tiny.yaml").read_text())
    path.write_text(text)
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        study_mod.plan(path, tmp_path / "out")


def test_a_bad_cell_override_stops_before_any_run(tmp_path):
    path = tmp_path / "studies" / "study.yaml"
    path.parent.mkdir()
    (tmp_path / "debug_tiny.yaml").write_text((CONFIGS / "debug_tiny.yaml").read_text())
    path.write_text("name: s\nconfig: ../debug_tiny.yaml\ncells:\n  - name: ok\n  - name: bad\n"
                    "    overrides: {train.mode: probe}\n")
    with pytest.raises(StudyError, match=r"study.yaml:5: cell 'bad': override --train.mode: train.mode = "
                                         r"'probe'; choose one of"):
        study_mod.run_study(path, tmp_path / "out")
    assert not (tmp_path / "out" / "ok").exists()


def _study(out, data, cache, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "mtkit.cli", "study", str(CONFIGS / "studies" / "debug_tiny.yaml"),
                           "--out", str(out), "--jobs", "2", f"--data.root={data}", f"--data.cache_dir={cache}",
                           *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stderr


def _table_rows(path):
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_debug_study_end_to_end(toy_root, tmp_path):
    out, cache = tmp_path / "study", tmp_path / "cache"
    log = _study(out, toy_root, cache)
    runs = {(cell, seed): out / cell / f"seed{seed}" for cell in ("finetune", "linear_probe") for seed in (0, 1)}
    per_run = {key: json.loads((folder / "results.json").read_text()) for key, folder in runs.items()}
    assert all(f"run {c}/seed{s}" in log for c, s in runs)
    assert {r["seed"] for r in per_run.values()} == {0, 1}
    assert per_run["linear_probe", 0]["config"]["train"]["mode"] == "linear_probe"

    # The table against the runs' own results.json, averaged here.
    results = json.loads((out / "results.json").read_text())
    rows = _table_rows(out / "table.md")
    for cell in ("finetune", "linear_probe"):
        for task, metric in (("sst", "acc"), ("quora", "acc"), ("quora", "f1"), ("sts", "pearson"), (None, "overall")):
            name = f"{task}.{metric}" if task else metric
            values = [per_run[cell, s]["dev"][task][metric] if task else per_run[cell, s]["dev"][metric] for s in (0, 1)]
            got = results["cells"][cell]["metrics"][name]
            assert got["values"] == values and got["seeds"] == [0, 1] and got["n"] == 2
            assert got["mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
            assert got["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
            if name in results["table_metrics"]:
                text = rows[cell][name]
                assert text.startswith(f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}")
        assert rows[cell]["n"] == "2"
    # linear_probe against its baseline finetune: the paired t-test over seeds 0 and 1, as scipy computes it.
    for name in results["table_metrics"]:
        task, _, metric = name.rpartition(".")
        pick = (lambda r: r["dev"][task][metric]) if task else (lambda r: r["dev"][metric])
        lp, ft = [pick(per_run["linear_probe", s]) for s in (0, 1)], [pick(per_run["finetune", s]) for s in (0, 1)]
        p = ttest_rel(lp, ft).pvalue
        delta = statistics.mean(lp) - statistics.mean(ft)
        comparison = results["cells"]["linear_probe"]["comparisons"][name]
        assert comparison["baseline"] == "finetune" and comparison["p"] == pytest.approx(p)
        assert rows["linear_probe"][name].endswith(f"({delta:+.3f}{'*' if p < 0.05 else ''})")
    assert rows["linear_probe"]["baseline"] == "finetune" and rows["finetune"]["baseline"] == "–"
    assert rows["original study (BERT-base): fine-tune"]["sst.acc"] == "0.494"
    assert "paired t-test" in (out / "table.md").read_text()

    # Diagnostics: per pair, the mean cosine and share of probes with cos < 0, averaged over the seeds.
    for cell in ("finetune", "linear_probe"):
        cos, share = {}, {}
        for s in (0, 1):
            records = [json.loads(line) for line in (runs[cell, s] / "diagnostics.jsonl").read_text().splitlines()]
            for pair in records[0]["cos"]:
                values = [r["cos"][pair] for r in records]
                cos.setdefault(pair, []).append(statistics.mean(values))
                share.setdefault(pair, []).append(sum(v < 0 for v in values) / len(values))
        for pair in cos:
            got = results["cells"][cell]["diagnostics"][pair]
            assert got["cos_mean"] == pytest.approx(statistics.mean(cos[pair]), abs=1e-12)
            assert got["conflict_share"] == pytest.approx(statistics.mean(share[pair]), abs=1e-12)
            assert rows[cell][f"{pair} cos / conflict"] == \
                f"{statistics.mean(cos[pair]):+.3f} / {statistics.mean(share[pair]):.0%}"

    # The CSV carries the same numbers.
    import csv
    with open(out / "table.csv") as f:
        csv_rows = {r["name"]: r for r in csv.DictReader(f)}
    assert float(csv_rows["linear_probe"]["overall.mean"]) == pytest.approx(
        results["cells"]["linear_probe"]["metrics"]["overall"]["mean"], abs=1e-12)
    assert csv_rows["original study (BERT-base): linear probe"]["row"] == "reference"

    png = (out / "chart.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image
    assert matplotlib.image.imread(out / "chart.png").shape[0] > 100

    # Again: every run is finished, so nothing trains and no run's results change.
    stamps = {key: (folder / "results.json").stat().st_mtime_ns for key, folder in runs.items()}
    log = _study(out, toy_root, cache)
    assert all(f"skip {c}/seed{s}: finished" in log for c, s in runs) and "run " not in log.replace("skip", "")
    assert {key: (folder / "results.json").stat().st_mtime_ns for key, folder in runs.items()} == stamps
    assert json.loads((out / "results.json").read_text()) == results

    # An unfinished run (its results.json gone, its checkpoint kept) is continued with --resume auto.
    (runs["linear_probe", 1] / "results.json").unlink()
    _study(out, toy_root, cache, "--report-only")
    assert "Not finished: linear_probe/seed1" in (out / "table.md").read_text()
    log = _study(out, toy_root, cache)
    assert "resume linear_probe/seed1" in log and sum(f"skip {c}/seed{s}" in log for c, s in runs) == 3
    assert json.loads((runs["linear_probe", 1] / "results.json").read_text())["dev"] == \
        per_run["linear_probe", 1]["dev"]
    assert {k: (f / "results.json").stat().st_mtime_ns for k, f in runs.items() if k != ("linear_probe", 1)} == \
        {k: v for k, v in stamps.items() if k != ("linear_probe", 1)}


def test_study_folder_refuses_another_profile_or_changed_cell(tmp_path):
    path = CONFIGS / "studies" / "table2_leave_one_out.yaml"
    study, _ = study_mod.load_study(path)
    study_mod.check_study_folder(tmp_path, study, "quick", write=True)
    study_mod.check_study_folder(tmp_path, study, "quick", write=True)  # the same study again: fine
    with pytest.raises(StudyError, match="profile 'quick', not 'full'"):
        study_mod.check_study_folder(tmp_path, study, "full", write=False)
    before = study.profiles["quick"]["train.max_steps"]
    study.cells[0].overrides["train.max_steps"] = 10  # as if the study file had been edited
    with pytest.raises(StudyError, match=rf"cell 'finetune' changed .*train.max_steps: '{before}' -> '10'"):
        study_mod.check_study_folder(tmp_path, study, "quick", write=False)


def test_selecting_runs_for_job_arrays(tmp_path):
    path = CONFIGS / "studies" / "table2_leave_one_out.yaml"
    study, _, runs = study_mod.plan(path, tmp_path, "quick")
    assert [r.name for r in study_mod.select(runs, study, ["finetune"], 2, None)] == ["finetune/seed2"]
    assert [r.name for r in study_mod.select(runs, study, None, None, "leave_out_sts/seed1")] == ["leave_out_sts/seed1"]
    assert len(study_mod.select(runs, study, ["finetune", "linear_probe"], None, None)) == 6
    with pytest.raises(StudyError, match="no cell named 'fine'"):
        study_mod.select(runs, study, ["fine"], None, None)
    with pytest.raises(StudyError, match="--seed-index 3: the study has 3 seeds"):
        study_mod.select(runs, study, None, 3, None)
