"""Log diagnostics records to the run's reporter (TensorBoard and the other `train.report_to`
backends) and to a JSONL file."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Protocol

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

HEATMAP_TAG = "conflict/layer_heatmap"
NAN_GREY = "0.75"


class ScalarFigureWriter(Protocol):
    """What :class:`DiagnosticsWriter` needs from a ``SummaryWriter`` or a ``mtkit.report.Reporter``."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> Any: ...

    def add_figure(self, tag: str, figure: Figure, global_step: int | None = None) -> Any: ...


class DiagnosticsWriter:
    """Write each record as reporter scalars + a layer heatmap, and as one JSONL line.

    Scalars: ``conflict/cos/<a>__<b>``, ``conflict/rate``,
    ``pcgrad/removed/<task>``, ``pcgrad/cos_sum``, ``grad/norm/<task>``,
    ``grad/norm_ratio/<a>__<b>``; image: ``conflict/layer_heatmap`` (task
    pairs × layer groups cosine, :func:`layer_heatmap`).  ``tag_prefix``
    (e.g. ``"stream/"``) keeps two sources apart in one event log.  ``summary_writer=None`` writes the
    JSONL only.  The JSONL file is appended to and flushed after every record,
    so a crashed run keeps everything written so far.
    """

    def __init__(
        self,
        summary_writer: ScalarFigureWriter | None,
        jsonl_path: str | os.PathLike[str],
        tag_prefix: str = "",
    ) -> None:
        self.summary_writer = summary_writer
        self.tag_prefix = tag_prefix
        self.path = jsonl_path
        self._jsonl = open(jsonl_path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        """Log one record (as produced by :func:`diagnostics.stats.summarize`)."""
        if self.summary_writer is not None:
            self._write_tensorboard(record)
        try:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        except OSError as e:  # a full disk: say which file, the bare error does not
            raise OSError(e.errno, f"cannot write diagnostics to {self.path}: {e.strerror}") from e

    def close(self) -> None:
        """Close the JSONL file; the summary writer belongs to the caller."""
        self._jsonl.close()

    def __enter__(self) -> DiagnosticsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write_tensorboard(self, record: dict) -> None:
        step = record["step"]
        scalars = {"conflict/rate": record["conflict_rate"], "pcgrad/cos_sum": record["pcgrad_cos_sum"]}
        scalars |= {f"conflict/cos/{pair}": v for pair, v in record["cos"].items()}
        scalars |= {f"grad/norm_ratio/{pair}": v for pair, v in record["norm_ratio"].items()}
        scalars |= {f"grad/norm/{task}": v for task, v in record["norm"].items()}
        scalars |= {f"pcgrad/removed/{task}": v for task, v in record["pcgrad_removed"].items()}
        for tag, value in scalars.items():
            self.summary_writer.add_scalar(self.tag_prefix + tag, value, global_step=step)
        if record["layer_cos"] and record["groups"]:
            figure = layer_heatmap(record["layer_cos"], record["groups"], step)
            self.summary_writer.add_figure(self.tag_prefix + HEATMAP_TAG, figure, global_step=step)


def cos_scale(values) -> float:
    """Largest finite |cosine| in ``values``; 0.0 when there is none (all NaN, None or empty)."""
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    return max(finite, default=0.0)


def format_cos(value: float | None, scale: float) -> str:
    """``value`` with as many decimals as a figure whose largest |cos| is ``scale`` needs.

    Three decimals down to a scale of 0.01 (``-0.031`` beside ``0.083``), one more per decade below,
    so the largest value keeps at least two significant digits and the small ones do not all read
    ``0.00``; NaN and None read ``n/a``.
    """
    if value is None or not math.isfinite(value):
        return "n/a"
    decimals = 3 if scale <= 0 or scale >= 0.01 else 1 - math.floor(math.log10(scale))
    if decimals > 5:  # |cos| below 1e-4 everywhere: fixed point would be a row of zeros
        return f"{value:.1e}"
    return f"{value:.{decimals}f}"


def _text_colour(rgba: tuple[float, float, float, float]) -> str:
    # Perceived brightness of the cell: the saturated ends of RdBu are dark, the middle nearly white.
    r, g, b, _ = rgba
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def layer_heatmap(layer_cos: dict[str, dict[str, float]], groups: list[str], step: int) -> Figure:
    """Task pairs (rows) × layer groups (columns) cosine, each cell annotated with its value.

    Colours run from -m (red, conflict) through white (0) to +m (blue, agreement), m being the
    largest |cos| in the figure, so the small cosines of real jobs still differ in colour; the
    colour bar label states m.  A group missing from a pair, or a NaN/None cosine, is a grey
    ``n/a`` cell.  With no nonzero finite value m is 1.  Depends on its arguments only (fixed dpi,
    no pyplot state); the inputs are not modified.
    """
    pairs = list(layer_cos)
    values = np.array(
        [[_as_float(layer_cos[pair].get(g)) for g in groups] for pair in pairs], dtype=float
    ).reshape(len(pairs), len(groups))  # [pairs, groups]
    m = cos_scale(values.ravel().tolist())
    if m > 0:
        label = f"cosine (scale ±{format_cos(m, m)},\nthe largest |cos| shown)"
        limit = m
    else:
        # vmin == vmax would paint every cell the red end; ±1 keeps zeros white.
        limit = 1.0
        label = "cosine (scale ±1: no nonzero value)" if np.isfinite(values).any() else "cosine (no values)"
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad=NAN_GREY)
    norm = Normalize(vmin=-limit, vmax=limit)

    # ~0.7 in per column fits an 8-character value at 8 pt; rows and margins sized for tick labels.
    figure = Figure(figsize=(max(4.5, 0.7 * len(groups) + 3.0), max(2.6, 0.45 * len(pairs) + 2.2)), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    image = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    for i in range(len(pairs)):
        for j in range(len(groups)):
            v = values[i, j]
            colour = _text_colour(cmap(norm(v))) if np.isfinite(v) else "black"
            ax.text(j, i, format_cos(v, m), ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(len(groups)), labels=groups, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_yticks(range(len(pairs)), labels=pairs, fontsize=8)
    ax.set_xlabel("layer group", fontsize=9)
    ax.set_ylabel("task pair", fontsize=9)
    ax.set_title(f"gradient cosine per layer, step {step} (red: conflict, blue: agreement)", fontsize=9)
    colorbar = figure.colorbar(image, ax=ax, ticks=[-limit, -limit / 2, 0.0, limit / 2, limit])
    colorbar.ax.set_yticklabels([format_cos(t, limit) for t in (-limit, -limit / 2, 0.0, limit / 2, limit)])
    colorbar.ax.tick_params(labelsize=8)
    colorbar.set_label(label, fontsize=8)
    figure.tight_layout()
    return figure


def _as_float(value: float | None) -> float:
    return math.nan if value is None else float(value)
