"""Every setting is validated before anything is built: each bad value stops `config.load` with the key,
where the value came from (file:line, or the override) and what a valid value is."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from mtkit import config as config_mod
from mtkit.config import ConfigError

from conftest import CONFIGS, REPO

TINY = (CONFIGS / "debug_tiny.yaml").read_text()


def tiny_yaml(tmp_path, old: str, new: str) -> tuple[str, int]:
    """debug_tiny.yaml with `old` replaced by `new`; (path, line of the last line of `new`)."""
    assert TINY.count(old) == 1, old
    text = TINY.replace(old, new)
    path = tmp_path / "x.yaml"
    path.write_text(text)
    return str(path), text[:text.index(new) + len(new)].count("\n") + 1


def load_error(path=CONFIGS / "debug_tiny.yaml", **overrides) -> str:
    with pytest.raises(ConfigError) as e:
        config_mod.load(path, {k.replace("__", "."): v for k, v in overrides.items()})
    return str(e.value)


# (old text of debug_tiny.yaml, new text, message parts after "file:line: ")
IN_FILE = {
    "epochs_zero": ("  epochs: 2", "  epochs: 0", "train.epochs = 0.0; use a finite number > 0"),
    "encoder_lr_negative": ("  encoder_lr: 1.0e-3", "  encoder_lr: -1.0e-3",
                            "optim.encoder_lr = -0.001; use a finite number >= 0"),
    "head_lr_negative": ("    num_labels: 5", "    num_labels: 5\n    lr: -0.01",
                         "tasks.sst.lr = -0.01; use a finite number >= 0"),
    "grad_accum_zero": ("  batch_size: 16", "  batch_size: 16\n  grad_accum: 0",
                        "train.grad_accum = 0; use an integer >= 1"),
    "batch_size_zero": ("  batch_size: 16", "  batch_size: 0", "train.batch_size = 0; use an integer >= 1"),
    "log_every_zero": ("  log_every: 4", "  log_every: 0", "train.log_every = 0; use an integer >= 1"),
    "eval_every_zero": ("  eval_every: 24", "  eval_every: 0", "train.eval_every = 0; use an integer >= 1"),
    "eval_batch_size_zero": ("  log_every: 4", "  log_every: 4\n  eval_batch_size: 0",
                             "train.eval_batch_size = 0; use an integer >= 1"),
    "diagnostics_every_zero": ("  every: 4", "  every: 0", "diagnostics.every = 0; use an integer >= 1"),
    "probe_batch_size_zero": ("  probe_batch_size: 16", "  probe_batch_size: 0",
                              "diagnostics.probe_batch_size = 0; use an integer >= 1"),
    "select_metric_misspelt": ("  seed: 0", "  seed: 0\n  select_metric: sst.accuracy",
                               "train.select_metric = 'sst.accuracy'; choose one of ['overall', 'sst.acc', "
                               "'quora.acc', 'quora.f1', 'sts.pearson', 'sts.spearman', 'sts.cosine_pearson', "
                               "'sts.cosine_spearman'] (a task's metrics exist only when it has a dev split)"),
    "max_length_beyond_positions": ("  max_length: 64", "  max_length: 1024",
                                    "model.max_length = 1024; the encoder has 512 positions "
                                    "(max_position_embeddings of bundled:all-MiniLM-L6-v2)"),
    "head_dropout_one": ("    decoder: cosine", "    decoder: cosine\n    dropout: 1.0",
                         "tasks.sts.dropout = 1.0; use a number in [0, 1)"),
    "warmup_ratio_one": ("  encoder_lr: 1.0e-3", "  encoder_lr: 1.0e-3\n  warmup_ratio: 1",
                         "optim.warmup_ratio = 1.0; use a number in [0, 1)"),
    "lr_nan": ("  encoder_lr: 1.0e-3", "  encoder_lr: .nan", "optim.encoder_lr = nan; use a finite number >= 0"),
    "betas_one_value": ("  encoder_lr: 1.0e-3", "  encoder_lr: 1.0e-3\n  betas: [0.9]",
                        "optim.betas = [0.9]; use two numbers in [0, 1), e.g. [0.9, 0.999]"),
    "seed_negative": ("  seed: 0", "  seed: -1", "train.seed = -1; use an integer in [0, 2**32 - 1024) "
                      "(numpy seeds, plus the rank)"),
    "num_labels_one": ("    num_labels: 5", "    num_labels: 1", "tasks.sst.num_labels = 1; use an integer >= 2"),
    "label_range_reversed": ("    label_range: [0, 5]", "    label_range: [5, 0]",
                             "tasks.sts.label_range = [5.0, 0.0]; use [low, high] with low < high"),
    "unknown_format": ("    num_labels: 5", "    num_labels: 5\n    format: xls",
                       "tasks.sst.format = 'xls'; choose one of ['auto', 'cs224n', 'csv', 'hf', 'jsonl', 'lines', "
                       "'mrpc', 'semeval_sts', 'sick', 'tsv']"),
    "unknown_column_role": ("    num_labels: 5", "    num_labels: 5\n    columns: {txt: sentence}",
                            "tasks.sst.columns = {'txt': 'sentence'}; unknown role(s) ['txt'] for a classification "
                            "task; roles: ['id', 'label', 'text']"),
    "calibrate_five_classes": ("    num_labels: 5", "    num_labels: 5\n    calibrate: 0.1",
                               "tasks.sst.calibrate = 0.1; calibrate sets a binary decision threshold; a "
                               "classification task with 5 labels has none"),
    "arch_unknown_field": ("intermediate_size: 64}", "intermediate_size: 64, hiddn_size: 8}",
                           "model.arch.hiddn_size = 8; BertConfig has no such field"),
    "predict_unknown_split": ("  seed: 0", "  seed: 0\n  predict: [dev, tst]",
                              "train.predict = 'tst'; choose one of ['dev', 'test']"),
    "temperature_zero": ("  schedule: round_robin", "  schedule: temperature\n  temperature: 0",
                         "data.temperature = 0.0; use a finite number > 0"),
}


@pytest.mark.parametrize("name", list(IN_FILE))
def test_bad_value_in_file_names_file_line_and_key(name, tmp_path):
    old, new, message = IN_FILE[name]
    path, line = tiny_yaml(tmp_path, old, new)
    assert load_error(path) == f"{path}:{line}: {message}"


def test_relation_errors_name_each_side(tmp_path):
    # max_length is within the bundled model's 512 positions, but the tiny arch has 32.
    path, _ = tiny_yaml(tmp_path, "intermediate_size: 64}", "intermediate_size: 64, max_position_embeddings: 32}")
    assert load_error(path) == (f"{path}:9: model.max_length = 64; the encoder has 32 positions "
                                f"(model.arch.max_position_embeddings, {path}:7)")
    assert load_error(train__mode="lp_ft", train__lp_steps=8, train__max_steps=8) == (
        "override --train.lp_steps: train.lp_steps = 8; lp_ft fine-tunes after lp_steps, but "
        "train.max_steps = 8 ends training first")
    assert load_error(train__strategy="pcgrad", diagnostics__mode="probe", data__steps_per_epoch=2) == (
        "override --data.steps_per_epoch: data.steps_per_epoch = 2; a joint step takes one batch of each of "
        "the 3 tasks; use at least 3")
    assert "tasks.sst.num_labels = 3; but 2 label_names are given" in load_error(
        tasks__sst__num_labels=3, tasks__sst__label_names="neg,pos")


def test_select_metric_needs_a_dev_split_and_the_metric_of_the_head():
    assert "choose one of ['overall', 'quora.acc'" in load_error(tasks__sst__dev=None,
                                                                train__select_metric="sst.acc")
    # A cross-encoder reads the pair jointly: no sentence embeddings, so no cosine metrics.
    msg = load_error(tasks__sts__decoder="cross", train__select_metric="sts.cosine_spearman")
    assert "'sts.pearson', 'sts.spearman']" in msg
    assert config_mod.load(CONFIGS / "debug_tiny.yaml", {"train.select_metric": "sts.cosine_spearman"})


def test_every_task_needs_a_train_split(tmp_path):
    path, line = tiny_yaml(tmp_path, "    train: quora/quora-train-partial.csv", "    train: null")
    assert load_error(path) == (f"{path}:{line}: tasks.quora.train = None; every task needs a train split "
                                "(a file or hf:NAME@SPLIT)")


def test_overrides_are_named_as_overrides():
    assert load_error(train__epochs="0") == "override --train.epochs: train.epochs = 0.0; use a finite number > 0"
    assert load_error(tasks__sst__lr="-1") == "override --tasks.sst.lr: tasks.sst.lr = -1.0; use a finite number >= 0"
    # A whole section given as one override (as `mtkit eval` does with a run's config.json).
    cfg = config_mod.to_dict(config_mod.load(CONFIGS / "debug_tiny.yaml"))
    cfg["train"]["batch_size"] = 0
    with pytest.raises(ConfigError, match=r"^override --train: train.batch_size = 0; use an integer >= 1$"):
        config_mod.load(None, cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda():
    assert load_error(train__device="cuda") == ("override --train.device: train.device = 'cuda'; CUDA is not "
                                                "available on this machine; use auto or cpu")


def test_deepspeed_json_errors_name_the_json_file_and_line(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    assert load_error(deepspeed__config=str(bad)) == (
        f"override --deepspeed.config: deepspeed.config = '{bad}'; {bad}:2: invalid JSON: Expecting property "
        "name enclosed in double quotes (column 36)")
    bad.write_text('[{"zero_optimization": {}}]')
    assert f"{bad}: a DeepSpeed config is a JSON object, got list" in load_error(deepspeed__config=str(bad))
    bad.write_text('{"zero_optimization": {"stage": "two"}}')
    assert f"{bad}: zero_optimization.stage = 'two'; use 0, 1 or 2" in load_error(deepspeed__config=str(bad))
    bad.write_bytes(b'{"x": "\xff"}')
    assert f"{bad}: not UTF-8 text" in load_error(deepspeed__config=str(bad))
    assert f"{tmp_path / 'absent.json'}: cannot read DeepSpeed config: No such file or directory" in load_error(
        deepspeed__config=str(tmp_path / "absent.json"))


def test_zero3_is_refused_at_validation(tmp_path):
    z3 = tmp_path / "z3.json"
    z3.write_text('{"zero_optimization": {"stage": 3}}')
    path, line = tiny_yaml(tmp_path, "  num_threads: 1", f"  num_threads: 1\ndeepspeed:\n  config: {z3}")
    assert load_error(path) == (
        f"{path}:{line}: deepspeed.config = '{z3}'; {z3} asks for ZeRO stage 3, which is not supported: "
        "diagnostics and per-head isolation need whole parameters on every rank (use 0, 1 or 2, or set "
        "deepspeed.zero_stage)")
    assert load_error(deepspeed__zero_stage=3).startswith(
        "override --deepspeed.zero_stage: deepspeed.zero_stage = 3; use 0, 1 or 2 (ZeRO stage 3 is not supported")
    # The stage override wins over the JSON's.
    cfg = config_mod.load(path, {"deepspeed.zero_stage": 2})
    from mtkit.engine.deepspeed_engine import deepspeed_config
    assert deepspeed_config(cfg, 1)["zero_optimization"]["stage"] == 2


def test_yaml_file_problems_name_file_and_line(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_bytes(TINY.replace("name: debug_tiny", "name: debug_tiny \xe9").encode("latin-1"))
    line = TINY[:TINY.index("name: debug_tiny")].count("\n") + 1
    assert load_error(p) == f"{p}:{line}: not UTF-8 text (invalid continuation byte, byte 0xe9); save the file as UTF-8"
    p.write_text("train:\n  seed: 1\n   epochs: 2\n")
    assert load_error(p).startswith(f"{p}:3: invalid YAML: mapping values are not allowed here")
    p.write_text("train:\n  seed: \x07\n")
    assert load_error(p).startswith(f"{p}:2: invalid YAML: unacceptable character #x0007")
    p.write_text("- a\n- b\n")
    assert load_error(p) == f"{p}: top level must be a mapping of sections, got list"
    p.write_text(TINY.replace("train:\n", "train: 5\nx:\n"))
    assert load_error(p, train__seed=1).startswith(f"override --train.seed: train is 5 in {p}, not a mapping")


def test_dev_metric_choices_are_the_metrics_evaluate_reports(tiny_cfg):
    # The validator's list of metrics per task and head, against what mtkit.evaluate really reports.
    from mtkit.distributed import Dist
    from mtkit.evaluate import evaluate
    from mtkit.run import build
    for overrides in ({}, {"tasks.sts.decoder": "cross", "tasks.quora.decoder": "cross_cosine"}):
        cfg = tiny_cfg(**overrides)
        _, tasks, model = build(cfg, Dist())
        metrics = evaluate(model, tasks, "dev", 64, torch.device("cpu"))
        reported = {f"{t}.{m}" for t, ms in metrics.items() if isinstance(ms, dict) for m in ms}
        assert ["overall", *sorted(reported)] == ["overall", *sorted(
            f"{t.name}.{m}" for t in cfg.tasks for m in config_mod.dev_metrics(t))]


def test_dev_metric_choices_for_contrastive_and_sentences():
    cfg = config_mod.load(CONFIGS / "debug_tiny_nli.yaml")
    assert config_mod.dev_metrics(cfg.task("nli")) == ["triplet_acc"]
    sentences = config_mod.TaskConfig(name="s", kind="sentences", train="x.txt")
    assert config_mod.dev_metrics(sentences) == []


def test_format_choices_are_the_readers_formats():
    from mtkit.tasks import FORMATS
    for fmt in ["auto", *FORMATS]:
        assert config_mod.load(CONFIGS / "debug_tiny.yaml", {"tasks.sst.format": fmt}).task("sst").format == fmt


def test_launcher_stops_before_building_anything(tmp_path, capsys):
    # A nonsense setting stops the launcher before anything is built: no run folder, exit status 2.
    spec = importlib.util.spec_from_file_location("launcher_train", REPO / "launchers" / "train.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        launcher.main(["--config", str(CONFIGS / "debug_tiny.yaml"), "--out", str(out), "--train.grad_accum=0"])
    assert e.value.code == 2 and not out.exists()
    assert capsys.readouterr().err == "error: override --train.grad_accum: train.grad_accum = 0; use an integer >= 1\n"


def test_every_shipped_deepspeed_json_reads():
    for path in sorted((CONFIGS / "deepspeed").glob("*.json")):
        assert config_mod.read_deepspeed_json(str(path)) == json.loads(path.read_text())
