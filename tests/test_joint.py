"""Joint steps with gradient surgery: the surrogate losses give the engine exactly the combined gradient
on the shared encoder, and every head exactly its own task's gradient."""
import pytest
import torch

from mtkit.config import Config
from mtkit.distributed import Dist
from mtkit.engine import TorchEngine
from mtkit.model import MultiTaskModel
from mtkit.strategies import make_strategy
from mtkit.strategies.joint import JointStep

from test_model import batch, tasks, tiny_encoder


def explicit_pcgrad(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """PCGrad for two tasks written out on vectors (order does not matter for T = 2)."""
    def project(a, b):
        dot = a @ b
        return a - dot / (b @ b) * b if dot < 0 else a
    return project(g1, g2) + project(g2, g1)


def flat_grads(model, loss):
    params = [p for _, p in model.shared_parameters()]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("strategy", ["sum", "pcgrad", "gradvac", "cagrad"])
def test_surrogate_realises_the_strategy_exactly(strategy):
    ts = [t for t in tasks() if t.name in ("sst", "sts")]
    for t in ts:
        t.dropout = 0.0
    cfg = Config(tasks=ts)
    cfg.train.strategy = strategy
    cfg.optim.max_grad_norm = 0.0
    # Encoder seed 1 with these batches gives conflicting task gradients (cos = -0.09), so PCGrad and
    # GradVac really project; eval mode: no dropout, so every pass sees the same function.
    model = MultiTaskModel(tiny_encoder(seed=1), ts).eval()
    engine = TorchEngine(model, cfg, 10, Dist())
    group = [("sst", batch(1, labels=[0, 1, 2, 3])), ("sts", batch(2, labels=[0.5, 4.0, 2.0, 1.0], seed=1))]
    kwargs = {"seed": 0} if strategy in ("pcgrad", "gradvac") else {}
    joint = JointStep(make_strategy(strategy, **kwargs), model, lambda G: G.double() @ G.double().T)
    weights = joint.weights(group)
    g = {t: flat_grads(model, model(t, b)) for t, b in group}
    assert g["sst"] @ g["sts"] < 0
    if strategy != "sum":
        assert weights != {"sst": 1.0, "sts": 1.0}
    head_g = {t: torch.autograd.grad(model(t, b), [p for _, p in model.head_parameters(t)]) for t, b in group}
    for task, b in group:
        engine.backward(engine(task, b, weights[task]))
    shared = torch.cat([p.grad.flatten() for _, p in model.shared_parameters()])
    expected = sum(weights[t] * g[t] for t, _ in group) / 2  # the engine averages over the T micro-batches
    assert torch.allclose(shared, expected, atol=1e-6, rtol=1e-5)
    if strategy == "pcgrad":
        assert torch.allclose(2 * shared, explicit_pcgrad(g["sst"], g["sts"]), atol=1e-5, rtol=1e-4)
    if strategy == "sum":
        assert weights == {"sst": 1.0, "sts": 1.0}
    for t, _ in group:  # heads: their own gradient, never scaled by the strategy
        for (_, p), ref in zip(model.head_parameters(t), head_g[t]):
            assert torch.allclose(p.grad, ref / 2, atol=1e-6)


def test_joint_run_trains_every_task_each_step(tiny_cfg, tmp_path):
    from mtkit.run import run
    cfg = tiny_cfg(**{"train.strategy": "pcgrad", "train.trace": True, "train.save_checkpoints": False})
    results = run(cfg, tmp_path / "joint")
    import json
    rows = [json.loads(x) for x in (tmp_path / "joint" / "trace" / "rank0.jsonl").read_text().splitlines()]
    by_step = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r["task"])
    assert all(sorted(v) == ["quora", "sst", "sts"] for v in by_step.values())
    assert results["steps"] == len(by_step) == 3  # one pass over the largest task: 48 rows / 16
