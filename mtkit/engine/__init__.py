"""Engines own the optimizer step: plain torch here, DeepSpeed in `mtkit.engine.deepspeed_engine` (the only
module that imports deepspeed). The training loop sees only the `Engine` interface."""
from mtkit.engine.base import Engine, lr_lambdas
from mtkit.engine.torch_engine import TorchEngine

__all__ = ["Engine", "TorchEngine", "lr_lambdas", "make_engine"]


def make_engine(name: str, model, cfg, total_steps: int, dist) -> Engine:
    if name == "deepspeed":
        from mtkit.engine.deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine(model, cfg, total_steps, dist)
    return TorchEngine(model, cfg, total_steps, dist)
