"""Log diagnostics records to the run's reporter (TensorBoard and the other `train.report_to`
backends) and to a JSONL file."""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

HEATMAP_TAG = "conflict/layer_heatmap"


class ScalarFigureWriter(Protocol):
    """What :class:`DiagnosticsWriter` needs from a ``SummaryWriter`` or a ``mtkit.report.Reporter``."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> Any: ...

    def add_figure(self, tag: str, figure: Figure, global_step: int | None = None) -> Any: ...


class DiagnosticsWriter:
    """Write each record as reporter scalars + a layer heatmap, and as one JSONL line.

    Scalars: ``conflict/cos/<a>__<b>``, ``conflict/rate``,
    ``pcgrad/removed/<task>``, ``pcgrad/cos_sum``, ``grad/norm/<task>``,
    ``grad/norm_ratio/<a>__<b>``; image: ``conflict/layer_heatmap`` (task
    pairs × layer groups cosine).  ``tag_prefix`` (e.g. ``"stream/"``) keeps
    two sources apart in one event log.  ``summary_writer=None`` writes the
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


def layer_heatmap(layer_cos: dict[str, dict[str, float]], groups: list[str], step: int) -> Figure:
    """Task pairs (rows) × layer groups (columns) cosine, colours fixed to [-1, 1].

    Red is conflict (negative cosine), blue agreement, white orthogonal.
    """
    pairs = list(layer_cos)
    values = [[layer_cos[pair].get(g, 0.0) for g in groups] for pair in pairs]  # [pairs, groups]
    figure = Figure(figsize=(max(4.0, 0.45 * len(groups) + 2.5), max(2.0, 0.45 * len(pairs) + 1.5)))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    image = ax.imshow(values, cmap="RdBu", vmin=-1.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(groups)), labels=groups, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(pairs)), labels=pairs, fontsize=7)
    ax.set_xlabel("layer group")
    ax.set_ylabel("task pair")
    ax.set_title(f"gradient cosine per layer, step {step}", fontsize=9)
    figure.colorbar(image, ax=ax, label="cosine")
    figure.tight_layout()
    return figure
