"""DiagnosticsWriter output read back from TensorBoard event files and JSONL; run reports; the
heatmap and cosine plots as rendered, and as a real TensorBoard server serves them."""

import copy
import io
import json
import math
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from diagnostics.gram import group_grams
from diagnostics.report import cos_figure, format_table, load_records, plot_layers, plot_run, summarize_run
from diagnostics.stats import summarize
from diagnostics.writer import HEATMAP_TAG, DiagnosticsWriter, format_cos, layer_heatmap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_records() -> list[dict]:
    records = []
    for step in (0, 10, 20):
        G = torch.randn(3, 16, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        K = group_grams(G, torch.tensor([0] * 5 + [1] * 6 + [2] * 5), 3)
        groups, tasks = ["embeddings", "layer.0", "pooler"], ["sst", "qqp", "sts"]
        records.append(summarize(K, groups, tasks, step, order=[0, 1, 2]))
    return records


def hand_record(step: int, cos: dict[str, float], layer_cos: dict[str, dict[str, float]]) -> dict:
    return {"step": step, "tasks": ["a", "b", "c"], "groups": ["emb", "l0", "l1"], "cos": cos,
            "layer_cos": layer_cos}


def test_writer_scalars_heatmap_and_jsonl(tmp_path):
    records = make_records()
    summary_writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    with DiagnosticsWriter(summary_writer, tmp_path / "diagnostics.jsonl") as writer:
        for record in records:
            writer.write(record)
        # Flushed per record: readable before close.
        assert len((tmp_path / "diagnostics.jsonl").read_text().splitlines()) == 3
    summary_writer.close()

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected_tags = {"conflict/rate", "pcgrad/cos_sum"}
    for pair in ("sst__qqp", "sst__sts", "qqp__sts"):
        expected_tags |= {f"conflict/cos/{pair}", f"grad/norm_ratio/{pair}"}
    for task in ("sst", "qqp", "sts"):
        expected_tags |= {f"grad/norm/{task}", f"pcgrad/removed/{task}"}
    assert tags == expected_tags
    events = acc.Scalars("conflict/cos/sst__sts")
    assert [e.step for e in events] == [0, 10, 20]
    assert [e.value for e in events] == pytest.approx([r["cos"]["sst__sts"] for r in records], abs=1e-6)
    assert [e.value for e in acc.Scalars("pcgrad/removed/qqp")] == pytest.approx(
        [r["pcgrad_removed"]["qqp"] for r in records], abs=1e-6
    )
    assert acc.Scalars("conflict/rate")[1].value == pytest.approx(records[1]["conflict_rate"])

    assert HEATMAP_TAG in acc.Tags()["images"]
    images = acc.Images(HEATMAP_TAG)
    assert [im.step for im in images] == [0, 10, 20]
    assert images[0].encoded_image_string.startswith(PNG_MAGIC)
    assert images[0].width > 100 and images[0].height > 50

    assert load_records(tmp_path) == records


def test_writer_without_summary_writer_appends_jsonl(tmp_path):
    path = tmp_path / "diagnostics.jsonl"
    path.write_text(json.dumps(hand_record(0, {"a__b": 0.5}, {})) + "\n")
    with DiagnosticsWriter(None, path) as writer:
        writer.write(hand_record(5, {"a__b": -0.5}, {}))
    assert [r["step"] for r in load_records(tmp_path)] == [0, 5]


def write_jsonl(run_dir, records) -> None:
    (run_dir / "diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summarize_run_numbers(tmp_path):
    write_jsonl(
        tmp_path,
        [
            hand_record(0, {"a__b": 0.5, "a__c": -0.2}, {"a__b": {"emb": 0.1, "l0": -0.4, "l1": 0.2}}),
            hand_record(10, {"a__b": -0.1, "a__c": -0.4}, {"a__b": {"emb": 0.3, "l0": -0.2, "l1": -0.4}}),
            hand_record(20, {"a__b": 0.2, "a__c": 0.3}, {"a__b": {"emb": 0.5, "l0": -0.6, "l1": 0.5}}),
        ],
    )
    summary = summarize_run(tmp_path)
    assert summary["records"] == 3 and summary["steps"] == [0, 20]
    assert summary["tasks"] == ["a", "b", "c"] and summary["groups"] == ["emb", "l0", "l1"]
    ab = summary["pairs"]["a__b"]
    assert ab["cos_mean"] == pytest.approx(0.2)
    assert ab["cos_std"] == pytest.approx((((0.3**2) + (0.3**2) + 0.0) / 3) ** 0.5)
    assert ab["conflict_share"] == pytest.approx(1 / 3)
    assert ab["layer_cos_mean"] == pytest.approx({"emb": 0.3, "l0": -0.4, "l1": 0.1})
    assert ab["most_negative_layers"] == ["l0"]
    ac = summary["pairs"]["a__c"]
    assert ac["conflict_share"] == pytest.approx(2 / 3)
    assert ac["layer_cos_mean"] == {} and ac["most_negative_layers"] == []

    table = format_table(summary)
    assert "3 records, steps 0..20" in table
    row = next(line for line in table.splitlines() if line.startswith("a__b"))
    assert "+0.200" in row and "33.3%" in row and "l0 (-0.400)" in row


def test_plot_run_writes_png(tmp_path):
    write_jsonl(tmp_path, [hand_record(s, {"a__b": c}, {}) for s, c in ((0, 0.3), (5, -0.2), (10, 0.1))])
    out = tmp_path / "cos.png"
    plot_run(tmp_path, out)
    assert out.read_bytes().startswith(PNG_MAGIC)


def test_report_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="diagnostics.jsonl"):
        summarize_run(tmp_path)
    (tmp_path / "diagnostics.jsonl").write_text(json.dumps(hand_record(0, {"a__b": 0.1}, {})) + "\n\n{oops\n")
    with pytest.raises(ValueError, match=r"diagnostics\.jsonl:3: malformed JSON"):
        summarize_run(tmp_path)
    (tmp_path / "diagnostics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match=r"diagnostics\.jsonl:1: not a diagnostics record"):
        summarize_run(tmp_path)


def test_summarize_run_task_and_pcgrad_means(tmp_path):
    records = make_records()
    write_jsonl(tmp_path, records)
    summary = summarize_run(tmp_path)
    for task in ("sst", "qqp", "sts"):
        t = summary["tasks_summary"][task]
        assert t["norm_mean"] == pytest.approx(sum(r["norm"][task] for r in records) / 3)
        assert t["pcgrad_removed_mean"] == pytest.approx(sum(r["pcgrad_removed"][task] for r in records) / 3)
    assert summary["conflict_rate_mean"] == pytest.approx(sum(r["conflict_rate"] for r in records) / 3)
    assert summary["pcgrad_cos_sum_mean"] == pytest.approx(sum(r["pcgrad_cos_sum"] for r in records) / 3)
    table = format_table(summary)
    assert "PCGrad would remove" in table
    assert f"{summary['pcgrad_cos_sum_mean']:.4f}" in table


# ------------------------------------------------------------------ the figures as a person sees them

PAIRS = ["sst__quora", "sst__sts", "quora__sts"]
GROUPS = ["embeddings"] + [f"layer.{i}" for i in range(9)]  # 10 columns: the readability target
NEG, POS, SMALL = (0, 2), (2, 7), (1, 4)  # cells holding -0.083, +0.083 and -0.031


def small_layer_cos() -> dict[str, dict[str, float]]:
    """Cosines the size of the main job's (|cos| < 0.1), the extremes at NEG and POS."""
    values = [[round(0.07 * math.sin(1.3 * i + 0.7 * j), 4) for j in range(len(GROUPS))] for i in range(3)]
    values[NEG[0]][NEG[1]], values[POS[0]][POS[1]], values[SMALL[0]][SMALL[1]] = -0.083, 0.083, -0.031
    return {pair: dict(zip(GROUPS, row)) for pair, row in zip(PAIRS, values)}


def rgb(figure) -> np.ndarray:
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)


def cell_pixel(figure, pixels: np.ndarray, row: int, col: int) -> np.ndarray:
    # Off the cell's centre, where its value is printed, but well inside the cell.
    x, y = figure.axes[0].transData.transform((col - 0.35, row - 0.35))
    return pixels[int(round(pixels.shape[0] - y)), int(round(x))]


def colour(cmap, x: float) -> np.ndarray:
    return np.round(np.array(cmap(x)[:3]) * 255).astype(int)


def texts_by_cell(ax) -> dict[tuple[int, int], matplotlib.text.Text]:
    return {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}


def test_layer_heatmap_scales_to_largest_abs_cos_and_prints_every_value():
    layer_cos = small_layer_cos()
    before = copy.deepcopy(layer_cos)
    figure = layer_heatmap(layer_cos, GROUPS, 1750)
    assert layer_cos == before
    ax, cbar_ax = figure.axes
    image = ax.images[0]
    assert image.get_clim() == pytest.approx((-0.083, 0.083))
    assert (image.norm.vmin, image.norm.vmax) == pytest.approx((-0.083, 0.083))
    cmap = image.cmap
    assert cmap.name.startswith("RdBu")
    low, high = colour(cmap, 0.0), colour(cmap, 1.0)
    assert low[0] > low[2] and high[2] > high[0]  # the negative end (conflict) red, the positive blue
    assert "±0.083" in cbar_ax.get_ylabel() and "largest |cos|" in cbar_ax.get_ylabel()

    texts = texts_by_cell(ax)
    assert len(ax.texts) == len(texts) == len(PAIRS) * len(GROUPS)
    for i, pair in enumerate(PAIRS):
        for j, group in enumerate(GROUPS):
            text = texts[i, j].get_text()
            assert text == format_cos(layer_cos[pair][group], 0.083)
            assert float(text) == pytest.approx(layer_cos[pair][group], abs=5e-4 + 1e-12)
    assert texts[SMALL].get_text() == "-0.031"
    assert texts[NEG].get_text() == "-0.083" and texts[POS].get_text() == "0.083"

    pixels = rgb(figure)
    for i, pair in enumerate(PAIRS):
        for j, group in enumerate(GROUPS):
            expected = colour(cmap, image.norm(layer_cos[pair][group]))
            assert np.abs(cell_pixel(figure, pixels, i, j) - expected).max() <= 2, (pair, group)
    # The extremes are the colour map's saturated ends: far apart and far from white.
    neg, pos = cell_pixel(figure, pixels, *NEG), cell_pixel(figure, pixels, *POS)
    assert np.abs(neg - low).max() <= 2 and np.abs(pos - high).max() <= 2
    assert np.abs(neg - pos).sum() > 200 and min(np.abs(neg - 255).sum(), np.abs(pos - 255).sum()) > 300
    # Printed values stay legible: light text on the dark ends, dark text on the near-white middle.
    assert texts[NEG].get_color() == texts[POS].get_color() == "white"
    near_zero = min(texts, key=lambda c: abs(layer_cos[PAIRS[c[0]]][GROUPS[c[1]]]))
    assert texts[near_zero].get_color() == "black"


def test_layer_heatmap_is_a_function_of_its_inputs():
    first = rgb(layer_heatmap(small_layer_cos(), GROUPS, 5))
    with matplotlib.rc_context({"figure.dpi": 200, "figure.figsize": (3, 2)}):
        second = rgb(layer_heatmap(small_layer_cos(), GROUPS, 5))
    assert np.array_equal(first, second)
    width, height = first.shape[1], first.shape[0]
    assert 600 <= width <= 1200 and 250 <= height <= 500  # 10 groups × 3 pairs: readable, not a poster


def test_layer_heatmap_nan_none_and_missing_cells_are_grey_na():
    groups = ["g0", "g1", "g2"]
    layer_cos = {"a__b": {"g0": 0.02, "g1": math.nan, "g2": None}, "a__c": {"g0": -0.05}}
    figure = layer_heatmap(layer_cos, groups, 0)
    ax = figure.axes[0]
    assert ax.images[0].get_clim() == pytest.approx((-0.05, 0.05))
    texts = {cell: t.get_text() for cell, t in texts_by_cell(ax).items()}
    assert texts == {(0, 0): "0.020", (0, 1): "n/a", (0, 2): "n/a", (1, 0): "-0.050", (1, 1): "n/a", (1, 2): "n/a"}
    pixels = rgb(figure)
    grey = colour(ax.images[0].cmap, math.nan)
    assert grey[0] == grey[1] == grey[2] and 150 < grey[0] < 230
    for cell in [(0, 1), (0, 2), (1, 1), (1, 2)]:
        assert np.abs(cell_pixel(figure, pixels, *cell) - grey).max() <= 2
    assert np.abs(cell_pixel(figure, pixels, 1, 0) - colour(ax.images[0].cmap, 0.0)).max() <= 2


@pytest.mark.parametrize("value, label", [(math.nan, "no values"), (0.0, "no nonzero value")])
def test_layer_heatmap_without_a_scale_falls_back_to_unit_range(value, label):
    figure = layer_heatmap({"a__b": {"g0": value, "g1": value}}, ["g0", "g1"], 0)
    ax, cbar_ax = figure.axes
    assert ax.images[0].get_clim() == (-1.0, 1.0)
    assert label in cbar_ax.get_ylabel()
    if value == 0.0:  # zero stays white rather than the end a degenerate ±0 scale would pick
        pixel = cell_pixel(figure, rgb(figure), 0, 0)
        assert np.abs(pixel - colour(ax.images[0].cmap, 0.5)).max() <= 2


def test_format_cos_keeps_small_values_distinct():
    assert [format_cos(v, 0.083) for v in (-0.031, 0.004, 0.0833)] == ["-0.031", "0.004", "0.083"]
    assert format_cos(0.5, 0.5) == "0.500"
    assert [format_cos(v, 0.006) for v in (0.006, -0.0012)] == ["0.0060", "-0.0012"]
    assert format_cos(3e-6, 5e-6) == "3.0e-06"
    assert format_cos(None, 0.1) == format_cos(math.nan, 0.1) == "n/a"


def cos_records() -> list[dict]:
    cos = [(0, {"a__b": 0.03, "a__c": 0.05}), (5, {"a__b": -0.083, "a__c": 0.02}),
           (10, {"a__b": 0.01, "a__c": math.nan})]
    return [hand_record(step, c, {}) for step, c in cos]


def test_diagnose_png_y_range_fits_small_cosines(tmp_path):
    records = cos_records()
    figure = cos_figure(records)
    ax = figure.axes[0]
    assert ax.get_ylim() == pytest.approx((-1.15 * 0.083, 1.15 * 0.083))
    assert any(list(line.get_ydata()) == [0.0, 0.0] for line in ax.lines)  # the zero line

    write_jsonl(tmp_path, records)
    out = tmp_path / "cos.png"
    plot_run(tmp_path, out)
    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert (png.shape[1], png.shape[0]) == figure.canvas.get_width_height()
    # The most negative point is drawn (in its pair's colour) near the bottom of the axes, far from
    # the zero line, not squashed onto it as on a ±1 axis.
    x, y = ax.transData.transform((5, -0.083))
    _, y0 = ax.transData.transform((5, 0.0))
    _, y_bottom = ax.transData.transform((5, ax.get_ylim()[0]))
    assert (y0 - y) > 0.8 * (y0 - y_bottom)
    line_colour = np.round(np.array(matplotlib.colors.to_rgb(ax.lines[1].get_color())) * 255)
    assert np.abs(png[int(round(png.shape[0] - y)), int(round(x))] - line_colour).max() <= 12


def test_diagnose_png_without_nonzero_cosines_keeps_unit_range():
    assert cos_figure([hand_record(0, {"a__b": 0.0}, {})]).axes[0].get_ylim() == (-1.0, 1.0)
    big = cos_figure([hand_record(0, {"a__b": -1.0}, {})]).axes[0].get_ylim()
    assert big == pytest.approx((-1.05, 1.05))


def test_diagnose_heatmap_is_the_last_layer_record_as_tensorboard_draws_it(tmp_path):
    late = {"a__b": {"emb": -0.02, "l0": 0.05}, "a__c": {"emb": 0.01, "l1": -0.04}}
    records = [hand_record(10, {"a__b": 0.1}, {"a__b": {"emb": 0.9}}), hand_record(20, {"a__b": 0.0}, late),
               hand_record(30, {"a__b": 0.2}, {})]  # the last record has no per-layer cosines
    write_jsonl(tmp_path, records)
    assert plot_layers(tmp_path, tmp_path / "layers.png") == 20
    expected = layer_heatmap(late, ["emb", "l0", "l1"], 20)
    expected.savefig(tmp_path / "expected.png", format="png", dpi=expected.dpi)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "layers.png")),
                          np.asarray(Image.open(tmp_path / "expected.png")))
    write_jsonl(tmp_path, [hand_record(0, {"a__b": 0.1}, {})])
    assert plot_layers(tmp_path, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


# ------------------------------------------------------------------ as TensorBoard serves it

SERVER_TIMEOUT_S = 120  # a loaded two-core machine takes seconds to start TensorBoard; bound it anyway


def fetch(opener, url: str) -> bytes:
    with opener.open(url, timeout=20) as response:
        return response.read()


def wait_for(what: str, probe, proc, log_path, deadline: float):
    """``probe()``'s first truthy result, polling until ``deadline``; fails if the server dies."""
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        if proc.poll() is not None:
            pytest.fail(f"tensorboard exited ({proc.returncode}) before {what}:\n{log_path.read_text()}")
        time.sleep(0.2)
    pytest.fail(f"no {what} within {SERVER_TIMEOUT_S} s:\n{log_path.read_text()}")


@pytest.mark.slow
def test_tensorboard_server_serves_the_readable_heatmap(tmp_path):
    record = {**make_records()[0], "step": 1750, "layer_cos": small_layer_cos(), "groups": GROUPS}
    summary_writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    with DiagnosticsWriter(summary_writer, tmp_path / "diagnostics.jsonl") as writer:
        writer.write(record)
    summary_writer.close()
    # The same inputs give the same figure: its geometry says where each cell lands in the served PNG.
    figure = layer_heatmap(record["layer_cos"], GROUPS, 1750)
    local = rgb(figure)
    cmap = figure.axes[0].images[0].cmap

    # Localhost only, whatever proxy the environment names.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    log_path = tmp_path / "tensorboard.log"
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    with log_path.open("wb") as log:
        # Port 0: the OS picks a free port and TensorBoard prints it, so no race with other processes.
        proc = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "tb"), "--host", "127.0.0.1",
             "--port", "0", "--load_fast=false", "--reload_interval", "1"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        try:
            port = wait_for("its address", lambda: re.search(r"http://127\.0\.0\.1:(\d+)/", log_path.read_text()),
                            proc, log_path, deadline).group(1)
            base = f"http://127.0.0.1:{port}/data/plugin/images"

            def heatmap_run():
                try:
                    tags = json.loads(fetch(opener, f"{base}/tags"))
                except OSError:  # listening but not yet answering: poll again
                    return None
                return next((run for run, run_tags in tags.items() if HEATMAP_TAG in run_tags), None)

            run = wait_for("the heatmap tag", heatmap_run, proc, log_path, deadline)
            query = urllib.parse.urlencode({"run": run, "tag": HEATMAP_TAG})
            entries = json.loads(fetch(opener, f"{base}/images?{query}"))
            assert [e["step"] for e in entries] == [1750]
            png = fetch(opener, f"{base}/individualImage?{entries[0]['query']}")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)

    assert png.startswith(PNG_MAGIC)
    served = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert served.shape == local.shape
    assert (np.abs(served - local).max(axis=2) > 2).mean() < 0.001  # the heatmap, as drawn here
    # The extreme cells arrive as the colour map's saturated ends, not the pale middle.
    assert np.abs(cell_pixel(figure, served, *NEG) - colour(cmap, 0.0)).max() <= 2
    assert np.abs(cell_pixel(figure, served, *POS) - colour(cmap, 1.0)).max() <= 2
    pale = colour(cmap, 0.5)
    assert min(np.abs(cell_pixel(figure, served, *c) - pale).sum() for c in (NEG, POS)) > 300
    Image.open(io.BytesIO(png)).save(tmp_path / "served_heatmap.png")  # kept for a person to look at
