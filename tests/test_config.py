from pathlib import Path

import pytest

from mtkit import config as config_mod
from mtkit.config import ConfigError

from conftest import CONFIGS


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads_and_validates(path):
    if config_mod.is_pipeline(path):
        assert config_mod.load_pipeline(path).stages  # loads every stage's config too
    else:
        assert config_mod.load(path).tasks


def test_deepspeed_json_configs_parse():
    import json
    for z in (0, 1, 2):
        assert json.loads((CONFIGS / "deepspeed" / f"zero{z}.json").read_text())["zero_optimization"]["stage"] == z


def test_pipeline_errors(tmp_path):
    p = tmp_path / "pipe.yaml"
    p.write_text(f"stages:\n  - name: a\n    config: {CONFIGS / 'debug_tiny.yaml'}\n    init_from: b\n")
    with pytest.raises(ConfigError, match="must name an earlier stage"):
        config_mod.load_pipeline(p)
    p.write_text("stages:\n  - name: a\n    confg: x.yaml\n")
    with pytest.raises(ConfigError, match="unknown key 'stages.a.confg'"):
        config_mod.load_pipeline(p)


def test_defaults_and_overrides_are_typed():
    cfg = config_mod.load(CONFIGS / "debug_tiny.yaml",
                          {"train.seed": "7", "optim.encoder_lr": "3e-4", "train.save_checkpoints": "false",
                           "tasks.sst.lr": 0.01, "train.predict": "dev,test", "tasks.sts.label_range": [0, 5]})
    assert cfg.train.seed == 7 and isinstance(cfg.train.seed, int)
    assert cfg.optim.encoder_lr == pytest.approx(3e-4)
    assert cfg.train.save_checkpoints is False
    assert cfg.task("sst").lr == 0.01
    assert cfg.train.predict == ["dev", "test"]
    assert cfg.task("sts").label_range == [0.0, 5.0]


def test_unknown_key_lists_valid_keys_with_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("tasks:\n  - {name: a, kind: classification, num_labels: 2, train: x}\n"
                 "train:\n  seed: 1\n  epochz: 3\n")
    with pytest.raises(ConfigError) as e:
        config_mod.load(p)
    msg = str(e.value)
    assert f"{p}:5" in msg and "train.epochz" in msg and "epochs" in msg and "max_steps" in msg


def test_wrong_type_names_key_and_value(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("tasks:\n  - name: a\n    kind: classification\n    num_labels: two\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:4: tasks.a.num_labels expects int, got 'two'"):
        config_mod.load(p)


def test_bad_override_and_choices():
    with pytest.raises(ConfigError, match="override --train.sed: unknown key"):
        config_mod.load(CONFIGS / "debug_tiny.yaml", {"train.sed": 1})
    with pytest.raises(ConfigError, match="no task named 'nope'"):
        config_mod.load(CONFIGS / "debug_tiny.yaml", {"tasks.nope.lr": 1})
    with pytest.raises(ConfigError, match="choose one of"):
        config_mod.load(CONFIGS / "debug_tiny.yaml", {"tasks.quora.decoder": "dot"})
    with pytest.raises(ConfigError, match="choose one of"):
        config_mod.load(CONFIGS / "debug_tiny.yaml", {"tasks.quora.kind": "ranking"})
    with pytest.raises(ConfigError, match="lp_steps"):
        config_mod.load(CONFIGS / "debug_tiny.yaml", {"train.mode": "lp_ft"})


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        config_mod.load(tmp_path / "absent.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        config_mod.load(p)


def test_round_trip_through_dict():
    cfg = config_mod.load(CONFIGS / "mtl_minilm.yaml")
    again = config_mod.load(None, config_mod.to_dict(cfg))
    assert again == cfg
