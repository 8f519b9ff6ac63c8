"""DiagnosticsWriter output read back from TensorBoard event files and JSONL; run reports."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from diagnostics.gram import group_grams
from diagnostics.report import format_table, load_records, plot_run, summarize_run
from diagnostics.stats import summarize
from diagnostics.writer import HEATMAP_TAG, DiagnosticsWriter

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
