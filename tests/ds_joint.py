"""Run under `deepspeed --num_gpus 2`: a joint step under ZeRO-2, in train mode with dropout 0.1 and two
micro-batches per task, applies exactly the strategy's combination of the global per-task gradients.

Each rank trains on its own shard. The reference replays the step's RNG state with separate
forward/backward passes on the raw module, averages the per-task gradients over the ranks, and applies
the published formula (tests/test_joint.py); the applied gradient is DeepSpeed's reduced gradient,
read before the optimizer step."""
import json
import sys

import torch
import torch.distributed as tdist

from mtkit.config import Config, DeepSpeedConfig
from mtkit.distributed import init_distributed
from mtkit.engine.deepspeed_engine import DeepSpeedEngine
from mtkit.model import MultiTaskModel
from mtkit.run import _joint_step

sys.path.insert(0, "tests")
from test_joint import DROPOUT, reference_gradients, reference_update  # noqa: E402
from test_model import batch, tasks, tiny_encoder  # noqa: E402


def run(strategy: str, dist) -> dict:
    ts = [t for t in tasks() if t.name in ("sst", "sts")]
    for t in ts:
        t.dropout = DROPOUT
    cfg = Config(tasks=ts, deepspeed=DeepSpeedConfig(zero_stage=2))
    cfg.train.strategy, cfg.train.grad_accum, cfg.train.batch_size = strategy, 2, 4
    cfg.optim.max_grad_norm = 0.0
    model = MultiTaskModel(tiny_encoder(seed=1), ts).train()
    engine = DeepSpeedEngine(model, cfg, 10, dist)
    joint = _joint_step(cfg, engine)
    targets = torch.tensor([[0.0, 0.3], [0.2, 0.0]], dtype=torch.float64)
    if strategy == "gradvac":
        joint.strategy.targets = targets.clone()
    r, off = dist.rank, 30 * dist.rank  # shards whose global gradients conflict (cos -0.09)
    group = [("sst", batch(1, labels=[0, 1, 2, 3], seed=10 + off)),
             ("sts", batch(2, labels=[0.5, 4.0, 2.0, 1.0], seed=1 + off)),
             ("sst", batch(1, labels=[4, 3, 2, 0], seed=20 + off)),
             ("sts", batch(2, labels=[3.0, 0.5, 1.5, 5.0], seed=32 + off))]
    torch.manual_seed(123 + r)  # dropout streams differ per rank, as in training
    start = torch.get_rng_state()
    for i, (task, b, weight) in enumerate(joint.passes(group)):  # as the loop: one pass at a time
        loss = engine(task, b, weight)
        engine.backward(loss)
        if i == len(group) - 1:  # before the optimizer step: the reduced gradient, and the weights it saw
            applied = engine.shared_grad().double() * len(group)  # collective: every rank reads it
            G, _ = reference_gradients(engine.module, engine, group, start)  # [2, P], this rank's shard
        engine.step()
    tdist.all_reduce(G)
    G /= dist.world_size
    expected = reference_update(strategy, G, targets)
    everyone = [torch.zeros_like(applied) for _ in range(dist.world_size)]
    tdist.all_gather(everyone, applied)
    return {"rel_error": float((applied - expected).norm() / expected.norm()),
            "conflict": bool(G[0] @ G[1] < 0),
            "ranks_agree": all(torch.equal(everyone[0], a) for a in everyone)}


def main(path: str) -> None:
    dist = init_distributed("cpu")
    results = {s: run(s, dist) for s in ("pcgrad", "gradvac", "cagrad")}
    if dist.is_main:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
