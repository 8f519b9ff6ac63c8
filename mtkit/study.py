"""Studies: a grid of cells (named config overrides) x seeds, each a resumable run, gathered into one table.

    mtkit study configs/studies/debug_tiny.yaml --out runs/study_tiny [--jobs 2] [--profile quick]

A study YAML names a base config (a run or a pipeline config, relative to the study file), `profiles` (the
overrides that fit a machine: `quick` for a small CPU, `full` for GPU nodes), `cells` (name, overrides,
optional `baseline` and `config`) and `seeds`. Each cell x seed trains in DIR/<cell>/seed<k> through
`launchers/train.py` in a subprocess with `--resume auto`: a finished run (results.json) is skipped, an
interrupted one continues from its latest checkpoint. The table (DIR/table.md, table.csv, results.json and
a bar chart) reports mean and spread over seeds, and each cell against its baseline with a paired t-test
over the seeds both cells share.

Overrides apply in this order, later ones winning: the study's `overrides`, the profile's, the cell's, the
cell's own profile entry, the command line's, then `train.seed`.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mtkit import config as config_mod
from mtkit.checkpoint import write_json

log = logging.getLogger("mtkit.study")

LAUNCHER = Path(__file__).resolve().parents[1] / "launchers" / "train.py"
SIGNIFICANCE = 0.05
TEST_NAME = "paired t-test over the seeds both cells share (scipy.stats.ttest_rel)"


class StudyError(ValueError):
    pass


@dataclass
class CellConfig:
    name: str = ""
    config: Optional[str] = None        # this cell's base config, relative to the study file (default: the study's)
    overrides: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)  # this cell's extra overrides per profile
    baseline: Any = None                # a cell name, or {task: cell, "*": cell}; default: the study's


@dataclass
class ReferenceConfig:
    label: str = "reference"            # printed before each row's name, e.g. "original study (BERT-base)"
    rows: list[dict[str, Any]] = field(default_factory=list)  # {name: ..., "<task>.<metric>": value, ...}


@dataclass
class StudyConfig:
    name: str = "study"
    config: str = ""                    # base run or pipeline config, relative to the study file
    seeds: Any = 3                      # a count (seeds 0..n-1) or a list of seeds
    metric: str = "overall"             # the bar chart's metric, "overall" or "<task>.<metric>"
    metrics: list[str] = field(default_factory=list)  # table.md columns; default: every dev metric
    baseline: Any = None                # default baseline of every cell (a cell name or a per-task mapping)
    overrides: dict[str, Any] = field(default_factory=dict)   # every cell, every profile
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    cells: list[CellConfig] = field(default_factory=list)
    reference: Optional[ReferenceConfig] = None


@dataclass
class Run:
    cell: str
    seed: int
    out: Path
    config: Path
    overrides: dict[str, str]           # exactly what the launcher gets, as --key=value

    @property
    def name(self) -> str:
        return f"{self.cell}/seed{self.seed}"

    @property
    def done(self) -> bool:
        return (self.out / "results.json").exists()

    def command(self, launcher: list[str]) -> list[str]:
        flags = [f"--{k}={v}" for k, v in self.overrides.items()]
        return [*launcher, str(LAUNCHER), "--config", str(self.config), "--out", str(self.out),
                "--resume", "auto", *flags]


# ---------------------------------------------------------------- the study file

def load_study(path: str | os.PathLike) -> tuple[StudyConfig, dict]:
    """The study and its YAML line numbers; errors name the file, line and problem."""
    source = str(path)
    raw, lines = config_mod._read_yaml(path)
    study = config_mod._build(StudyConfig, raw, "", config_mod._Where(source, lines))

    def where(key: str) -> str:
        line = lines.get(key)
        return f"{source}:{line}" if line else source

    if not study.config and not all(c.config for c in study.cells):
        raise StudyError(f"{source}: name a base config (config: ../x.yaml), or one per cell")
    names = [c.name for c in study.cells]
    if not names:
        raise StudyError(f"{source}: declare at least one cell (cells: [{{name: ..., overrides: {{...}}}}])")
    for i, name in enumerate(names):
        if not name or name in names[:i] or "/" in name:
            raise StudyError(f"{where(f'cells.{name or i}')}: cell names must be unique, non-empty and without "
                             f"'/', got {names}")
    for cell in study.cells:
        if cell.baseline is not None:
            _check_baseline(cell.baseline, names, f"{where(f'cells.{cell.name}.baseline')}: cell {cell.name!r}")
        unknown = sorted(set(cell.profiles) - set(study.profiles))
        if unknown:
            raise StudyError(f"{where(f'cells.{cell.name}.profiles')}: cell {cell.name!r} has overrides for "
                             f"profile(s) {unknown} that the study does not declare; profiles: {sorted(study.profiles)}")
    if study.baseline is not None:
        _check_baseline(study.baseline, names, f"{where('baseline')}: the study")
    seeds(study, None, where("seeds"))
    return study, lines


def _check_baseline(baseline: Any, names: list[str], who: str) -> None:
    targets = list(baseline.values()) if isinstance(baseline, dict) else [baseline]
    for target in targets:
        if not isinstance(target, str) or target not in names:
            raise StudyError(f"{who} names baseline {target!r}, which is not a cell; cells: {names} (a baseline "
                             "is a cell name, or a mapping {task: cell, '*': cell})")


def seeds(study: StudyConfig, count: int | None = None, where: str = "seeds") -> list[int]:
    """The study's seeds: `seeds: n` is 0..n-1, a list is taken as is; `count` keeps the first n."""
    value = study.seeds
    if isinstance(value, bool) or not (isinstance(value, int) and value >= 1 or isinstance(value, list) and value
                                       and all(isinstance(s, int) and not isinstance(s, bool) for s in value)):
        raise StudyError(f"{where}: seeds = {value!r}; use a count >= 1 or a list of integer seeds")
    if isinstance(value, int):
        return list(range(count if count is not None else value))
    if count is not None and count > len(value):
        raise StudyError(f"--seeds {count}: the study lists only {len(value)} seeds ({value})")
    return list(value[:count] if count is not None else value)


def baseline_of(study: StudyConfig, cell: CellConfig, metric: str) -> str | None:
    """The cell a metric of `cell` is compared with: a per-task mapping picks by the metric's task ("*" for
    the others and for `overall`); a cell is not compared with itself."""
    baseline = cell.baseline if cell.baseline is not None else study.baseline
    if isinstance(baseline, dict):
        task = metric.split(".", 1)[0] if "." in metric else None
        baseline = baseline.get(task, baseline.get("*")) if task else baseline.get("*")
    return baseline if baseline != cell.name else None


def flat_overrides(overrides: dict, prefix: str = "") -> dict[str, str]:
    """Dotted keys with the string values the launcher's --key=value flags carry (nested mappings become
    dotted keys, lists comma-joined), so validation here and the run's own parse see the same text."""
    out: dict[str, str] = {}
    for key, value in overrides.items():
        key = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_overrides(value, key + "."))
        elif isinstance(value, (list, tuple)):
            if any(isinstance(v, (dict, list, tuple)) for v in value):
                raise StudyError(f"override {key}: a list of mappings cannot be passed as a flag; set its "
                                 "fields one by one (tasks.<name>.<field>)")
            out[key] = ",".join(_text(v) for v in value)
        else:
            out[key] = _text(value)
    return out


def _text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def plan(path: str | os.PathLike, out: str | os.PathLike, profile: str | None = None, count: int | None = None,
         extra: dict | None = None) -> tuple[StudyConfig, str | None, list[Run]]:
    """Every run of the study (seed-major, so a partial study has every cell's first seeds first)."""
    path, out = Path(path), Path(out)
    study, lines = load_study(path)
    if profile is None and study.profiles:
        profile = "quick" if "quick" in study.profiles else None
        if profile is None:
            raise StudyError(f"{path}: choose a profile with --profile; profiles: {sorted(study.profiles)}")
    if profile is not None and profile not in study.profiles:
        raise StudyError(f"--profile {profile}: {path} declares profiles {sorted(study.profiles)}")
    runs = []
    for seed in seeds(study, count, f"{path}:{lines.get('seeds', '')}".rstrip(":")):
        for cell in study.cells:
            merged = {**cell_overrides(study, cell, profile), **flat_overrides(extra or {}), "train.seed": str(seed)}
            config = (path.parent / (cell.config or study.config)).resolve()
            runs.append(Run(cell.name, seed, out / cell.name / f"seed{seed}", config, merged))
    return study, profile, runs


def cell_overrides(study: StudyConfig, cell: CellConfig, profile: str | None) -> dict[str, str]:
    """What the study file sets for a cell under a profile (the command line's overrides and the seed aside)."""
    return {**flat_overrides(study.overrides), **flat_overrides(study.profiles.get(profile) or {}),
            **flat_overrides(cell.overrides), **flat_overrides(cell.profiles.get(profile) or {})}


def check_config(run: Run, study_path: Path, lines: dict) -> None:
    """Load and validate the run's resolved config (every stage's, for a pipeline) without building anything."""
    from mtkit.pipeline import stage_config
    line = lines.get(f"cells.{run.cell}")
    try:
        if config_mod.is_pipeline(run.config):
            pipe = config_mod.load_pipeline(run.config)
            names = [s.name for s in pipe.stages]
            for stage in pipe.stages:
                stage_config(run.config, stage, run.out, run.overrides, names)
        else:
            config_mod.load(run.config, run.overrides)
    except config_mod.ConfigError as e:
        raise StudyError(f"{study_path}{f':{line}' if line else ''}: cell {run.cell!r}: {e}") from None


# ---------------------------------------------------------------- running

def run_study(path: str | os.PathLike, out: str | os.PathLike, profile: str | None = None, jobs: int = 1,
              count: int | None = None, cells: list[str] | None = None, seed_index: int | None = None,
              only: str | None = None, extra: dict | None = None, launcher: str | None = None,
              report_only: bool = False, dry_run: bool = False) -> dict:
    """Run the selected runs of a study that are not finished, then write the table; returns results.json's
    content. Failed runs are reported after the table is written (StudyError)."""
    path, out = Path(path), Path(out)
    study, profile, runs = plan(path, out, profile, count, extra)
    _, lines = load_study(path)
    selected = select(runs, study, cells, seed_index, only)
    if launcher and jobs > 1 and not report_only:
        raise StudyError("--jobs > 1 with --launcher: parallel multi-rank launches on one machine would share "
                         "a rendezvous port; run one at a time, or one run per job with --only")
    if not report_only:
        for run in {r.cell: r for r in reversed(selected)}.values():  # seeds differ only in train.seed
            check_config(run, path, lines)
    check_study_folder(out, study, profile, write=not (report_only or dry_run))
    failed: list[str] = []
    if not report_only:
        launch = shlex.split(launcher) if launcher else [sys.executable]
        if dry_run:
            for run in selected:
                print(shlex.join(run.command(launch)))
            return {}
        failed = execute(selected, launch, max(1, jobs))
    results = gather(study, profile, runs, out)
    write_outputs(results, out)
    if failed:
        raise StudyError(f"{len(failed)} run(s) failed: " + "; ".join(failed) + f"; the table in {out} has the "
                         "runs that finished. Fix the cause and run the same command again to continue")
    return results


def check_study_folder(out: Path, study: StudyConfig, profile: str | None, write: bool) -> None:
    """Refuse to mix profiles or changed cells in one study folder: finished runs are skipped, so a changed
    cell would silently put old and new settings in one row. Command-line overrides are not compared (a data
    root differs between machines); a run's own resume check covers them for unfinished runs."""
    spec = {"study": study.name, "profile": profile,
            "cells": {c.name: {"config": c.config or study.config, "overrides": cell_overrides(study, c, profile)}
                      for c in study.cells}}
    stored_path = out / "study.json"
    if stored_path.exists():
        stored = json.loads(stored_path.read_text())
        if stored.get("profile") != profile:
            raise StudyError(f"{out} holds study runs with profile {stored.get('profile')!r}, not {profile!r}; "
                             "pass the same --profile, or use another --out")
        for cell, now in spec["cells"].items():
            before = stored.get("cells", {}).get(cell)
            if before is not None and before != now:
                keys = sorted(k for k in before["overrides"].keys() | now["overrides"].keys()
                              if before["overrides"].get(k) != now["overrides"].get(k))
                what = ", ".join(f"{k}: {before['overrides'].get(k, '<unset>')!r} -> "
                                 f"{now['overrides'].get(k, '<unset>')!r}" for k in keys) or "its config file"
                raise StudyError(f"cell {cell!r} changed since {out} was started ({what}); its finished runs "
                                 f"would be skipped. Remove {out / cell} to rerun it, or use another --out")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        write_json(stored_path, spec)


def select(runs: list[Run], study: StudyConfig, cells: list[str] | None, seed_index: int | None,
           only: str | None) -> list[Run]:
    names = [c.name for c in study.cells]
    for cell in cells or []:
        if cell not in names:
            raise StudyError(f"--cells: no cell named {cell!r}; cells: {names}")
    chosen = [r for r in runs if not cells or r.cell in cells]
    if seed_index is not None:
        all_seeds = sorted({r.seed for r in runs}, key=[r.seed for r in runs].index)
        if not 0 <= seed_index < len(all_seeds):
            raise StudyError(f"--seed-index {seed_index}: the study has {len(all_seeds)} seeds {all_seeds} "
                             f"(indices 0..{len(all_seeds) - 1})")
        chosen = [r for r in chosen if r.seed == all_seeds[seed_index]]
    if only is not None:
        cell, _, seed = str(only).partition("/")
        seed = seed.removeprefix("seed")
        chosen = [r for r in chosen if r.cell == cell and str(r.seed) == seed]
        if not chosen:
            raise StudyError(f"--only {only}: no such run; runs look like CELL/seedK, e.g. {runs[0].name}")
    return chosen


def execute(runs: list[Run], launcher: list[str], jobs: int) -> list[str]:
    """Run what is not finished, `jobs` at a time, each with its share of the CPU threads; returns failures."""
    todo = []
    for run in runs:
        if run.done:
            log.info("skip %s: finished (%s)", run.name, run.out / "results.json")
        else:
            todo.append(run)
    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // jobs)),
           "MKL_NUM_THREADS": str(max(1, threads // jobs))}

    def one(run: Run) -> str | None:
        run.out.parent.mkdir(parents=True, exist_ok=True)
        logfile = run.out.parent / f"seed{run.seed}.log"
        verb = "resume" if (run.out / "checkpoints").exists() or (run.out / "config.json").exists() else "run"
        command = run.command(launcher)
        log.info("%s %s (log: %s)", verb, run.name, logfile)
        with open(logfile, "a") as f:
            f.write(f"$ {shlex.join(command)}\n")
            f.flush()
            rc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0 or not run.done:
            log.error("%s failed (exit %d); see %s", run.name, rc, logfile)
            return f"{run.name} (exit {rc}, log {logfile})"
        log.info("done %s", run.name)
        return None

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [f for f in pool.map(one, todo) if f]


# ---------------------------------------------------------------- gathering

def run_metrics(results: dict) -> dict[str, float]:
    """A run's dev metrics as {"<task>.<metric>": value, "overall": value} (numbers only)."""
    out = {}
    for task, metrics in results.get("dev", {}).items():
        if isinstance(metrics, dict):
            out.update({f"{task}.{m}": float(v) for m, v in metrics.items() if _number(v)})
        elif _number(metrics):
            out[task] = float(metrics)
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def run_diagnostics(run: Run, results: dict) -> dict[str, dict[str, float]] | None:
    """{pair: {cos_mean, conflict_share}} from the run's diagnostics (a pipeline's last stage), or None."""
    from diagnostics.report import summarize_run
    folder = run.out / list(results["stages"])[-1] if "stages" in results else run.out
    if not (folder / "diagnostics.jsonl").exists():
        return None
    pairs = summarize_run(folder)["pairs"]
    return {p: {"cos_mean": s["cos_mean"], "conflict_share": s["conflict_share"]} for p, s in pairs.items()} or None


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None below two values."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def compare(cell: dict[int, float], base: dict[int, float]) -> dict:
    """Cell against baseline: difference of the means shown in the table, and a paired t-test over the seeds
    both have (the same seed shares data order and initialisation, so pairing removes that noise)."""
    from scipy.stats import ttest_rel
    shared = sorted(cell.keys() & base.keys())
    delta = (mean_std(list(cell.values()))[0] - mean_std(list(base.values()))[0]) if cell and base else None
    p = None
    if len(shared) >= 2:
        p = float(ttest_rel([cell[s] for s in shared], [base[s] for s in shared]).pvalue)
        p = None if math.isnan(p) else p  # identical differences on every seed: no spread to test against
    return {"delta": delta, "n": len(shared), "p": p, "significant": p is not None and p < SIGNIFICANCE}


def gather(study: StudyConfig, profile: str | None, runs: list[Run], out: Path) -> dict:
    """results.json of the study: per cell and metric mean, std, n and the per-seed values, comparisons with
    baselines, diagnostics averaged over seeds, the reference rows and the missing runs."""
    per_cell: dict[str, dict[str, dict[int, float]]] = {c.name: {} for c in study.cells}
    diag: dict[str, dict[str, dict[str, list[float]]]] = {c.name: {} for c in study.cells}
    done: dict[str, list[int]] = {c.name: [] for c in study.cells}
    missing, order = [], {}
    for run in runs:
        if not run.done:
            missing.append(run.name)
            continue
        results = json.loads((run.out / "results.json").read_text())
        done[run.cell].append(run.seed)
        for metric, value in run_metrics(results).items():
            order.setdefault(metric, len(order))
            per_cell[run.cell].setdefault(metric, {})[run.seed] = value
        for pair, stats in (run_diagnostics(run, results) or {}).items():
            for key, value in stats.items():
                diag[run.cell].setdefault(pair, {}).setdefault(key, []).append(value)
    metrics = sorted(order, key=order.get)
    cells = {}
    for cell in study.cells:
        entry = {"seeds": done[cell.name], "runs": {str(r.seed): str(r.out) for r in runs if r.cell == cell.name},
                 "metrics": {}, "comparisons": {}, "diagnostics": {}}
        for metric in metrics:
            values = per_cell[cell.name].get(metric, {})
            mean, std = mean_std(list(values.values()))
            entry["metrics"][metric] = {"mean": mean, "std": std, "n": len(values),
                                        "seeds": list(values), "values": list(values.values())}
            base = baseline_of(study, cell, metric)
            if base is not None and values:
                entry["comparisons"][metric] = {"baseline": base,
                                                **compare(values, per_cell[base].get(metric, {}))}
        for pair, stats in diag[cell.name].items():
            entry["diagnostics"][pair] = {k: sum(v) / len(v) for k, v in stats.items()} | \
                                         {"n": len(stats["cos_mean"])}
        cells[cell.name] = entry
    reference = None
    if study.reference is not None:
        reference = {"label": study.reference.label,
                     "rows": [{k: v for k, v in row.items()} for row in study.reference.rows]}
    return {"study": study.name, "profile": profile, "seeds": sorted({r.seed for r in runs}),
            "main_metric": study.metric, "table_metrics": study.metrics or metrics, "metrics": metrics,
            "test": f"{TEST_NAME}, p < {SIGNIFICANCE}", "cells": cells, "reference": reference,
            "missing": missing}


# ---------------------------------------------------------------- writing

def fmt_delta(comparison: dict) -> str:
    """`+0.012*` (p < 0.05), `+0.012` (not significant) or `+0.012 n/a` (fewer than two shared seeds)."""
    if comparison.get("delta") is None:
        return "n/a"
    text = f"{comparison['delta']:+.3f}"
    if comparison["n"] < 2 or comparison["p"] is None:
        return text + " n/a"
    return text + ("*" if comparison["significant"] else "")


def fmt_value(stats: dict) -> str:
    if stats.get("mean") is None:
        return "–"
    return f"{stats['mean']:.3f}" + (f" ± {stats['std']:.3f}" if stats.get("std") is not None else "")


def table_md(results: dict) -> str:
    metrics = results["table_metrics"]
    pairs = list(dict.fromkeys(p for c in results["cells"].values() for p in c["diagnostics"]))
    header = ["cell", "n", *metrics, "baseline", *(f"{p} cos / conflict" for p in pairs)]
    rows = []
    for name, cell in results["cells"].items():
        values = []
        for metric in metrics:
            stats = cell["metrics"].get(metric, {})
            comparison = cell["comparisons"].get(metric)
            values.append(fmt_value(stats) + (f" ({fmt_delta(comparison)})" if comparison else ""))
        baselines = list(dict.fromkeys(c["baseline"] for c in cell["comparisons"].values()))
        diag = [f"{cell['diagnostics'][p]['cos_mean']:+.3f} / {cell['diagnostics'][p]['conflict_share']:.0%}"
                if p in cell["diagnostics"] else "–" for p in pairs]
        rows.append([name, str(len(cell["seeds"])), *values, ", ".join(baselines) or "–", *diag])
    reference = results.get("reference")
    for row in (reference or {}).get("rows", []):
        rows.append([f"{reference['label']}: {row.get('name', '')}", "", *(
            f"{row[m]:.3f}" if _number(row.get(m)) else "" for m in metrics), "", *("" for _ in pairs)])
    lines = [f"# Study {results['study']}" + (f" (profile {results['profile']})" if results["profile"] else ""),
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"Dev metrics, mean ± sample standard deviation over seeds {results['seeds']} (n: seeds "
              "finished). In parentheses: difference of means against the cell in the baseline column; "
              f"* marks p < {SIGNIFICANCE} in a {TEST_NAME}; n/a: fewer than two shared seeds."]
    if pairs:
        lines.append("cos / conflict: gradient cosine of the task pair on the shared encoder and the share of "
                     "probes where it was negative (`mtkit diagnose`), averaged over seeds.")
    if reference:
        lines.append(f"Rows labelled '{reference['label']}' are published numbers, not runs of this study.")
    if results["missing"]:
        lines.append(f"Not finished: {', '.join(results['missing'])}.")
    return "\n".join(lines) + "\n"


def table_csv(results: dict) -> str:
    metrics = results["metrics"]
    pairs = list(dict.fromkeys(p for c in results["cells"].values() for p in c["diagnostics"]))
    header = ["row", "name", "n"]
    for m in metrics:
        header += [f"{m}.mean", f"{m}.std", f"{m}.n", f"{m}.baseline", f"{m}.delta", f"{m}.p", f"{m}.significant"]
    header += [f"{p}.{k}" for p in pairs for k in ("cos_mean", "conflict_share")]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for name, cell in results["cells"].items():
        row = ["cell", name, len(cell["seeds"])]
        for m in metrics:
            s, c = cell["metrics"].get(m, {}), cell["comparisons"].get(m, {})
            row += [s.get("mean"), s.get("std"), s.get("n"), c.get("baseline"), c.get("delta"), c.get("p"),
                    c.get("significant")]
        row += [cell["diagnostics"].get(p, {}).get(k) for p in pairs for k in ("cos_mean", "conflict_share")]
        writer.writerow(["" if v is None else v for v in row])
    reference = results.get("reference") or {}
    for ref in reference.get("rows", []):
        row = ["reference", f"{reference['label']}: {ref.get('name', '')}", ""]
        for m in metrics:
            row += [ref.get(m, ""), "", "", "", "", "", ""]
        writer.writerow(row + ["" for _ in pairs for _ in range(2)])
    return buf.getvalue()


def plot(results: dict, path: Path) -> None:
    """Bar chart of the main metric per cell, error bars one sample std; reference values as dashed lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    metric = results["main_metric"]
    names = list(results["cells"])
    stats = [results["cells"][n]["metrics"].get(metric, {}) for n in names]
    means = [s.get("mean") if s.get("mean") is not None else math.nan for s in stats]
    errors = [s.get("std") or 0.0 for s in stats]
    figure = Figure(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.8))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.bar(range(len(names)), means, yerr=errors, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    reference = results.get("reference") or {}
    for row in reference.get("rows", []):
        if _number(row.get(metric)):
            ax.axhline(row[metric], linestyle="--", color="gray", linewidth=1)
            ax.annotate(f"{reference['label']}: {row.get('name', '')}", (len(names) - 0.5, row[metric]),
                        ha="right", va="bottom", fontsize=7, color="gray")
    ax.set_ylabel(f"dev {metric} (mean ± std)")
    ax.set_title(results["study"])
    figure.tight_layout()
    figure.savefig(path, format="png")


def write_outputs(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    (out / "table.md").write_text(table_md(results))
    (out / "table.csv").write_text(table_csv(results))
    plot(results, out / "chart.png")
