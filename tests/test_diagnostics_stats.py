"""Gram-based statistics equal the direct vector computations."""

import json
import math

import pytest
import torch

from diagnostics.gram import global_group_grams, group_grams
from conftest import conflicting_gradients
from diagnostics.groups import flat_group_ids, group_index, layer_groups
from diagnostics.stats import (
    as_orders,
    conflict_rate,
    conflicts,
    cosines,
    norm_ratios,
    norms,
    pcgrad_coefficients,
    pcgrad_cos_sum,
    pcgrad_removed,
    random_orders,
    summarize,
)


def random_gradients(T: int, P: int, seed: int) -> torch.Tensor:
    return conflicting_gradients(T, P, seed)


def explicit_pcgrad(G: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Textbook PCGrad on the vectors: [T, P] -> projected [T, P]."""
    projected = []
    for i in range(G.shape[0]):
        g = G[i].clone()
        for j in orders[i].tolist():
            if j != i and torch.dot(g, G[j]) < 0:
                g = g - torch.dot(g, G[j]) / torch.dot(G[j], G[j]) * G[j]
        projected.append(g)
    return torch.stack(projected)


def direct_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def test_layer_groups_bert_and_generic_names():
    names = [
        "embeddings.word_embeddings.weight",
        "bert.embeddings.LayerNorm.bias",
        "encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.11.output.dense.bias",
        "encoder.layer.0.output.LayerNorm.weight",
        "pooler.dense.weight",
        "transformer.h.3.attn.c_attn.weight",
        "lm_head.weight",
    ]
    assert layer_groups(names) == [
        "embeddings",
        "embeddings",
        "layer.0",
        "layer.11",
        "layer.0",
        "pooler",
        "transformer.h.3",
        "lm_head",
    ]
    group_names, ids = group_index(names)
    assert group_names == ["embeddings", "layer.0", "layer.11", "pooler", "transformer.h.3", "lm_head"]
    assert ids == [0, 0, 1, 2, 1, 3, 4, 5]


def test_flat_group_ids_expand_per_element():
    group_names, ids = flat_group_ids(["encoder.layer.1.w", "embeddings.w", "encoder.layer.1.b"], [2, 3, 1])
    assert group_names == ["layer.1", "embeddings"]
    assert ids.tolist() == [0, 0, 1, 1, 1, 0]


def test_group_grams_match_direct_and_sum_to_full_gram():
    G = random_gradients(4, 40, seed=0).float()
    # Non-contiguous runs: group 0 appears twice.
    ids = torch.tensor([0] * 10 + [1] * 7 + [2] * 8 + [0] * 5 + [1] * 10)
    K = group_grams(G, ids, 3)
    assert K.shape == (3, 4, 4) and K.dtype == torch.float64
    G64 = G.double()
    for g in range(3):
        block = G64[:, ids == g]
        torch.testing.assert_close(K[g], block @ block.T)
    torch.testing.assert_close(K.sum(0), G64 @ G64.T)


def test_global_group_grams_without_process_group_is_local():
    G = random_gradients(3, 9, seed=1)
    ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    torch.testing.assert_close(global_group_grams(G, ids, 3), group_grams(G, ids, 3))


def test_norms_cosines_ratios_match_vectors():
    G = random_gradients(4, 30, seed=2)
    K = G @ G.T
    n, cos, ratio = norms(K), cosines(K), norm_ratios(K)
    for i in range(4):
        assert n[i].item() == pytest.approx(G[i].norm().item(), rel=1e-12)
        for j in range(4):
            assert cos[i, j].item() == pytest.approx(direct_cos(G[i], G[j]), abs=1e-12)
            assert ratio[i, j].item() == pytest.approx((G[i].norm() / G[j].norm()).item(), rel=1e-12)
    assert torch.equal(conflicts(K), cos < 0)
    assert conflicts(K).any(), "test data should contain conflicts"


def test_conflict_flags_and_rate_by_hand():
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    K = G @ G.T
    # Pairs: (0,1) cos < 0; (0,2) cos = 0 (orthogonal is not a conflict); (1,2) cos > 0.
    assert conflicts(K).tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    assert conflict_rate(K) == pytest.approx(1 / 3)
    assert conflict_rate(K[:1, :1]) == 0.0


def test_pcgrad_stats_equal_explicit_vector_pcgrad():
    G = random_gradients(4, 25, seed=3)
    K = G @ G.T
    orders = random_orders(4, torch.Generator().manual_seed(7))
    projected = explicit_pcgrad(G, orders)
    torch.testing.assert_close(pcgrad_coefficients(K, orders) @ G, projected)

    removed = pcgrad_removed(K, orders)
    expected_removed = (G - projected).norm(dim=1) / G.norm(dim=1)
    torch.testing.assert_close(removed, expected_removed)
    assert (removed > 0.01).any() and (removed < 1).all()

    expected_cos = direct_cos(G.sum(0), projected.sum(0))
    assert pcgrad_cos_sum(K, orders) == pytest.approx(expected_cos, abs=1e-12)
    assert expected_cos < 1 - 1e-6


def test_pcgrad_fixed_shared_order():
    G = random_gradients(3, 10, seed=4)
    K = G @ G.T
    orders = as_orders([2, 0, 1], 3)
    assert orders.tolist() == [[2, 0, 1]] * 3
    torch.testing.assert_close(pcgrad_coefficients(K, orders) @ G, explicit_pcgrad(G, orders))
    with pytest.raises(ValueError):
        as_orders([0, 0, 1], 3)


def test_summarize_record_matches_direct_values():
    G = random_gradients(3, 30, seed=5)
    ids = torch.tensor([0] * 12 + [1] * 18)
    K_groups = group_grams(G, ids, 2)
    tasks, groups = ["sst", "qqp", "sts"], ["layer.0", "layer.1"]
    record = summarize(K_groups, groups, tasks, step=40, rng=torch.Generator().manual_seed(11))
    json.dumps(record, allow_nan=False)

    assert record["step"] == 40 and record["tasks"] == tasks and record["groups"] == groups
    assert list(record["cos"]) == ["sst__qqp", "sst__sts", "qqp__sts"]
    for key, (i, j) in {"sst__qqp": (0, 1), "sst__sts": (0, 2), "qqp__sts": (1, 2)}.items():
        assert record["cos"][key] == pytest.approx(direct_cos(G[i], G[j]), abs=1e-12)
        assert record["conflict"][key] == (direct_cos(G[i], G[j]) < 0)
        assert record["norm_ratio"][key] == pytest.approx((G[i].norm() / G[j].norm()).item())
        for g, cols in (("layer.0", slice(0, 12)), ("layer.1", slice(12, 30))):
            expected = direct_cos(G[i, cols], G[j, cols])
            assert record["layer_cos"][key][g] == pytest.approx(expected, abs=1e-12)
    assert record["norm"]["qqp"] == pytest.approx(G[1].norm().item())
    assert record["conflict_rate"] == pytest.approx(sum(record["conflict"].values()) / 3)

    orders = random_orders(3, torch.Generator().manual_seed(11))
    projected = explicit_pcgrad(G, orders)
    assert record["pcgrad_cos_sum"] == pytest.approx(direct_cos(G.sum(0), projected.sum(0)), abs=1e-12)
    assert record["pcgrad_removed"]["sst"] == pytest.approx(
        ((G[0] - projected[0]).norm() / G[0].norm()).item(), abs=1e-12
    )


def test_zero_gradients_give_no_nan():
    G = random_gradients(3, 12, seed=6)
    G[1] = 0.0  # a task with no gradient at all
    G[0, :6] = 0.0  # a task with no gradient in group 0
    ids = torch.tensor([0] * 6 + [1] * 6)
    record = summarize(group_grams(G, ids, 2), ["a", "b"], ["x", "y", "z"], step=0, order=[0, 1, 2])
    json.dumps(record, allow_nan=False)
    assert record["cos"]["x__y"] == 0.0 and record["cos"]["y__z"] == 0.0
    assert record["layer_cos"]["x__z"]["a"] == 0.0
    assert record["norm_ratio"]["x__y"] == 0.0
    assert record["norm_ratio"]["y__z"] == 0.0
    assert record["pcgrad_removed"]["y"] == 0.0
    assert not math.isnan(record["pcgrad_cos_sum"])

    all_zero = summarize(torch.zeros(1, 2, 2, dtype=torch.float64), ["g"], ["p", "q"], step=1)
    json.dumps(all_zero, allow_nan=False)
    assert all_zero["pcgrad_cos_sum"] == 0.0 and all_zero["conflict_rate"] == 0.0
