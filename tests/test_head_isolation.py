"""A head's parameters and its optimizer state change only on its own task's steps."""
import copy

import torch

from mtkit.config import Config
from mtkit.distributed import Dist
from mtkit.engine import TorchEngine
from mtkit.model import MultiTaskModel

from test_model import batch, tasks, tiny_encoder


def snapshot(engine, task):
    params = {n: p.detach().clone() for n, p in engine.module.head_parameters(task)}
    state = {}
    for _, p in engine.module.head_parameters(task):
        s = engine.optimizer.state.get(p, {})
        state[id(p)] = {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
    return params, state


def same(a, b):
    pa, sa = a
    pb, sb = b
    if pa.keys() != pb.keys() or sa.keys() != sb.keys():
        return False
    return (all(torch.equal(pa[k], pb[k]) for k in pa)
            and all(sa[k].keys() == sb[k].keys() and all(torch.equal(torch.as_tensor(sa[k][j]),
                                                                      torch.as_tensor(sb[k][j]))
                                                         for j in sa[k]) for k in sa))


def test_heads_and_adam_state_move_only_on_their_own_steps():
    ts = tasks()
    for t in ts:
        t.weight_decay = 0.1  # decay alone would move an idle head if the optimizer touched it
    cfg = Config(tasks=ts)
    cfg.train.max_steps = 10
    engine = TorchEngine(MultiTaskModel(tiny_encoder(), ts), cfg, 10, Dist())
    data = {"sst": batch(1, labels=[0, 1, 2, 3]), "quora": batch(2, labels=[0, 1, 1, 0]),
            "sts": batch(2, labels=[0.5, 1.0, 4.0, 2.0])}

    def train_step(task):
        engine.backward(engine(task, data[task]))
        engine.step()

    train_step("quora")
    train_step("sts")  # every head now has Adam state
    before = {t: snapshot(engine, t) for t in data}
    encoder_before = copy.deepcopy(engine.module.encoder.state_dict())
    for _ in range(3):
        train_step("sst")
    assert not same(before["sst"], snapshot(engine, "sst"))
    assert same(before["quora"], snapshot(engine, "quora"))
    assert same(before["sts"], snapshot(engine, "sts"))
    assert any(not torch.equal(v, engine.module.encoder.state_dict()[k]) for k, v in encoder_before.items())

    train_step("quora")
    assert not same(before["quora"], snapshot(engine, "quora"))
    assert same(before["sts"], snapshot(engine, "sts"))
