import json
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


# ---------------------------------------------------------------- base: inheritance

TINY = (CONFIGS / "debug_tiny.yaml").read_text()


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    assert text.count(needle) == 1, needle
    return text[:text.index(needle)].count("\n") + 1


def test_variant_equals_the_same_config_written_out_in_full(tmp_path):
    # The variant changes one field of one task, one entry of a nested mapping and a scalar; the reference
    # is debug_tiny.yaml with the same edits made in its text.
    write(tmp_path / "base.yaml", TINY)
    variant = write(tmp_path / "variant.yaml", "base: base.yaml\nname: variant\n"
                    "tasks:\n  - name: quora\n    decoder: cosine\n"
                    "model:\n  arch: {hidden_size: 16}\ntrain:\n  seed: 5\n")
    full = (TINY.replace("name: debug_tiny", "name: variant")
            .replace("    decoder: sbert", "    decoder: cosine")
            .replace("hidden_size: 32", "hidden_size: 16").replace("  seed: 0", "  seed: 5"))
    reference = write(tmp_path / "full.yaml", full)
    cfg = config_mod.load(variant)
    assert config_mod.to_dict(cfg) == config_mod.to_dict(config_mod.load(reference))
    assert [t.name for t in cfg.tasks] == ["sst", "quora", "sts"]          # order of the base kept
    assert cfg.model.arch == {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                              "intermediate_size": 64}                       # merged, not replaced


def test_a_variant_adds_tasks_and_replaces_plain_lists(tmp_path):
    write(tmp_path / "base.yaml", TINY.replace("  seed: 0", "  seed: 0\n  predict: [dev, test]"))
    variant = write(tmp_path / "v.yaml", "base: base.yaml\ntrain:\n  predict: [dev]\ntasks:\n"
                    "  - {name: sst2, kind: classification, train: sst/x.csv, num_labels: 2}\n")
    cfg = config_mod.load(variant)
    assert [t.name for t in cfg.tasks] == ["sst", "quora", "sts", "sst2"]
    assert cfg.train.predict == ["dev"]


def test_base_chains_resolve_relative_to_each_including_file(tmp_path):
    write(tmp_path / "a" / "root.yaml", TINY)
    write(tmp_path / "b" / "mid.yaml", "base: ../a/root.yaml\ntrain:\n  seed: 1\n  log_every: 3\n")
    leaf = write(tmp_path / "c" / "d" / "leaf.yaml", "base: ../../b/mid.yaml\ntrain:\n  seed: 2\n")
    cfg = config_mod.load(leaf)
    assert (cfg.train.seed, cfg.train.log_every, cfg.train.epochs) == (2, 3, 2.0)


def test_base_cycles_are_refused_naming_the_chain(tmp_path):
    a = write(tmp_path / "a.yaml", "base: b.yaml\nname: a\n")
    b = write(tmp_path / "b.yaml", "name: b\nbase: a.yaml\n")
    with pytest.raises(ConfigError) as e:
        config_mod.load(a)
    assert str(e.value) == (f"{b}:2: base: a.yaml makes a cycle ({a.resolve()} -> {b.resolve()} -> "
                            f"{a.resolve()}); a config cannot inherit from itself")
    me = write(tmp_path / "me.yaml", "base: ./me.yaml\n")
    with pytest.raises(ConfigError, match=f"{me}:1: base: ./me.yaml makes a cycle"):
        config_mod.load(me)


def test_bad_base_values_name_the_including_file_and_line(tmp_path):
    p = write(tmp_path / "v.yaml", "name: v\nbase: nothere.yaml\n")
    with pytest.raises(ConfigError, match=f"{p}:2: base file {tmp_path / 'nothere.yaml'} not found"):
        config_mod.load(p)
    p.write_text("name: v\nbase: [a.yaml, b.yaml]\n")
    with pytest.raises(ConfigError, match=rf"{p}:2: base must name one YAML file .*got \['a.yaml', 'b.yaml'\]"):
        config_mod.load(p)


def test_errors_name_the_file_and_line_each_value_came_from(tmp_path):
    base_text = TINY.replace("  seed: 0", "  seed: 0\n  epochz: 3").replace("    num_labels: 5",
                                                                            "    num_labels: 5\n    lr: -1")
    base = write(tmp_path / "sub" / "base.yaml", base_text)
    variant_text = "# a variant\nbase: sub/base.yaml\ntasks:\n  - name: quora\n    lr: -2\n"
    variant = write(tmp_path / "v.yaml", variant_text)
    # an unknown key of the base: the base's line
    with pytest.raises(ConfigError, match=rf"^{base}:{line_of(base_text, 'epochz')}: unknown key 'train.epochz'"):
        config_mod.load(variant)
    base.write_text(base_text.replace("  epochz: 3\n", ""))
    base_text = base.read_text()
    # a bad value of a task the variant does not touch: the base's line
    with pytest.raises(ConfigError, match=rf"^{base}:{line_of(base_text, 'lr: -1')}: tasks.sst.lr = -1.0"):
        config_mod.load(variant)
    base.write_text(base_text.replace("    lr: -1\n", ""))
    # the variant's own bad value in a merged task: the variant's line
    with pytest.raises(ConfigError, match=rf"^{variant}:5: tasks.quora.lr = -2.0"):
        config_mod.load(variant)
    # a wrong type in the variant
    variant.write_text(variant_text.replace("lr: -2", "num_labels: two"))
    with pytest.raises(ConfigError, match=rf"^{variant}:5: tasks.quora.num_labels expects int, got 'two'"):
        config_mod.load(variant)
    # an override still reads as an override
    variant.write_text(variant_text.replace("lr: -2", "lr: 0.5"))
    with pytest.raises(ConfigError, match=r"^override --tasks.quora.lr: tasks.quora.lr = -3.0"):
        config_mod.load(variant, {"tasks.quora.lr": "-3"})


def test_mtl_minilm_bi_resolves_to_what_the_full_copy_gave():
    # tests/fixtures/mtl_minilm_bi_before_base.yaml is configs/mtl_minilm_bi.yaml as it was before it
    # became a `base: mtl_minilm.yaml` variant (a full copy of the main job with its own Quora head).
    before = config_mod.load(Path(__file__).parent / "fixtures" / "mtl_minilm_bi_before_base.yaml")
    after = config_mod.load(CONFIGS / "mtl_minilm_bi.yaml")
    assert config_mod.to_dict(after) != config_mod.to_dict(config_mod.load(CONFIGS / "mtl_minilm.yaml"))
    # Since then the main job (and so the variant) gained the evaluation-only SICK task, and only that.
    assert after.tasks[-1].name == "sick" and after.tasks[-1].eval_only
    after.tasks.pop()
    assert config_mod.to_dict(after) == config_mod.to_dict(before)


def test_a_pipeline_can_inherit_and_override_one_stage(tmp_path):
    write(tmp_path / "pipe.yaml", (CONFIGS / "debug_tiny_simcse.yaml").read_text()
          .replace("config: debug_tiny", f"config: {CONFIGS}/debug_tiny"))
    v = write(tmp_path / "v.yaml", "base: pipe.yaml\nstages:\n  - name: multitask\n    overrides: {train.seed: '4'}\n")
    assert config_mod.is_pipeline(v)
    pipe = config_mod.load_pipeline(v)
    assert [(s.name, s.init_from, s.overrides) for s in pipe.stages] == [
        ("simcse", None, {}), ("multitask", "simcse", {"train.seed": "4"})]


# ---------------------------------------------------------------- DeepSpeed JSON values mtkit owns

def ds_load(tmp_path, ds: dict, **overrides):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    over = {"deepspeed.config": str(path), **{k.replace("__", "."): v for k, v in overrides.items()}}
    return path, config_mod.load(CONFIGS / "debug_tiny.yaml", over)


def test_shipped_deepspeed_jsons_leave_mtkit_values_to_auto_and_get_them_filled_in(tmp_path):
    from mtkit.engine.deepspeed_engine import deepspeed_config
    owned = ["train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
             "gradient_clipping"]
    for z in (0, 1, 2):
        path = CONFIGS / "deepspeed" / f"zero{z}.json"
        raw = json.loads(path.read_text())
        assert [raw[k] for k in owned] == ["auto"] * 4 and raw["bf16"] == raw["fp16"] == {"enabled": "auto"}
        cfg = config_mod.load(CONFIGS / "debug_tiny.yaml", {"deepspeed.config": str(path), "train.grad_accum": "3",
                                                            "train.precision": "bf16", "optim.max_grad_norm": "0.5"})
        ds = deepspeed_config(cfg, 2)
        # debug_tiny: batch 16 per rank
        assert [ds[k] for k in owned] == [16, 3, 16 * 3 * 2, 0.5]
        assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (True, False)
        assert ds["zero_optimization"] == raw["zero_optimization"]


# JSON key: (the JSON, overrides that agree with it, overrides that do not, how mtkit's value comes about,
# the mtkit key to change)
AGREE = {
    "train_micro_batch_size_per_gpu": ({"train_micro_batch_size_per_gpu": 8}, {"train.batch_size": "8"}, {},
                                       "train.batch_size = 16 makes it 16", "train.batch_size"),
    "gradient_accumulation_steps": ({"gradient_accumulation_steps": 2}, {"train.grad_accum": "2"}, {},
                                    "train.grad_accum = 1 makes it 1", "train.grad_accum"),
    "gradient_clipping": ({"gradient_clipping": 0.5}, {"optim.max_grad_norm": "0.5"}, {},
                          "optim.max_grad_norm = 1.0 makes it 1.0", "optim.max_grad_norm"),
    "bf16.enabled": ({"bf16": {"enabled": True}}, {"train.precision": "bf16"}, {},
                     "train.precision = 'fp32' makes it false", "train.precision"),
    "fp16.enabled": ({"fp16": {"enabled": False, "loss_scale": 0}}, {}, {"train.precision": "fp16"},
                     "train.precision = 'fp16' makes it true", "train.precision"),
}


@pytest.mark.parametrize("key", AGREE)
def test_deepspeed_values_must_be_auto_or_agree_with_the_mtkit_config(tmp_path, key):
    ds, agree, disagree, because, change = AGREE[key]
    block, _, name = key.rpartition(".")
    have = json.dumps((ds[block] if block else ds)[name])
    ds_load(tmp_path, ds, **{k.replace(".", "__"): v for k, v in agree.items()})  # agrees: loads
    with pytest.raises(ConfigError) as e:
        ds_load(tmp_path, ds, **{k.replace(".", "__"): v for k, v in disagree.items()})
    path = tmp_path / "ds.json"
    assert str(e.value) == (f"override --deepspeed.config: deepspeed.config = '{path}'; {path}: {key} = {have}, "
                            f"but mtkit's {because}; set it to \"auto\" in the JSON (mtkit fills it in) or "
                            f"change {change}")


def test_deepspeed_train_batch_size_is_checked_against_the_world_size(tmp_path):
    from mtkit.engine.deepspeed_engine import deepspeed_config
    path, cfg = ds_load(tmp_path, {"train_batch_size": 64, "gradient_accumulation_steps": "auto"},
                        train__grad_accum="2")  # 16 x 2 = 32 per rank: 64 fits 2 ranks
    assert deepspeed_config(cfg, 2)["train_batch_size"] == 64
    with pytest.raises(ConfigError, match=rf"^{path}: train_batch_size = 64, but mtkit's train.batch_size = 16 x "
                                          r"train.grad_accum = 2 x 1 rank\(s\) makes it 32; set it to \"auto\""):
        deepspeed_config(cfg, 1)
    # Before the launch, only a total that no number of ranks can give is refused.
    with pytest.raises(ConfigError, match=rf"{path}: train_batch_size = 48, .* gives 32 per rank, so it must be "
                                          "a multiple of 32"):
        ds_load(tmp_path, {"train_batch_size": 48}, train__grad_accum="2")


def test_deepspeed_precision_block_must_be_an_object(tmp_path):
    with pytest.raises(ConfigError, match=r"ds.json: bf16 must be an object, got true"):
        ds_load(tmp_path, {"bf16": True})
