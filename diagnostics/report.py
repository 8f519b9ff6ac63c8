"""Summarise a run's ``diagnostics.jsonl``: per task pair, how often and where gradients conflict."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diagnostics.writer import cos_scale, layer_heatmap

JSONL_NAME = "diagnostics.jsonl"
MOST_NEGATIVE_LAYERS = 3


def load_records(run_dir: str | os.PathLike[str]) -> list[dict]:
    """Records of ``run_dir/diagnostics.jsonl`` in file order (blank lines skipped).

    Raises FileNotFoundError if the file is missing and ValueError naming the
    file and line number for a line that is not a JSON record with ``step``
    and ``cos``.
    """
    path = Path(run_dir) / JSONL_NAME
    if not path.is_file():
        if not (Path(run_dir) / "config.json").exists():
            raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json) and has no {JSONL_NAME}; "
                                    "diagnose reads the diagnostics.jsonl of a run made by `mtkit train`")
        raise FileNotFoundError(f"{path} not found: this run recorded no gradient diagnostics. Train with "
                                "diagnostics on to get them, e.g. `mtkit train ... --diagnostics.mode=probe "
                                "--diagnostics.every=50` (or mode stream)")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from e
            if not isinstance(record, dict) or "step" not in record or "cos" not in record:
                raise ValueError(f"{path}:{lineno}: not a diagnostics record (needs 'step' and 'cos')")
            records.append(record)
    return records


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    """Population standard deviation (0 for a single value)."""
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def summarize_run(run_dir: str | os.PathLike[str]) -> dict:
    """Per-pair conflict summary over all records of a run.

    Returns ``{"records": n, "steps": [first, last] | None, "tasks", "groups",
    "pairs": {"a__b": {"n", "cos_mean", "cos_std" (population),
    "conflict_share" (fraction of records with cos < 0), "layer_cos_mean"
    {group: mean cosine}, "most_negative_layers" [up to 3 groups with
    negative mean cosine, most negative first]}}, "tasks_summary": {task:
    {"norm_mean", "pcgrad_removed_mean"}}, "conflict_rate_mean",
    "pcgrad_cos_sum_mean"}``.  A pair is averaged over the records that
    contain it.
    """
    records = load_records(run_dir)
    tasks: dict[str, None] = {}
    groups: dict[str, None] = {}
    cos: dict[str, list[float]] = {}
    layer: dict[str, dict[str, list[float]]] = {}
    norm: dict[str, list[float]] = {}
    removed: dict[str, list[float]] = {}
    for record in records:
        for task, value in record.get("norm", {}).items():
            norm.setdefault(task, []).append(value)
        for task, value in record.get("pcgrad_removed", {}).items():
            removed.setdefault(task, []).append(value)
        tasks |= dict.fromkeys(record.get("tasks", []))
        groups |= dict.fromkeys(record.get("groups", []))
        for pair, value in record["cos"].items():
            cos.setdefault(pair, []).append(value)
        for pair, per_group in record.get("layer_cos", {}).items():
            for group, value in per_group.items():
                layer.setdefault(pair, {}).setdefault(group, []).append(value)

    pairs = {}
    for pair, values in cos.items():
        layer_mean = {g: _mean(v) for g, v in layer.get(pair, {}).items()}
        negative = sorted((v, g) for g, v in layer_mean.items() if v < 0)
        pairs[pair] = {
            "n": len(values),
            "cos_mean": _mean(values),
            "cos_std": _std(values),
            "conflict_share": sum(v < 0 for v in values) / len(values),
            "layer_cos_mean": layer_mean,
            "most_negative_layers": [g for _, g in negative[:MOST_NEGATIVE_LAYERS]],
        }
    steps = [record["step"] for record in records]
    return {
        "records": len(records),
        "steps": [min(steps), max(steps)] if steps else None,
        "tasks": list(tasks),
        "groups": list(groups),
        "pairs": pairs,
        "tasks_summary": {t: {"norm_mean": _mean(norm[t]), "pcgrad_removed_mean": _mean(removed.get(t, [0.0]))}
                          for t in norm},
        "conflict_rate_mean": _mean([r["conflict_rate"] for r in records if "conflict_rate" in r] or [0.0]),
        "pcgrad_cos_sum_mean": _mean([r["pcgrad_cos_sum"] for r in records if "pcgrad_cos_sum" in r] or [1.0]),
    }


def format_table(summary: dict) -> str:
    """Fixed-width table of :func:`summarize_run`'s output, one row per task pair."""
    steps = summary["steps"]
    span = f", steps {steps[0]}..{steps[1]}" if steps else ""
    lines = [f"{summary['records']} records{span}"]
    if not summary["pairs"]:
        return "\n".join(lines)
    width = max(len("pair"), *(len(p) for p in summary["pairs"]))
    header = f"{'pair':<{width}}  {'cos mean':>8}  {'cos std':>7}  {'conflict':>8}  most negative layers"
    lines += [header, "-" * len(header)]
    for pair, s in summary["pairs"].items():
        worst = ", ".join(f"{g} ({s['layer_cos_mean'][g]:+.3f})" for g in s["most_negative_layers"])
        lines.append(
            f"{pair:<{width}}  {s['cos_mean']:>+8.3f}  {s['cos_std']:>7.3f}  "
            f"{s['conflict_share']:>8.1%}  {worst or '-'}"
        )
    if summary.get("tasks_summary"):
        tw = max(len("task"), *(len(t) for t in summary["tasks_summary"]))
        header = f"{'task':<{tw}}  {'grad norm':>9}  {'PCGrad would remove':>19}"
        lines += ["", header, "-" * len(header)]
        for task, t in summary["tasks_summary"].items():
            lines.append(f"{task:<{tw}}  {t['norm_mean']:>9.3f}  {t['pcgrad_removed_mean']:>19.1%}")
        lines += ["", f"mean conflict rate (share of conflicting pairs): {summary['conflict_rate_mean']:.3f}",
                  f"mean cosine(plain sum, PCGrad combination): {summary['pcgrad_cos_sum_mean']:.4f}"]
    return "\n".join(lines)


def plot_run(run_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Write :func:`cos_figure` of the run's records as a PNG."""
    figure = cos_figure(load_records(run_dir))
    figure.savefig(path, format="png", dpi=figure.dpi)


def plot_layers(run_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> int | None:
    """Write the layer heatmap of the run's last record that has per-layer cosines (the figure TensorBoard
    shows at that step) as a PNG; returns its step, or None (and writes nothing) when no record has them."""
    records = [r for r in load_records(run_dir) if r.get("layer_cos") and r.get("groups")]
    if not records:
        return None
    last = max(records, key=lambda r: r["step"])
    figure = layer_heatmap(last["layer_cos"], last["groups"], last["step"])
    figure.savefig(path, format="png", dpi=figure.dpi)
    return last["step"]


def cos_figure(records: list[dict]) -> Figure:
    """Each pair's overall gradient cosine against step, with a zero line.

    The y axis is symmetric about 0 and spans 1.15 × the largest |cos| plotted (at most ±1.05,
    ±1 with no nonzero value), so cosines of a few hundredths are not flattened onto the zero line.
    Non-finite cosines are gaps in their line and do not count towards the scale.
    """
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in sorted(records, key=lambda r: r["step"]):
        for pair, value in record["cos"].items():
            steps, values = series.setdefault(pair, ([], []))
            steps.append(record["step"])
            values.append(math.nan if value is None else value)
    m = cos_scale([v for _, values in series.values() for v in values])
    limit = min(1.15 * m, 1.05) if m > 0 else 1.0
    figure = Figure(figsize=(7.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.axhline(0.0, color="black", linewidth=0.8)
    for pair, (steps, values) in series.items():
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=pair)
    ax.set_ylim(-limit, limit)
    ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient cosine")
    ax.set_title("task-pair gradient cosine (below 0: conflict)")
    if series:
        ax.legend(fontsize=8)
    figure.tight_layout()
    return figure
