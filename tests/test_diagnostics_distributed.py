"""Distributed-exact Grams and the gradient probe: 2 gloo ranks equal one process on the full data."""

from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distributed_util import spawn_ranks
from diagnostics.gram import global_group_grams, group_grams
from diagnostics.groups import flat_group_ids
from diagnostics.probe import GradientProbe, StreamTracker
from diagnostics.stats import cosines, summarize

WORLD = 2
TASKS = ["sst", "qqp"]
# (T, P, group ids): P = 11 is not divisible by W = 2 and the 6-column shards
# split group 1 across ranks; with P = 1 rank 1 holds padding only.
GRAM_CASES = {
    "odd": (3, 11, [0] * 4 + [1] * 5 + [2] * 2),
    "even": (2, 12, [0] * 3 + [1] * 6 + [0] * 3),
    "tiny": (2, 1, [0]),
}
PROBE_BATCH = 8


class TinyEncoder(nn.Module):
    """Two-layer MLP with BERT-style parameter names and one head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Linear(4, 6)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
        self.dropout = nn.Dropout(0.5)
        self.heads = nn.ModuleDict({"sst": nn.Linear(6, 3), "qqp": nn.Linear(6, 1)})

    def loss(self, task: str, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        h = torch.tanh(self.embeddings(x))
        h = torch.tanh(self.encoder.layer[0](self.dropout(h)))
        if task == "sst":  # qqp skips layer 1, which must then count as a zero gradient
            h = torch.tanh(self.encoder.layer[1](h))
        out = self.heads[task](h)
        if task == "sst":
            return nn.functional.cross_entropy(out, y.long() % 3)
        return ((out.squeeze(-1) - y) ** 2).mean()


def make_model() -> TinyEncoder:
    torch.manual_seed(0)
    return TinyEncoder()


def shared_params(model: TinyEncoder) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if not n.startswith("heads.")]


def probe_batches(rank: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Full probe batches (rank None) or this rank's half."""
    gen = torch.Generator().manual_seed(123)
    batches = {}
    for task in TASKS:
        x = torch.randn(PROBE_BATCH, 4, generator=gen)
        y = torch.randn(PROBE_BATCH, generator=gen) * 3
        if rank is not None:
            rows = slice(rank * PROBE_BATCH // WORLD, (rank + 1) * PROBE_BATCH // WORLD)
            x, y = x[rows], y[rows]
        batches[task] = (x, y)
    return batches


def local_gradients(T: int, P: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(T, P, generator=gen)


def make_probe(model: TinyEncoder, rank: int | None) -> GradientProbe:
    return GradientProbe(
        TASKS, shared_params(model), model.loss, probe_batches(rank), every=5, module=model, seed=3
    )


def rank_body(rank: int) -> dict:
    results = {"grams": {}}
    for name, (T, P, ids) in GRAM_CASES.items():
        G = local_gradients(T, P, rank)
        ids_t = torch.tensor(ids)
        for method in ("auto", "reduce_scatter", "all_reduce"):
            results["grams"][name, method] = global_group_grams(G, ids_t, max(ids) + 1, method=method)
        # A backend without reduce_scatter: "auto" must fall back on every rank alike.
        with mock.patch.object(dist, "reduce_scatter", side_effect=RuntimeError("unsupported")):
            results["grams"][name, "fallback"] = global_group_grams(G, ids_t, max(ids) + 1)
        results["local_untouched", name] = torch.equal(G, local_gradients(T, P, rank))

    model = make_model()
    sentinel = torch.full_like(model.embeddings.weight, 7.0)
    model.embeddings.weight.grad = sentinel.clone()
    probe = make_probe(model, rank)
    results["record"] = probe.measure(step=10)
    results["grad_untouched"] = torch.equal(model.embeddings.weight.grad, sentinel) and all(
        p.grad is None for n, p in model.named_parameters() if n != "embeddings.weight"
    )
    return results


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    return spawn_ranks(rank_body, tmp_path_factory.mktemp("ranks"), WORLD)


@pytest.mark.parametrize("case", list(GRAM_CASES))
@pytest.mark.parametrize("method", ["auto", "reduce_scatter", "all_reduce", "fallback"])
@pytest.mark.slow
def test_global_grams_equal_single_process_gram_of_mean(rank_results, case, method):
    T, P, ids = GRAM_CASES[case]
    mean_G = torch.stack([local_gradients(T, P, r) for r in range(WORLD)]).mean(0)
    expected = group_grams(mean_G, torch.tensor(ids), max(ids) + 1)
    for results in rank_results:
        K = results["grams"][case, method]
        torch.testing.assert_close(K, expected, rtol=1e-5, atol=1e-6)
        for K_g, E_g in zip(K, expected):
            assert (cosines(K_g) - cosines(E_g)).abs().max() < 1e-5
        assert results["local_untouched", case]


@pytest.mark.slow
def test_distributed_probe_equals_full_batch_reference(rank_results):
    reference = make_probe(make_model(), rank=None).measure(step=10)
    assert reference["groups"] == ["embeddings", "layer.0", "layer.1"]
    # qqp never reaches layer.1: zero gradient there, hence cosine 0.
    assert reference["layer_cos"]["sst__qqp"]["layer.1"] == 0.0
    for results in rank_results:
        record = results["record"]
        assert results["grad_untouched"]
        assert record["tasks"] == reference["tasks"] and record["groups"] == reference["groups"]
        assert record["cos"]["sst__qqp"] == pytest.approx(reference["cos"]["sst__qqp"], abs=1e-5)
        for group, value in reference["layer_cos"]["sst__qqp"].items():
            assert record["layer_cos"]["sst__qqp"][group] == pytest.approx(value, abs=1e-5)
        for task in TASKS:
            assert record["norm"][task] == pytest.approx(reference["norm"][task], rel=1e-5)
            expected_removed = reference["pcgrad_removed"][task]
            assert record["pcgrad_removed"][task] == pytest.approx(expected_removed, abs=1e-5)
        assert record["pcgrad_cos_sum"] == pytest.approx(reference["pcgrad_cos_sum"], abs=1e-5)


def test_probe_gradients_equal_manual_backward():
    model = make_model()
    probe = make_probe(model, rank=None)
    G = probe.task_gradients()
    model.eval()
    batches = probe_batches(None)
    for row, task in zip(G, TASKS):
        model.zero_grad(set_to_none=True)
        model.loss(task, batches[task]).backward()
        expected = torch.cat([
            torch.zeros(p.numel()) if p.grad is None else p.grad.reshape(-1) for _, p in shared_params(model)
        ])
        torch.testing.assert_close(row, expected)


def test_probe_gram_per_parameter_equals_gram_of_flattened_gradients():
    # One process sums the Gram parameter by parameter; several ranks reduce the flattened [T, P].
    model = make_model()
    record = make_probe(model, rank=None).measure(step=10)
    G = make_probe(model, rank=None).task_gradients().double()  # [T, P]
    names = [n for n, _ in shared_params(model)]
    group_names, ids = flat_group_ids(names, [p.numel() for _, p in shared_params(model)])
    reference = summarize(group_grams(G, ids, len(group_names)), group_names, TASKS, 10,
                          rng=torch.Generator().manual_seed(3))
    assert record.keys() == reference.keys() and record["groups"] == reference["groups"]
    for key in ("norm", "cos", "pcgrad_removed"):
        assert record[key] == pytest.approx(reference[key], rel=1e-9, abs=1e-12), key
    for pair, layers in reference["layer_cos"].items():
        assert record["layer_cos"][pair] == pytest.approx(layers, rel=1e-9, abs=1e-12)


def test_probe_preserves_grad_rng_and_train_flags():
    model = make_model()
    model.train()
    model.encoder.layer[1].eval()  # a submodule deliberately left in eval
    model.encoder.layer[0].weight.grad = torch.ones_like(model.encoder.layer[0].weight)
    probe = make_probe(model, rank=None)

    torch.manual_seed(42)
    expected_next = torch.rand(5)
    torch.manual_seed(42)
    first = probe.measure(step=0)
    assert torch.equal(torch.rand(5), expected_next)

    assert model.training and model.dropout.training and not model.encoder.layer[1].training
    assert torch.equal(model.encoder.layer[0].weight.grad, torch.ones_like(model.encoder.layer[0].weight))
    assert model.embeddings.weight.grad is None
    # Dropout is off in eval mode, so a repeat measurement is identical (fresh probe: same PCGrad order).
    assert make_probe(model, rank=None).measure(step=0) == first


def test_probe_with_dropout_is_reproducible_and_rng_neutral():
    model = make_model()
    model.train()
    probes = [
        GradientProbe(
            TASKS, shared_params(model), model.loss, probe_batches(None), every=1, eval_mode=False, seed=9
        )
        for _ in range(2)
    ]
    torch.manual_seed(1)
    expected_next = torch.rand(3)
    torch.manual_seed(1)
    first = probes[0].task_gradients()
    assert torch.equal(torch.rand(3), expected_next)
    torch.testing.assert_close(probes[1].task_gradients(), first)


def test_probe_due():
    probe = make_probe(make_model(), rank=None)
    assert [s for s in range(12) if probe.due(s)] == [0, 5, 10]


def test_stream_tracker_running_average():
    params = [("embeddings.w", torch.zeros(2)), ("encoder.layer.0.w", torch.zeros(3))]
    tracker = StreamTracker(["a", "b"], params, beta=0.5)
    ga1, ga2, gb = (torch.randn(5, generator=torch.Generator().manual_seed(s)) for s in range(3))
    tracker.update("a", ga1)
    assert tracker.measure(step=1) is None
    tracker.update("a", ga2)
    tracker.update("b", gb)
    record = tracker.measure(step=3)
    average_a = 0.5 * ga1 + 0.5 * ga2
    expected = group_grams(torch.stack([average_a, gb]), torch.tensor([0, 0, 1, 1, 1]), 2)
    cos = float(expected.sum(0)[0, 1] / (average_a.norm() * gb.norm()))
    assert record["groups"] == ["embeddings", "layer.0"]
    assert record["cos"]["a__b"] == pytest.approx(cos, abs=1e-6)
    assert record["norm"]["a"] == pytest.approx(average_a.norm().item(), rel=1e-6)
    with pytest.raises(KeyError):
        tracker.update("c", gb)
