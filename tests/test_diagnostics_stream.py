"""The stream tracker's in-place running averages equal the documented EMA of the recorded per-step
gradients, and per-parameter Grams equal the Gram of the concatenated vectors."""

import pytest
import torch

from diagnostics import gram
from diagnostics.gram import group_grams, param_grams
from diagnostics.hooks import embedding_modules, make_hooks
from diagnostics.probe import StreamTracker
from diagnostics.stats import summarize
from mtkit.data.dataset import batch_for, to_device
from mtkit.distributed import init_distributed
from mtkit.engine import make_engine
from mtkit.run import build, make_sampler

# BERT-style names: groups embeddings, layer.0, pooler.
PARAMS = [
    ("embeddings.word_embeddings.weight", (10, 3)),
    ("embeddings.LayerNorm.weight", (3,)),
    ("encoder.layer.0.dense.weight", (4, 3)),
    ("encoder.layer.0.dense.bias", (4,)),
    ("pooler.dense.weight", (2, 2)),
]
WORD = PARAMS[0][0]
TASKS = ["a", "b", "c"]


def named_params():
    return [(name, torch.zeros(shape)) for name, shape in PARAMS]


def step_gradients(n_steps: int, seed: int) -> list[tuple[str, list, dict]]:
    """A task schedule, each step's per-parameter gradients and the rows of the word embedding they may
    reach: a few "token ids", some repeated; the gradient is zero on every other row. Task c never
    reaches the pooler (None)."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(n_steps):
        task = TASKS[int(torch.randint(len(TASKS), (), generator=gen))]
        grads = [torch.randn(shape, generator=gen) for _, shape in PARAMS]
        ids = torch.randint(10, (4,), generator=gen)
        reached = torch.zeros(10, 1)
        reached[ids] = 1.0
        grads[0] *= reached
        if task == "c":
            grads[-1] = None
        steps.append((task, grads, {WORD: ids.unique()}))
    return steps


def flat(grads: list) -> torch.Tensor:
    return torch.cat([torch.zeros(shape).reshape(-1) if g is None else g.reshape(-1)
                      for g, (_, shape) in zip(grads, PARAMS)])


def direct_ema(steps, beta: float) -> dict[str, torch.Tensor]:
    """m_t <- beta m_t + (1 - beta) g, first m_t = g; in float64 on the flattened vectors."""
    m: dict[str, torch.Tensor] = {}
    for task, grads, _ in steps:
        g = flat(grads).double()
        m[task] = g if task not in m else beta * m[task] + (1 - beta) * g
    return m


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_stream_average_equals_direct_ema_of_recorded_gradients(beta):
    # ~130 updates per task: at beta 0.5 an unfolded scale would reach 2^-130 and the sums overflow float32.
    steps = step_gradients(400, seed=1)
    tracker = StreamTracker(TASKS, named_params(), beta=beta, seed=4)
    for task, grads, rows in steps:
        tracker.update(task, grads, rows)
    expected = direct_ema(steps, beta)
    averages = tracker.averages()
    for t in TASKS:
        torch.testing.assert_close(averages[t].double(), expected[t], rtol=1e-5, atol=1e-6)

    record = tracker.measure(step=400)
    ids = torch.tensor([0] * 33 + [1] * 16 + [2] * 4)  # embeddings 30 + 3, layer.0 12 + 4, pooler 4
    reference = summarize(group_grams(torch.stack([expected[t] for t in TASKS]), ids, 3),
                          ["embeddings", "layer.0", "pooler"], TASKS, 400, rng=torch.Generator().manual_seed(4))
    assert record["groups"] == reference["groups"]
    for pair, cos in reference["cos"].items():
        assert record["cos"][pair] == pytest.approx(cos, abs=1e-5)
        for group, c in reference["layer_cos"][pair].items():
            assert record["layer_cos"][pair][group] == pytest.approx(c, abs=1e-5)
    for t in TASKS:
        assert record["norm"][t] == pytest.approx(reference["norm"][t], rel=1e-5)
        assert record["pcgrad_removed"][t] == pytest.approx(reference["pcgrad_removed"][t], abs=1e-5)


def test_row_and_flat_updates_equal_whole_updates_bit_for_bit():
    steps = step_gradients(60, seed=2)
    whole = StreamTracker(TASKS, named_params(), beta=0.7)
    by_rows = StreamTracker(TASKS, named_params(), beta=0.7)
    flat_input = StreamTracker(TASKS, named_params(), beta=0.7)
    for task, grads, rows in steps:
        whole.update(task, grads)
        by_rows.update(task, grads, rows)
        flat_input.update(task, flat(grads))
    for other in (by_rows, flat_input):
        assert other.scales == whole.scales
        for t in TASKS:
            assert all(torch.equal(u, v) for u, v in zip(other.sums[t], whole.sums[t]))


def test_stream_tracker_rejects_bad_input():
    tracker = StreamTracker(TASKS, named_params())
    grads = step_gradients(1, seed=0)[0][1]
    with pytest.raises(ValueError, match="rows given for unknown parameters \\['nope'\\]"):
        tracker.update("a", grads, {"nope": torch.tensor([0])})
    with pytest.raises(ValueError, match="gradient of encoder.layer.0.dense.bias has shape \\(5,\\)"):
        tracker.update("a", grads[:3] + [torch.zeros(5)] + grads[4:])
    with pytest.raises(ValueError, match="4 gradients for 5 parameters"):
        tracker.update("a", grads[:4])
    with pytest.raises(ValueError, match="expected \\(53,\\)"):
        tracker.update("a", torch.zeros(52))


def test_param_grams_equal_group_grams_of_concatenation(monkeypatch):
    monkeypatch.setattr(gram, "CHUNK", 5)  # several chunks per parameter, the last one short
    gen = torch.Generator().manual_seed(0)
    shapes, groups = [(4, 3), (7,), (2, 2), (3,)], [0, 1, 0, 2]
    grads = [[torch.randn(shape, generator=gen) for _ in range(3)] for shape in shapes]
    grads[1][2] = None  # task 2 does not reach parameter 1
    grads[3] = [None, None, None]
    G = torch.stack([
        torch.cat([torch.zeros(s).reshape(-1) if row[t] is None else row[t].reshape(-1)
                   for row, s in zip(grads, shapes)])
        for t in range(3)
    ]).double()  # [T, P]
    ids = torch.repeat_interleave(torch.tensor(groups), torch.tensor([12, 7, 4, 3]))
    torch.testing.assert_close(param_grams(grads, groups, 3), group_grams(G, ids, 3))


def test_stream_hook_on_a_real_model_tracks_the_engine_gradients(tiny_cfg, tmp_path):
    # The hook reads the engine's per-parameter gradients, the embedding matrices on the rows of the batch's
    # token ids only; the reference records the whole flattened gradient of each step (the engine's other
    # path) and averages it directly.
    cfg = tiny_cfg(**{"diagnostics.mode": "stream", "diagnostics.stream_beta": 0.5, "train.engine": "torch"})
    dist = init_distributed("cpu")
    _, tasks, model = build(cfg, dist)
    engine = make_engine("torch", model, cfg, 10, dist)
    [hook] = make_hooks(cfg, model, tasks, dist, None, tmp_path)
    tracker = hook.tracker
    assert sorted(hook.ids) == ["bert.embeddings.position_embeddings.weight",
                                "bert.embeddings.token_type_embeddings.weight",
                                "bert.embeddings.word_embeddings.weight"]
    recorded = []
    for step, (task, indices) in zip(range(8), make_sampler(cfg, tasks, dist)):
        batch = to_device(batch_for(tasks[task], "train", indices, model.pad_id), dist.device)
        engine.backward(engine(task, batch))
        hook.on_backward(step, task, engine)
        recorded.append((task, engine.shared_grad().double()))
        engine.step()
    expected: dict[str, torch.Tensor] = {}
    for task, g in recorded:
        expected[task] = g if task not in expected else 0.5 * expected[task] + 0.5 * g
    averages = tracker.averages()
    assert set(averages) == set(expected) == set(tasks)
    for t, m in expected.items():
        torch.testing.assert_close(averages[t].double(), m, rtol=1e-5, atol=1e-7)
    hook.close()
    engine(task, batch)
    assert not any(hook.ids.values())  # the forward hooks went with close


def test_tied_embeddings_are_read_whole():
    model = torch.nn.Module()
    model.embeddings = torch.nn.Embedding(5, 2)
    model.tied = torch.nn.Embedding(5, 2)
    model.decoder = torch.nn.Linear(2, 5, bias=False)
    model.decoder.weight = model.tied.weight
    assert list(embedding_modules(model, list(model.named_parameters()))) == ["embeddings.weight"]
