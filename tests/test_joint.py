"""Joint steps with gradient surgery, in train mode with dropout: the update the engine applies is the
strategy's published combination of the very per-task gradients of that step, and every head gets
exactly its own task's gradient. References are computed separately: per-task gradients by their own
forward/backward from the same RNG state, then PCGrad, GradVac or CAGrad written out on the vectors."""
import json

import numpy as np
import pytest
import torch

from mtkit.config import Config
from mtkit.distributed import Dist
from mtkit.engine import TorchEngine
from mtkit.model import MultiTaskModel
from mtkit.strategies import make_strategy
from mtkit.strategies.joint import JointStep
from mtkit.strategies.simple import SumStrategy

from test_model import batch, tasks, tiny_encoder
from test_strategies import vector_cagrad, vector_gradvac

DROPOUT = 0.1


def explicit_pcgrad(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """PCGrad for two tasks written out on vectors (order does not matter for T = 2)."""
    def project(a, b):
        dot = a @ b
        return a - dot / (b @ b) * b if dot < 0 else a
    return project(g1, g2) + project(g2, g1)


def reference_update(strategy: str, G: torch.Tensor, gradvac_targets=None) -> torch.Tensor:
    """The strategy's published update from per-task gradients G [2, P] (float64) -> [P]."""
    if strategy == "sum":
        return G.sum(0)
    if strategy == "pcgrad":
        return explicit_pcgrad(G[0], G[1])
    if strategy == "gradvac":
        orders = [[1], [0]]  # with two tasks every order is the same
        return vector_gradvac(G, gradvac_targets, orders, beta=0.01)[0]
    # CAGrad: the simplex weights from the 2-dimensional row space of G (same geometry, exact), the
    # direction d = g0 + c |g0| / |g_x| g_x on the full vectors, times T / (1 + c^2).
    c = 0.5
    _, R = torch.linalg.qr(G.T)                                            # G = R^T Q^T
    x, _ = vector_cagrad(R.T, c)
    g0, gx = G.mean(0), torch.from_numpy(x) @ G
    return 2 * (g0 + c * g0.norm() / gx.norm() * gx) / (1 + c * c)


def flat(grads, params):
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def setup(strategy: str, grad_accum: int = 1, precision: str = "fp32"):
    ts = [t for t in tasks() if t.name in ("sst", "sts")]
    for t in ts:
        t.dropout = DROPOUT
    cfg = Config(tasks=ts)
    cfg.train.strategy, cfg.train.grad_accum, cfg.train.precision = strategy, grad_accum, precision
    cfg.optim.max_grad_norm = 0.0
    # Encoder seed 1 with these batches gives conflicting task gradients, so PCGrad and GradVac project.
    # Train mode: hidden and attention dropout 0.1 in the encoder, 0.1 in the sst head.
    model = MultiTaskModel(tiny_encoder(seed=1), ts).train()
    assert model.encoder.bert.config.hidden_dropout_prob == DROPOUT
    engine = TorchEngine(model, cfg, 10, Dist())
    kwargs = {"seed": 0} if strategy in ("pcgrad", "gradvac") else {}
    joint = JointStep(make_strategy(strategy, **kwargs), model, lambda G: G.double() @ G.double().T,
                      engine.autocast)
    group = [("sst", batch(1, labels=[0, 1, 2, 3], seed=10)), ("sts", batch(2, labels=[0.5, 4.0, 2.0, 1.0], seed=1)),
             ("sst", batch(1, labels=[4, 3, 2, 0], seed=20)), ("sts", batch(2, labels=[3.0, 0.5, 1.5, 5.0], seed=32))]
    return model, engine, joint, group[:2 * grad_accum]


def train_joint_step(engine, joint, group):
    """What the loop does with one optimizer step's batches; returns the encoder gradient the engine
    applies (before its optimizer step) and each head's gradient, both undoing the engine's 1/passes."""
    for task, b, weight in joint.passes(group):
        with engine.autocast():
            loss = engine(task, b, weight)
        engine.backward(loss)
    model = engine.module
    shared = torch.cat([p.grad.flatten() for _, p in model.shared_parameters()]) * len(group)
    heads = {t: [p.grad * len(group) for _, p in model.head_parameters(t)] for t, _ in group}
    return shared, heads


def reference_gradients(model, engine, group, rng_state):
    """Per-task gradients (summed over micro-batches) of the shared parameters [T, P] and of each head,
    by separate forward/backward passes that replay the dropout masks from `rng_state`."""
    torch.set_rng_state(rng_state)
    shared = [p for _, p in model.shared_parameters()]
    G, heads = {}, {}
    for task, b in group:
        head = [p for _, p in model.head_parameters(task)]
        with engine.autocast():
            loss = model(task, b)
        grads = torch.autograd.grad(loss, shared + head, allow_unused=True)
        g = flat(grads[:len(shared)], shared).double()
        G[task] = G[task] + g if task in G else g
        h = [x for x in grads[len(shared):]]
        heads[task] = [a + x for a, x in zip(heads[task], h)] if task in heads else h
    return torch.stack([G["sst"], G["sts"]]), heads


def cosine(a, b):
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


@pytest.mark.parametrize("strategy", ["sum", "pcgrad", "gradvac", "cagrad"])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_applied_update_is_the_strategy_of_the_same_gradients(strategy, grad_accum):
    model, engine, joint, group = setup(strategy, grad_accum)
    targets = torch.tensor([[0.0, 0.3], [0.2, 0.0]], dtype=torch.float64)
    if strategy == "gradvac":  # targets above the observed cosine exercise GradVac beyond PCGrad
        joint.strategy.targets = targets.clone()
    torch.manual_seed(123)
    start = torch.get_rng_state()
    applied, applied_heads = train_joint_step(engine, joint, group)
    after = torch.get_rng_state()

    G, heads = reference_gradients(model, engine, group, start)            # [2, P]
    assert torch.equal(torch.get_rng_state(), after)  # the step consumed the RNG of one pass per batch
    assert G[0] @ G[1] < 0  # the tasks conflict: the strategies have something to do
    expected = reference_update(strategy, G, targets)
    assert (applied.double() - expected).norm() <= 1e-5 * expected.norm()
    if strategy in ("pcgrad", "gradvac", "cagrad"):
        assert (G.sum(0) - expected).norm() > 1e-2 * expected.norm()  # really not the plain sum
    for task, ref in heads.items():  # heads: their own gradient, never scaled by the strategy
        for got, want in zip(applied_heads[task], ref):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_sum_skips_the_side_passes_and_applies_the_same_update():
    class MeasuredSum(SumStrategy):  # the same weights, through the side passes every strategy used to take
        uses_gram = True

    updates = []
    for strategy in (SumStrategy(), MeasuredSum()):
        model, engine, joint, group = setup("sum", grad_accum=2)
        joint.strategy = strategy
        calls = []
        model.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(123)
        applied, heads = train_joint_step(engine, joint, group)
        updates.append((applied, heads, torch.get_rng_state(), len(calls)))
    (fast, fast_heads, fast_rng, fast_calls), (slow, slow_heads, slow_rng, slow_calls) = updates
    assert (fast_calls, slow_calls) == (len(group), 2 * len(group))
    assert torch.equal(fast, slow) and torch.equal(fast_rng, slow_rng)
    for task in fast_heads:
        assert all(torch.equal(a, b) for a, b in zip(fast_heads[task], slow_heads[task]))


def test_accumulation_combines_the_whole_step_once():
    # Summing the strategy over micro-batches is a different update; the joint step must not do that.
    model, engine, joint, group = setup("pcgrad", grad_accum=2)
    torch.manual_seed(123)
    start = torch.get_rng_state()
    applied, _ = train_joint_step(engine, joint, group)
    torch.set_rng_state(start)
    per_micro = [reference_gradients(model, engine, group[i:i + 2], torch.get_rng_state())[0]
                 for i in (0, 2)]
    whole = per_micro[0] + per_micro[1]
    assert (applied.double() - explicit_pcgrad(*whole)).norm() <= 1e-5 * applied.norm()
    summed = explicit_pcgrad(*per_micro[0]) + explicit_pcgrad(*per_micro[1])
    assert (applied.double() - summed).norm() > 1e-3 * applied.norm()


def test_bf16_side_pass_runs_under_the_engine_autocast():
    model, engine, joint, group = setup("pcgrad", precision="bf16")
    torch.manual_seed(3)
    start = torch.get_rng_state()
    applied, _ = train_joint_step(engine, joint, group)
    G, _ = reference_gradients(model, engine, group, start)
    expected = explicit_pcgrad(*G)
    # bf16 matmuls round w * g differently from g, so agreement is to bf16 precision, not float32's.
    assert cosine(applied, expected) > 0.9999
    assert (applied.double() - expected).norm() <= 1e-2 * expected.norm()


def test_joint_run_trains_every_task_each_step(tiny_cfg, tmp_path):
    from mtkit.run import run
    cfg = tiny_cfg(**{"train.strategy": "pcgrad", "train.trace": True, "train.save_checkpoints": False,
                      "train.grad_accum": 2})
    results = run(cfg, tmp_path / "joint")
    rows = [json.loads(x) for x in (tmp_path / "joint" / "trace" / "rank0.jsonl").read_text().splitlines()]
    by_step = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r["task"])
    # Each optimizer step takes grad_accum batches of every task, combined once.
    assert all(sorted(v) == ["quora", "quora", "sst", "sst", "sts", "sts"] for v in by_step.values())
    assert results["steps"] == len(by_step) == 1  # one pass over the largest task: 48 rows / 16 / 2


def test_strategy_settings_reach_the_strategy(tiny_cfg):
    from mtkit.config import ConfigError
    from mtkit.run import _joint_step
    cfg = tiny_cfg(**{"train.strategy": "cagrad", "train.cagrad.c": "0.2", "train.cagrad.rescale": "1+c"})
    model = MultiTaskModel(tiny_encoder(), tasks())
    engine = TorchEngine(model, cfg, 10, Dist())
    strategy = _joint_step(cfg, engine).strategy
    assert (strategy.c, strategy.rescale) == (0.2, "1+c")
    K = torch.tensor([[1.0, -0.5], [-0.5, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(strategy.weights(K), make_strategy("cagrad", c=0.2, rescale="1+c").weights(K))
    cfg = tiny_cfg(**{"train.strategy": "gradvac", "train.gradvac.beta": "0.5"})
    assert _joint_step(cfg, engine).strategy.beta == 0.5
    with pytest.raises(ConfigError, match="unknown key 'train.cagrad.alpha'; valid keys: c, rescale"):
        tiny_cfg(**{"train.cagrad.alpha": "0.4"})
    with pytest.raises(ConfigError, match=r"train.cagrad.rescale = '2'; choose one of \['1\+c', '1\+c\^2', 'none'\]"):
        tiny_cfg(**{"train.cagrad.rescale": "2"})
    with pytest.raises(ConfigError, match=r"override --train.gradvac.beta: train.gradvac.beta = 0.0; use a number in \(0, 1\]"):
        tiny_cfg(**{"train.gradvac.beta": "0"})
    with pytest.raises(ConfigError, match="train.cagrad.c expects float"):
        tiny_cfg(**{"train.cagrad.c": "big"})


@pytest.mark.slow
def test_two_rank_zero2_joint_step_is_exact(tmp_path):
    from distributed_util import deepspeed
    out = tmp_path / "joint.json"
    deepspeed("tests/ds_joint.py", str(out))
    results = json.loads(out.read_text())
    for strategy, r in results.items():
        assert r["conflict"], (strategy, r)
        assert r["rel_error"] < 1e-5, (strategy, r)
        assert r["ranks_agree"], (strategy, r)


def test_vector_cagrad_reference_is_scale_free():
    # The CAGrad reference above runs in the row-space coordinates of G; check that they change nothing.
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(2, 50, generator=gen, dtype=torch.float64)
    G[1] -= 1.2 * G[0]
    _, R = torch.linalg.qr(G.T)
    x_full, _ = vector_cagrad(G, 0.5)
    x_small, _ = vector_cagrad(R.T, 0.5)
    np.testing.assert_allclose(x_full, x_small, atol=1e-6)
