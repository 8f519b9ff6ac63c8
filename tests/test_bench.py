"""Smoke runs of the benchmarks on the tiny config and toy data: the CPU fallback of bench/gpu.sh (train
step MFU and the loop-overhead comparison) and bench/padding.py. Each output is checked against an
independent count: FLOPs from the model's own parameters, samples and pad tokens from the run's trace
replayed through `batch_for`. No timing is asserted, only that rates are positive and consistent."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
from transformers import AutoModel

from conftest import REPO
from mtkit import config as config_mod
from mtkit.config import BUNDLED_MODEL
from mtkit.data.dataset import batch_for
from mtkit.distributed import Dist
from mtkit.model.encoder import resolve_model_path
from mtkit.run import build


def toy_sets(root, cache) -> list[str]:
    return ["--set", f"data.root={root}", f"data.cache_dir={cache}", "train.num_threads=1"]


def trace(folder):
    return [json.loads(line) for line in (folder / "trace" / "rank0.jsonl").read_text().splitlines()]


def test_gpu_script_cpu_fallback(toy_root, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "MTKIT_BENCH_CPU": "1", "PYTHON": sys.executable, "MTKIT_QUIET": "1"}
    proc = subprocess.run(["bash", "bench/gpu.sh", str(out), *toy_sets(toy_root, tmp_path / "cache"),
                           "--workdir", str(work)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "CPU fallback" in proc.stderr

    mfu = json.loads((out / "mfu.json").read_text())
    assert mfu["device"] == "cpu" and mfu["peak_bf16_flops"] is None and (mfu["batch"], mfu["length"]) == (4, 32)
    assert [r["attention"] for r in mfu["runs"]] == ["sdpa", "eager"]
    assert mfu["best"] == max(mfu["runs"], key=lambda r: r["samples_per_s"])
    bert = AutoModel.from_pretrained(resolve_model_path(BUNDLED_MODEL), add_pooling_layer=False)
    dense = sum(p.numel() for n, p in bert.named_parameters() if not n.startswith("embeddings.")) + 384 * 5 + 5
    for r in mfu["runs"]:
        assert r["params_non_embedding"] == dense
        assert r["flops_per_token"] == 6 * dense + 12 * 6 * 384 * 32  # 6 layers, hidden 384, 32 tokens
        assert r["samples_per_s"] == pytest.approx(4 / r["step_s"]) and r["mfu"] is None

    loop = json.loads((out / "loop_overhead.json").read_text())
    steps = trace(work / "mtkit-0")
    assert [s["step"] for s in steps] == [0, 1, 2] and loop["steps"] == 3
    samples = sum(len(s["indices"]) for s in steps)
    assert loop["samples"] == {"mtkit": [samples], "hand": [samples], "hand_checks": [samples]}
    speeds = {k: v["median"] for k, v in loop["samples_per_s"].items()}
    assert all(v > 0 for v in speeds.values())
    assert loop["ratio_mtkit_vs_hand"] == pytest.approx(speeds["mtkit"] / speeds["hand"])
    assert loop["machine"]["cores"] == os.cpu_count() and loop["date"]


def test_padding_benchmark_counts_pad_tokens_like_the_batches(toy_root, tmp_path):
    from bench import padding
    work = tmp_path / "work"
    report = padding.main(["--config", str(REPO / "configs" / "debug_tiny.yaml"), "--steps", "3",
                           "--repeats", "1", "--dev-rows", "8", *toy_sets(toy_root, tmp_path / "cache"),
                           "--workdir", str(work), "--out", str(tmp_path / "padding.json")])
    assert json.loads((tmp_path / "padding.json").read_text()) == json.loads(json.dumps(report))
    cfg = config_mod.load(REPO / "configs" / "debug_tiny.yaml",
                          {"data.root": str(toy_root), "data.cache_dir": str(tmp_path / "cache")})
    _, tasks, model = build(cfg, Dist())
    width = cfg.model.max_length
    assert report["max_length"] == width
    for variant in ("bucketed", "pad_to_max"):
        mask = [batch_for(tasks[s["task"]], "train", s["indices"], model.pad_id)["attention_mask"]
                for s in trace(work / f"{variant}-0")]
        real = sum(int(m.sum()) for m in mask)
        padded = sum(m.numel() if variant == "bucketed" else m.shape[0] * width for m in mask)
        assert report["pad_share_trained"][variant] == pytest.approx(1 - real / padded)
        assert set(report["dev"][variant]) == {"sst", "quora", "sts", "overall"}
    per_epoch = report["pad_share_per_epoch"]
    assert set(per_epoch) == {"bucketed", "random_dynamic", "pad_to_max"}
    for shares in per_epoch.values():
        assert set(shares) == {"sst", "quora", "sts", "all"} and all(0 <= v < 1 for v in shares.values())
    assert per_epoch["bucketed"]["all"] <= per_epoch["random_dynamic"]["all"] < per_epoch["pad_to_max"]["all"]
    speeds = {v: statistics.median(s["all"]) for v, s in report["samples_per_s"].items()}
    assert report["speedup_bucketed_vs_pad_to_max"] == pytest.approx(speeds["bucketed"] / speeds["pad_to_max"])
    assert all(t["real_per_s"]["median"] <= t["padded_per_s"]["median"] for t in report["tokens_per_s"].values())


def test_step_cost_counts_passes_and_tokens(toy_root, tmp_path):
    """Joint steps forward every batch once (sum) or twice (Gram strategies: side pass + engine pass); the
    pair head's token counts follow from the tokenizer alone: a cross-encoder adds the pair as one sequence
    ([CLS] a [SEP] b [SEP], len(a) + len(b) - 1 tokens) and pads all three rows to the longest pair."""
    import torch

    from bench import step_cost
    config, cache = REPO / "configs" / "debug_tiny.yaml", tmp_path / "cache"
    report = step_cost.main(["--config", str(config), "--steps", "1", "--repeats", "1",
                             *toy_sets(toy_root, cache), "--out", str(tmp_path / "step_cost.json")])
    assert json.loads((tmp_path / "step_cost.json").read_text()) == json.loads(json.dumps(report))
    names, size = ["sst", "quora", "sts"], 16   # debug_tiny's tasks and train.batch_size
    T = len(names)
    assert report["tasks"] == names and report["batch_sizes"] == dict.fromkeys(names, size)
    assert report["forward_passes_per_step"] == {
        "ordinary": T, "joint_sum": T, "joint_pcgrad": 2 * T, "joint_gradvac": 2 * T, "joint_cagrad": 2 * T,
        "quora_cosine": 1, "quora_cross_cosine": 1}
    steps = report["seconds_per_step"]
    assert all(len(s["all"]) == 1 and s["min"] > 0 for s in steps.values())
    for name, ratio in report["ratio_vs_ordinary"].items():
        assert ratio == pytest.approx(steps[name]["median"] / steps["ordinary"]["median"])
    pair = report["pair_head"]
    per_example = {d: s["median"] for d, s in pair["seconds_per_example"].items()}
    for d in ("cosine", "cross_cosine"):
        assert per_example[d] == pytest.approx(steps[f"quora_{d}"]["median"] / size)
    assert pair["ratio_cross_cosine_vs_cosine"] == pytest.approx(per_example["cross_cosine"] / per_example["cosine"])

    base = {"data.root": str(toy_root), "data.cache_dir": str(cache)}
    tokenizer, tasks, model = build(config_mod.load(config, base), Dist())
    for name in names:
        split = tasks[name].splits["train"]
        indices = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:size].tolist()
        assert report["batches"][name]["indices"] == indices
        mask = batch_for(tasks[name], "train", indices, model.pad_id)["attention_mask"]
        assert report["batches"][name]["real_tokens"] == int(mask.sum())
        assert report["batches"][name]["padded_tokens"] == mask.numel()
    examples = [tasks["quora"].splits["train"].examples[i] for i in report["batches"]["quora"]["indices"]]
    lengths = [[len(tokenizer(text)["input_ids"]) for text in e.texts] for e in examples]   # [B, 2]
    tokens = pair["tokens"]
    assert tokens["cosine"]["texts"] == 2 and tokens["cross_cosine"]["texts"] == 3
    assert tokens["cosine"]["real_per_example"] == pytest.approx(sum(a + b for a, b in lengths) / size)
    assert tokens["cross_cosine"]["real_per_example"] == pytest.approx(
        sum(2 * (a + b) - 1 for a, b in lengths) / size)
    assert tokens["cosine"]["padded_per_example"] == 2 * max(max(pair_) for pair_ in lengths)
    assert tokens["cross_cosine"]["padded_per_example"] == 3 * max(a + b - 1 for a, b in lengths)


def test_diagnostics_overhead_benchmark_runs_every_mode_at_its_defaults(toy_root, tmp_path):
    from bench import diagnostics_overhead
    out = tmp_path / "diagnostics_overhead.json"
    report = diagnostics_overhead.main(["--config", str(REPO / "configs" / "debug_tiny.yaml"), "--steps", "4",
                                        "--repeats", "2", "--warmup-steps", "2",
                                        *toy_sets(toy_root, tmp_path / "cache"), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    defaults = config_mod.DiagnosticsConfig()
    # The config file's own diagnostics settings (debug_tiny: probe every 4, batch 16) must not leak in.
    assert report["settings"]["probe"]["diagnostics.every"] == defaults.every != 4
    assert report["settings"]["probe"]["diagnostics.probe_batch_size"] == defaults.probe_batch_size != 16
    speeds = {m: s["all"] for m, s in report["samples_per_s"].items()}
    assert set(speeds) == {"off", "stream", "probe"} and all(len(v) == 2 and min(v) > 0 for v in speeds.values())
    off = statistics.median(speeds["off"])
    for mode, values in speeds.items():
        assert report["overhead_pct"][mode] == pytest.approx(100 * (off / statistics.median(values) - 1))
        assert report["ratio_per_repeat"][mode] == pytest.approx([v / o for v, o in zip(values, speeds["off"])])
