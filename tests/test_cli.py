"""The command line: help generated from the config dataclasses, one exact parser behind `mtkit train` and
`launchers/train.py`, overrides typed by the config fields, `--quiet`."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import typing

import pytest

from mtkit import cli
from mtkit import config as config_mod
from mtkit.args import parser

from conftest import CONFIGS, REPO, write_toy_data

TINY = str(CONFIGS / "debug_tiny.yaml")


def launcher():
    spec = importlib.util.spec_from_file_location("launcher_train", REPO / "launchers" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leaf_fields(cls=config_mod.Config, prefix=""):
    """Dotted key -> dataclass field, walking nested dataclasses and the task list (by name)."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            out.update(leaf_fields(tp, f"{prefix}{f.name}."))
        elif dataclasses.is_dataclass(inner):
            out.update(leaf_fields(inner, f"{prefix}{f.name}.<name>."))
        else:
            out[prefix + f.name] = f
    return out


def help_rows(text: str) -> dict[str, tuple[str, str, list[str] | None]]:
    """key -> (type, default, allowed values) from the config-key lines of `--help`."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^  (\S+)\s{2,}(.+?) = (.*?)(?:; (?:each )?one of (.*))?$", line)
        if m and not m.group(1).startswith("-"):
            rows[m.group(1)] = (m.group(2), m.group(3), m.group(4).split(", ") if m.group(4) else None)
    return rows


def test_mtkit_help_lists_every_command_with_one_line(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    commands = ["train"] + [n for n in dir(cli.CLI) if not n.startswith("_")]
    for name in commands:
        assert re.search(rf"^  {name}\s+\S.*$", out, re.M), name
    cli.main([])
    assert capsys.readouterr().out == out
    with pytest.raises(SystemExit) as e:
        cli.main(["trian"])
    assert e.value.code == 2 and "unknown command 'trian'" in capsys.readouterr().err


def test_train_help_lists_every_config_key_with_type_default_and_choices(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text == parser("mtkit train").format_help()
    assert text.replace("mtkit train", "launchers/train.py") == parser("launchers/train.py").format_help()
    for flag in ("--config", "--out", "--resume", "--overwrite", "--allow-config-change", "--quiet"):
        assert f"  {flag}" in text
    rows = help_rows(text)
    fields = leaf_fields()
    assert sorted(rows) == sorted(fields)
    for key, (_, _, choices) in rows.items():
        rule = config_mod.CHOICES.get(key.replace("tasks.<name>.", "task."))
        if rule is not None:
            assert choices == sorted(rule), key
    assert rows["train.precision"] == ("str", "fp32", ["bf16", "fp16", "fp32"])
    assert rows["train.max_steps"] == ("int | none", "none", None)
    assert rows["tasks.<name>.label_names"][0] == "list[str] | none"

    # Every default, typed back in as shown, gives the dataclass default: the help cannot be out of date.
    # (Dict fields have no flat form; a task needs its name, kind, train file and label count to validate.)
    required = {"tasks.<name>.name", "tasks.<name>.kind", "tasks.<name>.train", "tasks.<name>.num_labels"}
    typed = {key.replace("<name>", "sst"): ("" if shown == "[]" else shown) for key, (tp, shown, _) in rows.items()
             if not tp.startswith("dict") and key not in required}
    cfg = config_mod.load(TINY, typed)
    defaults = config_mod.Config(tasks=[config_mod.TaskConfig()])
    for key in typed:
        got, want = (cfg.task("sst"), defaults.tasks[0]) if key.startswith("tasks.") else (cfg, defaults)
        for part in key.removeprefix("tasks.sst.").split("."):
            got, want = getattr(got, part), getattr(want, part)
        assert got == want and type(got) is type(want), key


def test_values_reach_the_config_as_typed_and_only_list_fields_split(tmp_path, capsys):
    argv = ["--config", TINY, "--out", str(tmp_path), "--name=1.10", "--train.predict=dev,test",
            "--tasks.sst.label_names=a,b,c,d,e", "--data.cache_dir=a,b", "--optim.encoder_lr=1.10",
            "--train.eval_every=none"]
    args, overrides = cli.parse_train(argv)
    assert overrides["name"] == "1.10"
    cfg = config_mod.load(args.config, overrides)
    assert cfg.name == "1.10"
    assert cfg.train.predict == ["dev", "test"]
    assert cfg.task("sst").label_names == ["a", "b", "c", "d", "e"]
    assert cfg.data.cache_dir == "a,b"
    assert cfg.optim.encoder_lr == 1.1 and cfg.train.eval_every is None
    # mtkit config (a fire command) takes its overrides the same exact way.
    cli.main(["config", TINY, "--name=1.10", "--optim.betas=0.8,0.99", "--data.cache_dir=a,b"])
    printed = json.loads(capsys.readouterr().out)
    assert (printed["name"], printed["optim"]["betas"], printed["data"]["cache_dir"]) == ("1.10", [0.8, 0.99], "a,b")


def test_mtkit_train_and_the_launcher_parse_alike(tmp_path, capsys):
    argv = ["--config", TINY, "--out", str(tmp_path / "o"), "--resume", "auto", "--overwrite", "--local_rank=1",
            "--train.seed=3", "--tasks.sst.lr=5e-4", "--name=1.10", "--optim.betas=0.8,0.99", "--quiet"]
    args_cli, over_cli = cli.parse_train(argv)
    args_launcher, over_launcher = launcher().parse(argv)
    assert vars(args_cli) == vars(args_launcher)
    assert (args_cli.resume, args_cli.overwrite, args_cli.local_rank, args_cli.quiet) == ("auto", True, 1, True)
    assert over_cli == over_launcher
    cfg_cli = config_mod.load(args_cli.config, over_cli)
    assert cfg_cli == config_mod.load(args_launcher.config, over_launcher)
    # The same settings given as typed values, not through any parser.
    assert cfg_cli == config_mod.load(TINY, {"train.seed": 3, "tasks.sst.lr": 5e-4, "name": "1.10",
                                             "optim.betas": [0.8, 0.99]})
    # `mtkit train` really goes through that parser, and its errors stop before anything runs.
    for bad, message in (("--train.seed", "config overrides look like --section.key=value, got '--train.seed'"),
                         ("--conf=x", "config overrides look like")):  # no abbreviations of --config
        with pytest.raises(SystemExit) as e:
            cli.main(["train", "--config", TINY, "--out", str(tmp_path / "o"), bad, "3"])
        assert e.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--config", TINY, "--out", str(tmp_path / "o"), "--train.epochz=1"])
    assert e.value.code == 2 and "override --train.epochz: unknown key 'train.epochz'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_quiet_hides_the_bars_and_info_logs_and_changes_nothing_else(tmp_path):
    data = write_toy_data(tmp_path / "data")

    def train(name, *flags):
        proc = subprocess.run(
            [sys.executable, "-m", "mtkit.cli", "train", "--config", TINY, "--out", str(tmp_path / name),
             "--resume", "auto", "--train.max_steps=2", "--diagnostics.mode=off", "--train.num_threads=1",
             f"--data.root={data}", f"--data.cache_dir={tmp_path / name}-cache", *flags],
            capture_output=True, text=True, cwd=REPO, timeout=600)
        assert proc.returncode == 0, proc.stderr
        return proc

    loud, quiet = train("loud"), train("quiet", "--quiet")
    assert "train: 100%" in loud.stderr and "tokenize sst train" in loud.stderr
    assert "INFO mtkit: resume auto: no checkpoint" in loud.stderr
    assert "%|" not in quiet.stderr and "INFO" not in quiet.stderr
    assert json.loads(quiet.stdout)["dev"] == json.loads(loud.stdout)["dev"]


@pytest.mark.slow
def test_a_deepspeed_json_batch_that_disagrees_with_the_launch_stops_it(tmp_path):
    # 16 per rank, one micro batch: a train_batch_size of 16 passes validation (one rank could give it) but
    # not a 2-rank launch, which gives 32; every rank stops with the message instead of training on 32.
    from pathlib import Path

    from distributed_util import launch, shm_workspaces
    data = write_toy_data(tmp_path / "data")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 16, "zero_optimization": {"stage": 1}}))
    deepspeed = Path(sys.executable).with_name("deepspeed")
    proc, port = launch(lambda port: [
        str(deepspeed), "--num_gpus", "2", "--master_port", str(port), "launchers/train.py", "--config", TINY,
        "--out", str(tmp_path / "o"), f"--deepspeed.config={ds}", f"--data.root={data}",
        f"--data.cache_dir={tmp_path / 'cache'}", "--train.max_steps=2", "--diagnostics.mode=off"])
    assert proc.returncode != 0
    assert (f"error: {ds}: train_batch_size = 16, but mtkit's train.batch_size = 16 x train.grad_accum = 1 x "
            "2 rank(s) makes it 32; set it to \"auto\"") in proc.stdout + proc.stderr
    assert not shm_workspaces(port)
