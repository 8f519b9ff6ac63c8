"""Gram-weight strategies equal explicit vector implementations of PCGrad, GradVac and CAGrad."""

import math

import numpy as np
import pytest
import torch

from conftest import conflicting_gradients
from mtkit.strategies import (
    STRATEGIES,
    CAGrad,
    GradVac,
    PCGrad,
    cagrad_objective,
    cagrad_simplex_weights,
    make_strategy,
    pcgrad_coefficients,
)


def orders_like_strategy(T: int, gen: torch.Generator) -> list[list[int]]:
    """Per call: one randperm per task from the strategy's generator, task i skipping itself."""
    return [[j for j in torch.randperm(T, generator=gen).tolist() if j != i] for i in range(T)]


def vector_pcgrad(G: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Σ of PCGrad-projected gradients, on the vectors.  [T, P] -> [P]."""
    total = torch.zeros(G.shape[1], dtype=G.dtype)
    for i, others in enumerate(orders):
        g = G[i].clone()
        for j in others:
            dot = torch.dot(g, G[j])
            if dot < 0:
                g = g - dot / torch.dot(G[j], G[j]) * G[j]
        total += g
    return total


def vector_gradvac(
    G: torch.Tensor, targets: torch.Tensor, orders: list[list[int]], beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One GradVac step on the vectors: (Σ of vaccinated gradients [P], new targets [T, T])."""
    targets = targets.clone()
    total = torch.zeros(G.shape[1], dtype=G.dtype)
    for i, others in enumerate(orders):
        g = G[i].clone()
        for j in others:
            phi = float(torch.dot(g, G[j]) / (g.norm() * G[j].norm()))
            target = float(targets[i, j])
            if phi < target:
                a = g.norm() * (target * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - target**2))
                g = g + a / (G[j].norm() * math.sqrt(1 - target**2)) * G[j]
                after = float(torch.dot(g, G[j]) / (g.norm() * G[j].norm()))
                assert after == pytest.approx(target, abs=1e-9)
            targets[i, j] = (1 - beta) * target + beta * phi
        total += g
    return total, targets


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {x >= 0, Σ x = 1}."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    k = np.nonzero(u - cumulative / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - cumulative[k] / (k + 1), 0.0)


def vector_cagrad(G: torch.Tensor, c: float) -> tuple[np.ndarray, np.ndarray]:
    """CAGrad on the vectors by projected gradient descent: (simplex weights x [T], direction d [P])."""
    Gn = G.numpy() / np.linalg.norm(G.numpy(), axis=1).max()  # scale-free problem
    T = Gn.shape[0]
    g0 = Gn.mean(0)
    radius = c * np.linalg.norm(g0)
    x = np.full(T, 1.0 / T)
    for _ in range(20000):
        gx = Gn.T @ x
        grad = Gn @ g0 + radius * Gn @ gx / np.linalg.norm(gx)
        x = project_to_simplex(x - 0.02 * grad)
    G0 = G.numpy().mean(0)
    gx = G.numpy().T @ x
    d = G0 + c * np.linalg.norm(G0) / np.linalg.norm(gx) * gx
    return x, d


def test_registry_and_factory():
    assert set(STRATEGIES) == {"sum", "pcgrad", "gradvac", "cagrad"}
    assert isinstance(make_strategy("cagrad", c=0.2), CAGrad) and make_strategy("cagrad", c=0.2).c == 0.2
    with pytest.raises(ValueError, match="cagrad, gradvac, pcgrad, sum"):
        make_strategy("mgda")


def test_sum_weights_are_ones():
    K = torch.eye(3) * 4
    w = make_strategy("sum").weights(K)
    assert w.dtype == torch.float64 and w.tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        make_strategy("sum").weights(torch.ones(2, 3))


def test_pcgrad_two_conflicting_gradients_in_the_plane():
    G = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    K = G @ G.T
    projected = pcgrad_coefficients(K, torch.tensor([[0, 1], [1, 0]])) @ G
    assert torch.dot(projected[0], G[1]).item() == pytest.approx(0.0, abs=1e-12)
    assert torch.dot(projected[1], G[0]).item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(projected, torch.tensor([[0.5, 0.5], [0.0, 1.0]], dtype=torch.float64))
    combined = PCGrad(seed=0).weights(K) @ G
    torch.testing.assert_close(combined, torch.tensor([0.5, 1.5], dtype=torch.float64))


def test_pcgrad_leaves_non_conflicting_gradients_unchanged():
    G = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    assert PCGrad(seed=0).weights(G @ G.T).tolist() == [1.0, 1.0, 1.0]


def test_pcgrad_projection_order_matters_with_three_tasks():
    G = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    K = G @ G.T
    first_1 = pcgrad_coefficients(K, torch.tensor([[0, 1, 2]] * 3))[0] @ G
    first_2 = pcgrad_coefficients(K, torch.tensor([[0, 2, 1]] * 3))[0] @ G
    torch.testing.assert_close(first_1, torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(first_2, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))


def test_pcgrad_weights_equal_vector_pcgrad_with_same_orders():
    strategy = PCGrad(seed=5)
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        G = conflicting_gradients(4, 30, seed=step)
        combined = strategy.weights(G @ G.T) @ G
        torch.testing.assert_close(combined, vector_pcgrad(G, orders_like_strategy(4, gen)))


def test_gradvac_weights_equal_vector_gradvac_over_steps():
    strategy = GradVac(beta=0.3, seed=2)
    gen = torch.Generator().manual_seed(2)
    targets = torch.zeros(4, 4, dtype=torch.float64)
    adjusted_above_zero = False
    for step in range(4):
        G = conflicting_gradients(4, 30, seed=10 + step)
        expected, targets = vector_gradvac(G, targets, orders_like_strategy(4, gen), beta=0.3)
        torch.testing.assert_close(strategy.weights(G @ G.T) @ G, expected)
        torch.testing.assert_close(strategy.targets, targets)
        adjusted_above_zero |= bool((targets > 0).any())
    assert adjusted_above_zero, "targets should become positive, exercising the non-PCGrad branch"


def test_gradvac_first_step_is_pcgrad():
    G = conflicting_gradients(3, 20, seed=4)
    K = G @ G.T
    torch.testing.assert_close(GradVac(seed=8).weights(K), PCGrad(seed=8).weights(K))


def test_gradvac_state_dict_resumes_exactly():
    grams = [(lambda G: G @ G.T)(conflicting_gradients(3, 20, seed=s)) for s in range(3)]
    original = GradVac(beta=0.5, seed=1)
    original.weights(grams[0])
    original.weights(grams[1])
    state = original.state_dict()
    expected = original.weights(grams[2])

    resumed = GradVac(seed=99)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.weights(grams[2]), expected)
    assert resumed.beta == 0.5


def test_cagrad_weights_equal_vector_cagrad():
    for seed, c in ((0, 0.5), (1, 0.2), (2, 0.9)):
        G = conflicting_gradients(4, 25, seed=seed)
        K = G @ G.T
        x_expected, d = vector_cagrad(G, c)
        np.testing.assert_allclose(cagrad_simplex_weights(K, c).numpy(), x_expected, atol=1e-4)
        combined = CAGrad(c=c).weights(K) @ G
        expected = torch.from_numpy(4 * d / (1 + c * c))  # the reference code's default rescaling
        assert float((combined - expected).norm() / expected.norm()) < 1e-4


def test_cagrad_solution_beats_random_simplex_points():
    G = conflicting_gradients(5, 40, seed=7)
    A = (G @ G.T).numpy()
    x = cagrad_simplex_weights(G @ G.T, 0.5).numpy()
    assert x.min() >= 0 and x.sum() == pytest.approx(1.0)
    best = cagrad_objective(x, A, 0.5)
    samples = np.random.default_rng(0).dirichlet(np.ones(5), size=2000)
    corners = np.eye(5)
    assert all(best <= cagrad_objective(s, A, 0.5) + 1e-9 for s in np.vstack([samples, corners]))


def test_cagrad_scaling_options():
    G = conflicting_gradients(3, 15, seed=3)
    K = G @ G.T
    assert CAGrad(c=0.0).weights(K).tolist() == pytest.approx([1.0, 1.0, 1.0])
    none = CAGrad(c=0.5, rescale="none").weights(K)
    torch.testing.assert_close(CAGrad(c=0.5).weights(K), none / 1.25)  # default: 1 + c², as the reference
    torch.testing.assert_close(CAGrad(c=0.5, rescale="1+c").weights(K), none / 1.5)
    # Divided by 1 + c, the update is never longer than the plain sum.
    w = CAGrad(c=0.5, rescale="1+c").weights(K)
    assert float(w @ K @ w) <= float(K.sum()) + 1e-9
    with pytest.raises(ValueError):
        CAGrad(rescale="2")


def test_strategies_handle_zero_gradients():
    G = torch.zeros(3, 6, dtype=torch.float64)
    G[0, 0] = 1.0
    K = G @ G.T
    for name in STRATEGIES:
        w = make_strategy(name).weights(K)
        assert w.shape == (3,) and torch.isfinite(w).all(), name
