"""Non-finite losses and gradients: detected per task, the step skipped (weights and optimizer state
untouched) or the run stopped with a checkpoint, under the plain engine and DeepSpeed ZeRO 0/1/2.

Run as a script under `deepspeed --num_gpus 2` it is the worker of the 2-rank test."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the worker runs outside pytest
from conftest import CONFIGS, write_toy_data  # noqa: E402
from distributed_util import deepspeed, run  # noqa: E402
from test_model import batch, tasks, tiny_encoder  # noqa: E402
from test_smoke import scalars  # noqa: E402

from mtkit import config as config_mod  # noqa: E402
from mtkit.config import Config, DeepSpeedConfig  # noqa: E402
from mtkit.distributed import Dist, StopRequest  # noqa: E402
from mtkit.engine import TorchEngine  # noqa: E402
from mtkit.loop import _StepCheck  # noqa: E402
from mtkit.model import MultiTaskModel  # noqa: E402

BAD_ROW = 5        # STS training row whose label is 1e39: finite as a Python float, inf in float32
BAD_LABEL = 1e39


def constant_lr(cfg: Config) -> Config:
    cfg.optim.lr_schedule, cfg.optim.warmup_ratio = "constant", 0.0
    return cfg


def snapshot(engine) -> dict:
    """Weights, the optimizer's own parameters (ZeRO's fp32 partitions) and state, and the lr schedule."""
    opt = engine.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    return {"weights": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
            "master": [p.detach().clone() for p in params],
            "state": [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)} for p in params],
            "schedule": engine.scheduler.last_epoch}


def same(a: dict, b: dict) -> bool:
    return (a["weights"].keys() == b["weights"].keys()
            and all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
            and len(a["master"]) == len(b["master"]) and all(map(torch.equal, a["master"], b["master"]))
            and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                    for x, y in zip(a["state"], b["state"])))


def micro_step(engine, check, task: str, batches: dict) -> None:
    """One micro-batch of `task` as the loop runs it."""
    with engine.autocast():
        loss = engine(task, batches[task])
    with check.watch(task, loss):
        engine.backward(loss)
    engine.step(skip=engine.at_boundary() and check.step_failed())


def data(rank: int = 0, bad: bool = False) -> dict:
    sts = [BAD_LABEL if bad else 0.5, 1.0, 4.0, 2.0]
    return {"sst": batch(1, labels=[0, 1, 2, 3], seed=rank), "quora": batch(2, labels=[0, 1, 1, 0], seed=rank),
            "sts": batch(2, labels=sts, seed=rank)}


# ---------------------------------------------------------------- plain engine, unit level

def torch_engine(grad_accum: int = 1):
    cfg = constant_lr(Config(tasks=tasks()))
    cfg.train.grad_accum = grad_accum
    model = MultiTaskModel(tiny_encoder(seed=0), cfg.tasks).eval()  # no dropout: runs compare exactly
    return model, TorchEngine(model, cfg, 10, Dist())


def test_a_skipped_step_equals_never_seeing_the_batch():
    model, engine = torch_engine()
    check = _StepCheck(model, Dist(), StopRequest())
    micro_step(engine, check, "sst", data())
    before = snapshot(engine)
    micro_step(engine, check, "sts", data(bad=True))
    assert check.bad_task == "sts"
    after = snapshot(engine)
    assert same(before, after) and after["schedule"] == before["schedule"] + 1
    micro_step(engine, check, "quora", data())
    assert check.bad_task is None

    ref_model, ref = torch_engine()  # the same steps without the bad batch
    ref_check = _StepCheck(ref_model, Dist(), StopRequest())
    micro_step(ref, ref_check, "sst", data())
    micro_step(ref, ref_check, "quora", data())
    assert same(snapshot(ref), snapshot(engine))
    assert not same(before, snapshot(engine))  # training went on after the skip


def test_a_nonfinite_gradient_with_a_finite_loss_names_its_task_within_an_accumulated_step():
    model, engine = torch_engine(grad_accum=2)
    # An inf that appears only in backward, in one encoder weight, during the second micro-batch.
    weight = model.encoder.bert.embeddings.word_embeddings.weight
    poison = {"on": False}
    weight.register_hook(lambda g: g * float("inf") if poison["on"] else g)
    check = _StepCheck(model, Dist(), StopRequest())
    before = snapshot(engine)
    micro_step(engine, check, "quora", data())
    assert check.bad_task is None  # not at the boundary yet: nothing decided
    poison["on"] = True
    with engine.autocast():
        loss = engine("sst", data()["sst"])
    with check.watch("sst", loss):
        engine.backward(loss)
    assert torch.isfinite(loss)
    engine.step(skip=engine.at_boundary() and check.step_failed())
    assert check.bad_task == "sst" and same(before, snapshot(engine))


# ---------------------------------------------------------------- plain engine, whole runs

def overrides(root: Path, cache: Path, **extra) -> dict:
    base = {"data.root": str(root), "data.cache_dir": str(cache), "diagnostics.mode": "off",
            "optim.lr_schedule": "constant", "optim.warmup_ratio": "0", "tasks.sts.label_range": "none",
            "train.log_every": "1", "train.trace": "true", "train.max_steps": "40"}
    for t in ("sst", "quora", "sts"):
        base[f"tasks.{t}.max_train"] = base[f"tasks.{t}.max_eval"] = "none"
    return {**base, **{k.replace("__", "."): str(v) for k, v in extra.items()}}


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nonfinite")
    root = write_toy_data(tmp / "data")
    path = root / "sts" / "sts-train.csv"
    lines = path.read_text().splitlines()
    fields = lines[1 + BAD_ROW].split("\t")
    lines[1 + BAD_ROW] = "\t".join([*fields[:-1], str(BAD_LABEL)])
    path.write_text("\n".join(lines) + "\n")
    return root, tmp / "cache"


@pytest.fixture(scope="module")
def stopped(bad_data, tmp_path_factory):
    """`train.nonfinite: stop` through the launcher: (out, its output, the step holding the bad row)."""
    out = tmp_path_factory.mktemp("stop") / "run"
    args = [f"--{k}={v}" for k, v in overrides(*bad_data, train__nonfinite="stop").items()]
    proc = run([sys.executable, "launchers/train.py", "--config", "configs/debug_tiny.yaml", "--out", str(out),
                *args])
    trace = [json.loads(x) for x in (out / "trace" / "rank0.jsonl").read_text().splitlines()]
    bad_step = next(r["step"] for r in trace if r["task"] == "sts" and BAD_ROW in r["indices"]) + 1
    return out, proc, bad_step


def test_stop_exits_2_naming_task_and_step_with_a_checkpoint(stopped):
    out, proc, bad_step = stopped
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: non-finite loss or gradient in task 'sts' at step {bad_step}" in proc.stderr
    assert (out / "checkpoints" / "latest").read_text() == f"step_{bad_step}"
    assert not (out / "results.json").exists()


def test_skip_leaves_the_step_unapplied_and_training_continues(bad_data, stopped, tmp_path, caplog):
    from mtkit.run import run as run_config
    _, _, s = stopped
    load = lambda **kw: config_mod.load(CONFIGS / "debug_tiny.yaml", overrides(*bad_data, **kw))  # noqa: E731
    # Reference: the same run stopped just before the bad batch.
    run_config(load(train__max_steps=s - 1, train__eval_every=s - 1), tmp_path / "before")
    with caplog.at_level(logging.WARNING, logger="mtkit"):
        results = run_config(load(train__nonfinite="skip", train__max_steps=s + 2, train__eval_every=s),
                             tmp_path / "skip")

    def engine_state(run_dir: Path, step: int) -> dict:
        state = torch.load(run_dir / "checkpoints" / f"step_{step}" / "engine.pt", weights_only=False)
        return {"model": state["model"], "optimizer": state["optimizer"]["state"]}

    reference = engine_state(tmp_path / "before", s - 1)
    for state in (engine_state(tmp_path / "skip", s), engine_state(stopped[0], s)):  # skip, and stop
        assert state["model"].keys() == reference["model"].keys()
        assert all(torch.equal(state["model"][k], reference["model"][k]) for k in reference["model"])
        assert state["optimizer"].keys() == reference["optimizer"].keys()
        for i, per_param in reference["optimizer"].items():
            assert all(torch.equal(state["optimizer"][i][k], v) for k, v in per_param.items())

    after = engine_state(tmp_path / "skip", s + 2)["model"]
    assert any(not torch.equal(after[k], reference["model"][k]) for k in after)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert results["nonfinite_skipped"] == 1 and results["steps"] == s + 2
    assert scalars(tmp_path / "skip", "train/nonfinite_skipped") == {"train/nonfinite_skipped": [(s, 1.0)]}
    assert any(f"task 'sts' at step {s}: optimizer step skipped" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- DeepSpeed, 2 ranks

CASES = [(0, "fp32"), (1, "fp32"), (2, "fp32"), (0, "bf16"), (2, "bf16")]


@pytest.mark.slow
def test_deepspeed_ranks_agree_and_skip_leaves_zero_state_unchanged(tmp_path):
    out = tmp_path / "nonfinite.json"
    deepspeed("tests/test_nonfinite.py", str(out))
    for rank in (0, 1):
        results = json.loads(out.with_suffix(f".rank{rank}.json").read_text())
        for case in CASES:
            r = results[f"zero{case[0]}_{case[1]}"]
            assert r["bad_task"] == "sts", (rank, case, r)   # rank 0's own batch was finite
            assert r["unchanged_by_skip"] and r["schedule_advanced"], (rank, case, r)
            assert r["equals_reference"] and r["trained_after"], (rank, case, r)


def ds_worker(path: str) -> None:
    from mtkit.distributed import init_distributed
    from mtkit.engine.deepspeed_engine import DeepSpeedEngine
    dist = init_distributed("cpu")

    def engine(stage: int, precision: str):
        cfg = constant_lr(Config(tasks=tasks(), deepspeed=DeepSpeedConfig(zero_stage=stage)))
        cfg.train.batch_size, cfg.train.precision = 4, precision
        model = MultiTaskModel(tiny_encoder(seed=0), cfg.tasks).eval()  # no dropout: runs compare exactly
        ds = DeepSpeedEngine(model, cfg, 10, dist)
        return ds, _StepCheck(model, dist, StopRequest())

    results = {}
    for stage, precision in CASES:
        good, bad = data(dist.rank), data(dist.rank, bad=dist.rank == 1)  # inf on one rank only
        e, check = engine(stage, precision)
        micro_step(e, check, "sst", good)
        before = snapshot(e)
        micro_step(e, check, "sts", bad)
        bad_task, after = check.bad_task, snapshot(e)
        micro_step(e, check, "quora", good)
        ref, ref_check = engine(stage, precision)
        micro_step(ref, ref_check, "sst", good)
        micro_step(ref, ref_check, "quora", good)
        results[f"zero{stage}_{precision}"] = {
            "bad_task": bad_task, "unchanged_by_skip": same(before, after),
            "schedule_advanced": after["schedule"] == before["schedule"] + 1,
            "equals_reference": same(snapshot(ref), snapshot(e)), "trained_after": not same(after, snapshot(e))}
    Path(path).with_suffix(f".rank{dist.rank}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    ds_worker([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
