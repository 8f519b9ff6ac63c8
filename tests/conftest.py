"""Shared fixtures: toy task files in the CS224N formats and a tiny random BERT config over them."""
from __future__ import annotations

import os
import random
from pathlib import Path
from unittest import mock

import pytest
import torch

from mtkit import config as config_mod

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
REAL_DATA = Path(os.environ.get("MTKIT_DATA", REPO.parent / "shared" / "data"))

WORDS = ["good", "bad", "great", "awful", "film", "movie", "plot", "actor", "fine", "dull", "the", "a",
         "was", "is", "very", "not", "funny", "long", "short", "story"]


def pytest_sessionstart(session):
    # DeepSpeed workspaces leaked into /dev/shm by launches that died (here or in earlier runs) are RAM; on
    # a machine that has collected many, the 2-rank tests thrash. Only ones no live process maps go.
    from mtkit.distributed import remove_stale_shm_workspaces
    removed = remove_stale_shm_workspaces()
    if removed:
        print(f"removed {len(removed)} stale DeepSpeed shared-memory workspace(s) from /dev/shm")


def _sentence(rng: random.Random, n: int | None = None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n or rng.randint(3, 12)))


def write_toy_data(root: Path, n: int = 48, seed: int = 0) -> Path:
    """Files shaped like the CS224N splits (tab-separated, unnamed index column, same headers)."""
    rng = random.Random(seed)
    (root / "sst").mkdir(parents=True, exist_ok=True)
    (root / "quora").mkdir(exist_ok=True)
    (root / "sts").mkdir(exist_ok=True)
    for split in ("train", "dev"):
        with open(root / "sst" / f"ids-sst-{split}.csv", "w") as f:
            f.write("\tid\tsentence\tsentiment\n")
            for i in range(n):
                f.write(f"{i}\tsst{split}{i}\t {_sentence(rng)}\t{rng.randint(0, 4)}\n")
        name = "quora-train-partial.csv" if split == "train" else "quora-dev.csv"
        with open(root / "quora" / name, "w") as f:
            f.write("\tid\tsentence1\tsentence2\tis_duplicate\n")
            for i in range(n):
                s = _sentence(rng)
                dup = rng.random() < 0.4
                f.write(f"{i}\tq{split}{i}\t{s}\t{s if dup else _sentence(rng)}\t{float(dup)}\n")
        with open(root / "sts" / f"sts-{split}.csv", "w") as f:
            f.write("\tid\tsentence1\tsentence2\tsimilarity\n")
            for i in range(n):
                f.write(f"{i}\ts{split}{i}\t{_sentence(rng)}\t{_sentence(rng)}\t{rng.uniform(0, 5):.2f}\n")
    (root / "nli").mkdir(exist_ok=True)
    for name in ("nli_for_simcse-dev.csv", "snli-dev-triples.csv"):
        with open(root / "nli" / name, "w") as f:
            f.write("sent0,sent1,hard_neg\r\n")
            for i in range(n):
                s = _sentence(rng)
                f.write(f"{s},{s} very,{_sentence(rng)}\r\n")
    return root


@pytest.fixture
def toy_root(tmp_path) -> Path:
    return write_toy_data(tmp_path / "data")


def tiny_config(root: Path, cache: Path, **overrides) -> config_mod.Config:
    base = {"data.root": str(root), "data.cache_dir": str(cache), "train.num_threads": 1,
            "train.log_every": 2, "train.eval_every": 6, "train.epochs": 1}
    for t in ("sst", "quora", "sts"):
        base[f"tasks.{t}.max_train"] = None
        base[f"tasks.{t}.max_eval"] = None
    base.update(overrides)
    return config_mod.load(CONFIGS / "debug_tiny.yaml", base)


@pytest.fixture
def tiny_cfg(toy_root, tmp_path):
    return lambda **kw: tiny_config(toy_root, tmp_path / "cache", **kw)


class GradientRecorder:
    """A read-only observer inside a real run (a `mtkit.loop.Hook`): after each backward, the task, the
    encoder's gradient read from `.grad` (not through the engine) and that task's head gradient, in float64."""

    def __init__(self):
        self.steps: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def on_backward(self, step, task, engine):
        encoder = _flat_grad(engine.module.shared_parameters())
        self.steps.append((task, encoder, _flat_grad(engine.module.head_parameters(task))))

    def on_step(self, step, engine):
        pass

    def close(self):
        pass


def _flat_grad(named_params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten()
                      for _, p in named_params])


def run_observed(cfg, out: Path, hook) -> dict:
    """`mtkit.run.run` with `hook` called by the loop next to the configured diagnostics hooks."""
    import mtkit.run  # heavy (model, data, engines): only for the tests that train
    configured = mtkit.run._diagnostics_hooks
    with mock.patch.object(mtkit.run, "_diagnostics_hooks", lambda *args: configured(*args) + [hook]):
        return mtkit.run.run(cfg, out)


def conflicting_gradients(T: int, P: int, seed: int):
    """[T, P] float64 gradients sharing a component with alternating sign, so task pairs conflict."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(T, P, generator=gen, dtype=torch.float64)
    shared = torch.randn(P, generator=gen, dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0] * T, dtype=torch.float64)[:T, None]
    return G + 2.0 * signs * shared


def require_real_data():
    if not (REAL_DATA / "sst" / "ids-sst-train.csv").exists():
        pytest.skip(f"CS224N data not found at {REAL_DATA}: set MTKIT_DATA to the data folder")
    return REAL_DATA
