"""Task-specific encoder layers (model.task_layers): each task group gets its own copy of the top layers.

Checked against independent references: the unsplit encoder (every top starts as the pretrained layers),
the optimizer's behaviour on other tasks' steps, the joint-strategy gradient scale, the exported HF
folders, and (2 CPU ranks) DeepSpeed ZeRO 0/1/2 against the single-process engine."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModel

from conftest import write_toy_data
from distributed_util import train
from mtkit.config import Config, ModelConfig
from mtkit.distributed import Dist
from mtkit.engine import TorchEngine
from mtkit.export import export_encoder
from mtkit.model import MultiTaskModel
from mtkit.model.encoder import Encoder
from mtkit.model.encoder import load_tokenizer
from test_model import TINY, batch, tasks

LAYERS3 = {**TINY, "num_hidden_layers": 3}


def encoder(pooling="mean", task_layers=0, groups=(), seed=0):
    torch.manual_seed(seed)
    return Encoder(ModelConfig(random_init=True, arch=LAYERS3, pooling=pooling, task_layers=task_layers),
                   groups)


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_every_top_starts_as_the_unsplit_encoder(pooling):
    full = encoder(pooling).eval()
    split = encoder(pooling, task_layers=1, groups=["a", "b"]).eval()
    assert len(split.bert.encoder.layer) == 2 and all(len(t) == 1 for t in split.tops.values())
    ids = torch.tensor([[101, 1500, 1600, 1700, 102, 0], [101, 1800, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    want = full(ids, mask)
    for group in ("a", "b"):
        assert torch.allclose(split(ids, mask, group=group), want, atol=1e-6), group


def perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_shared_parameters_exclude_the_tops_and_each_top_has_its_own_groups():
    model = MultiTaskModel(encoder(task_layers=1, groups=["pairs", "sst"]), tasks(),
                           groups={"pairs": ["quora", "sts"]})
    assert model.top_of == {"sst": "sst", "quora": "pairs", "sts": "pairs"}
    shared = {n for n, _ in model.shared_parameters()}
    assert shared and not any(n.startswith("tops.") for n in shared)
    every = {n for n, _ in model.encoder.named_parameters()}
    assert every - shared == {n for n in every if n.startswith("tops.")}
    names = [g["name"] for g in model.param_groups(Config(tasks=tasks()))]
    assert {"top.pairs", "top.pairs.no_decay", "top.sst", "top.sst.no_decay"} <= set(names)
    in_groups = [id(p) for g in model.param_groups(Config(tasks=tasks())) for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in model.parameters())  # each parameter in one group


def test_a_top_moves_only_on_its_own_tasks_steps():
    ts = tasks()
    for t in ts:
        t.dropout = 0.0
    model = MultiTaskModel(encoder(task_layers=1, groups=["pairs", "sst"]), ts, groups={"pairs": ["quora", "sts"]})
    cfg = Config(tasks=ts)
    cfg.optim.encoder_weight_decay = 0.1  # decay alone would move an idle top if the optimizer touched it
    engine = TorchEngine(model, cfg, 10, Dist())
    data = {"sst": batch(1, labels=[0, 1, 2, 3]), "quora": batch(2, labels=[0, 1, 1, 0]),
            "sts": batch(2, labels=[0.5, 1.0, 4.0, 2.0])}

    def step(task):
        engine.backward(engine(task, data[task]))
        engine.step()

    def top(group):
        return [p.detach().clone() for _, p in model.top_parameters(group)]

    def trunk():
        return [p.detach().clone() for _, p in model.shared_parameters()]

    step("sst")
    step("quora")  # both tops have Adam state now
    sst, pairs, shared = top("sst"), top("pairs"), trunk()
    for _ in range(2):
        step("sts")
    assert all(torch.equal(a, b) for a, b in zip(sst, top("sst")))          # idle: untouched
    assert any(not torch.equal(a, b) for a, b in zip(pairs, top("pairs")))  # sts shares the pairs top
    assert any(not torch.equal(a, b) for a, b in zip(shared, trunk()))


def test_joint_weight_scales_the_shared_trunk_only():
    ts = tasks()
    model = MultiTaskModel(encoder(task_layers=1, groups=["sst", "quora", "sts"]), ts).eval()
    data = batch(2, labels=[0.5, 1.0, 4.0, 2.0])
    params = {"trunk": [p for _, p in model.shared_parameters()],
              "top": [p for _, p in model.top_parameters("sts")],
              "head": [p for _, p in model.head_parameters("sts")]}

    def grads(weight):
        loss = model("sts", data, weight)
        flat = torch.autograd.grad(loss, [p for ps in params.values() for p in ps], allow_unused=True)
        out, i = {}, 0
        for k, ps in params.items():
            out[k] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                for g, p in zip(flat[i:i + len(ps)], ps)])
            i += len(ps)
        return out

    plain, weighted = grads(None), grads(0.3)
    assert plain["trunk"].abs().sum() > 0 and plain["top"].abs().sum() > 0
    assert torch.allclose(weighted["trunk"], 0.3 * plain["trunk"], rtol=1e-5, atol=1e-6)  # rounding only
    assert torch.allclose(weighted["top"], plain["top"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(weighted["head"], plain["head"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "pooler"])
def test_export_writes_one_complete_encoder_per_group(tmp_path, pooling):
    ts = tasks()
    model = MultiTaskModel(encoder(pooling, task_layers=1, groups=["pairs", "sst"]), ts,
                           groups={"pairs": ["quora", "sts"]}).eval()
    perturb(model.encoder.tops["sst"], seed=1)  # the tops now differ from each other
    cfg = Config(model=ModelConfig(random_init=True, arch=LAYERS3, pooling=pooling, task_layers=1), tasks=ts)
    path = export_encoder(model, load_tokenizer(cfg.model), cfg, tmp_path / "encoder")
    assert json.loads((path / "groups.json").read_text()) == {"pairs": ["quora", "sts"], "sst": ["sst"]}
    ids = torch.tensor([[101, 1500, 1600, 102, 0], [101, 1800, 1900, 2000, 102]])
    mask = (ids != 0).long()
    outs = {}
    for group in ("pairs", "sst"):
        hf = AutoModel.from_pretrained(path / group).eval()
        assert hf.config.num_hidden_layers == 3 and len(hf.encoder.layer) == 3
        out = hf(input_ids=ids, attention_mask=mask)
        if pooling == "pooler":
            emb = out.pooler_output
        else:
            m = mask.unsqueeze(-1).float()
            emb = (out.last_hidden_state * m).sum(1) / m.sum(1)
        outs[group] = model.encoder(ids, mask, group=group)
        assert torch.allclose(emb, outs[group], atol=1e-5), group
        assert json.loads((path / group / "mtkit_encoder.json").read_text())["pooling"] == pooling
    assert not torch.allclose(outs["pairs"], outs["sst"], atol=1e-3)


def test_unknown_task_in_a_group_is_refused():
    with pytest.raises(ValueError, match="no task named 'nli'"):
        MultiTaskModel(encoder(task_layers=1, groups=["pairs"]), tasks(), groups={"pairs": ["nli"]})


def test_too_many_task_layers_is_refused():
    with pytest.raises(ValueError, match="task_layers = 3"):
        encoder(task_layers=3, groups=["a"])


# ---------------------------------------------------------------- whole runs

NO_DROPOUT = ["--model.arch.hidden_dropout_prob=0", "--model.arch.attention_probs_dropout_prob=0",
              "--tasks.sst.dropout=0", "--tasks.quora.dropout=0", "--tasks.sts.dropout=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tops")
    return write_toy_data(tmp / "data", n=64), tmp / "cache"


def common(root, cache):
    return [f"--data.root={root}", f"--data.cache_dir={cache}", "--train.eval_every=6", "--train.log_every=2",
            "--train.epochs=2", "--model.task_layers=1", "--model.task_groups.pairs=quora,sts"] + [
        f"--tasks.{t}.{k}=none" for t in ("sst", "quora", "sts") for k in ("max_train", "max_eval")]


@pytest.fixture(scope="module")
def one_rank(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    train(out, *common(*data), *NO_DROPOUT, "--train.batch_size=16", "--train.engine=torch", ranks=1)
    return out


def test_run_trains_every_top_and_diagnoses_the_trunk_only(one_rank):
    from mtkit.model import build_model
    from mtkit import config as config_mod
    cfg = config_mod.load(None, json.loads((one_rank / "config.json").read_text()))
    torch.manual_seed(cfg.train.seed)
    initial = build_model(cfg).state_dict()
    final = torch.load(one_rank / "checkpoints" / "step_24" / "engine.pt", weights_only=False)["model"]
    for group in ("pairs", "sst"):
        keys = [k for k in initial if k.startswith(f"encoder.tops.{group}.")]
        assert keys and any(not torch.equal(initial[k], final[k]) for k in keys), group
    # The probe's gradient vector covers the shared trunk only: layer groups name no top.
    record = json.loads((one_rank / "diagnostics.jsonl").read_text().splitlines()[0])
    groups = next(iter(record["layer_cos"].values()))
    assert groups and not any("top" in g for g in groups)
    assert "layer.1" not in " ".join(groups)  # the tiny model's top layer (index 1) is task-specific


def test_resume_with_task_layers_is_exact(one_rank, data, tmp_path):
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(one_rank / "checkpoints" / "step_18", resumed / "checkpoints" / "step_18")
    (resumed / "checkpoints" / "latest").write_text("step_18")
    train(resumed, *common(*data), *NO_DROPOUT, "--train.batch_size=16", "--train.engine=torch", ranks=1,
          resume="auto")
    final = "checkpoints/step_24/engine.pt"
    a = torch.load(one_rank / final, weights_only=False)
    b = torch.load(resumed / final, weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_two_deepspeed_ranks_equal_one_rank_with_task_layers(stage, one_rank, data, tmp_path):
    # Per-group masking must leave idle tops (and their Adam state) alone under every ZeRO stage, or the
    # 2-rank weights drift from the single-process engine, where idle tops get no gradient at all.
    two = tmp_path / "two"
    train(two, *common(*data), *NO_DROPOUT, "--train.batch_size=8",
          f"--deepspeed.config=configs/deepspeed/zero{stage}.json")
    a = torch.load(one_rank / "best" / "model.pt")
    b = torch.load(two / "best" / "model.pt")
    assert a.keys() == b.keys() and any(k.startswith("encoder.tops.") for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst


@pytest.mark.parametrize("overrides,message", [
    ({"model.task_layers": -1}, "model.task_layers = -1"),
    ({"model.task_groups.pairs": "quora,sts"}, "needs model.task_layers > 0"),
    ({"model.task_layers": 1, "model.task_groups.pairs": "quora,nli"}, "no task named 'nli'"),
    ({"model.task_layers": 1, "model.task_groups.a": "sst", "model.task_groups.b": "sst"}, "more than one group"),
])
def test_task_layer_settings_are_validated(overrides, message):
    from mtkit import config as config_mod
    from conftest import CONFIGS
    with pytest.raises(config_mod.ConfigError, match=message):
        config_mod.load(CONFIGS / "debug_tiny.yaml", overrides)
