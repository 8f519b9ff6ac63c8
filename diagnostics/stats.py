"""Gradient-conflict statistics computed from Gram matrices only.

``K = G Gᵀ`` ([T, T], float64) for per-task gradients ``G = [T, P]``:
``K[i, i] = ‖g_i‖²`` and ``K[i, j] = g_i·g_j``.  Any vector that is a linear
combination ``Σ_k c_k g_k`` has squared norm ``cᵀ K c`` and dot product
``cᵀ K[:, j]`` with ``g_j``, so norms, cosines and the PCGrad projections
below never need the P-dimensional gradients.

Zero gradients are handled without NaN: a cosine involving a zero vector is 0
and a norm ratio with a zero denominator is 0 (both are undefined).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# The PCGrad projection is the training strategy's own, so the statistics describe exactly what
# `train.strategy: pcgrad` would do.
from mtkit.strategies.base import random_orders
from mtkit.strategies.pcgrad import pcgrad_coefficients

PAIR_SEPARATOR = "__"


def norms(K: torch.Tensor) -> torch.Tensor:
    """Gradient norms ‖g_t‖.  K: [T, T] -> [T]."""
    return K.diagonal().clamp_min(0.0).sqrt()


def cosines(K: torch.Tensor) -> torch.Tensor:
    """Pairwise cosines g_i·g_j / (‖g_i‖‖g_j‖), 0 where a gradient is zero.  K: [T, T] -> [T, T]."""
    n = norms(K)  # [T]
    denom = n[:, None] * n[None, :]  # [T, T]
    defined = denom > 0
    cos = K / torch.where(defined, denom, torch.ones_like(denom))
    return torch.where(defined, cos, torch.zeros_like(cos)).clamp(-1.0, 1.0)


def norm_ratios(K: torch.Tensor) -> torch.Tensor:
    """``R[i, j] = ‖g_i‖ / ‖g_j‖``; 0 where ‖g_j‖ = 0 (undefined).  K: [T, T] -> [T, T]."""
    n = norms(K)  # [T]
    defined = (n > 0)[None, :].expand(len(n), len(n))  # [T, T]
    ratio = n[:, None] / torch.where(n > 0, n, torch.ones_like(n))[None, :]
    return torch.where(defined, ratio, torch.zeros_like(ratio))


def conflicts(K: torch.Tensor) -> torch.Tensor:
    """Conflict flags: True where the two task gradients have negative cosine.  [T, T] bool."""
    return cosines(K) < 0


def conflict_rate(K: torch.Tensor) -> float:
    """Fraction of unordered task pairs (i < j) whose gradients conflict; 0 for T < 2."""
    T = K.shape[0]
    if T < 2:
        return 0.0
    upper = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # [T, T]
    return float(conflicts(K)[upper].double().mean())


def as_orders(order: Sequence[int] | torch.Tensor, n_tasks: int) -> torch.Tensor:
    """Normalise a fixed order: [T] (shared by every task) or [T, T] (one per task) -> [T, T]."""
    orders = torch.as_tensor(order, dtype=torch.long)
    if orders.dim() == 1:
        orders = orders.expand(n_tasks, n_tasks)
    if orders.shape != (n_tasks, n_tasks):
        raise ValueError(f"order must have shape ({n_tasks},) or ({n_tasks}, {n_tasks})")
    expected = torch.arange(n_tasks)
    if not all(torch.equal(row.sort().values, expected) for row in orders):
        raise ValueError("each order must be a permutation of range(T)")
    return orders


def pcgrad_removed(K: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
    """Relative size ‖g_i − g_i'‖ / ‖g_i‖ of what PCGrad removes from each task gradient.

    0 means untouched, 1 means the whole gradient was projected away; 0 for a
    zero gradient.  K: [T, T]; orders: [T, T] -> [T].
    """
    K = K.to(torch.float64).cpu()
    D = torch.eye(K.shape[0], dtype=torch.float64) - pcgrad_coefficients(K, orders)  # [T, T]
    removed = torch.einsum("ik,kl,il->i", D, K, D).clamp_min(0.0).sqrt()  # [T]
    n = norms(K)  # [T]
    return torch.where(n > 0, removed / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(n))


def pcgrad_cos_sum(K: torch.Tensor, orders: torch.Tensor) -> float:
    """Cosine between the plain summed gradient Σ g_t and the PCGrad-combined Σ g_t'.

    1 means PCGrad leaves the update direction unchanged; 0 if either is zero.
    """
    K = K.to(torch.float64).cpu()
    w = pcgrad_coefficients(K, orders).sum(0)  # [T]
    ones = torch.ones_like(w)  # [T]
    denom = (ones @ K @ ones).clamp_min(0.0) * (w @ K @ w).clamp_min(0.0)
    if denom <= 0:
        return 0.0
    return float((ones @ K @ w / denom.sqrt()).clamp(-1.0, 1.0))


def pair_keys(task_names: Sequence[str]) -> list[tuple[int, int, str]]:
    """(i, j, "a__b") for every pair i < j in task order."""
    return [
        (i, j, f"{a}{PAIR_SEPARATOR}{b}")
        for i, a in enumerate(task_names)
        for j, b in enumerate(task_names)
        if i < j
    ]


def summarize(
    K_groups: torch.Tensor,
    group_names: Sequence[str],
    task_names: Sequence[str],
    step: int,
    rng: torch.Generator | None = None,
    order: Sequence[int] | torch.Tensor | None = None,
) -> dict:
    """One JSON-able diagnostics record from per-group Grams.

    K_groups: [n_groups, T, T].  Whole-vector statistics use ``Σ_g K_g``.
    The PCGrad order is ``order`` if given, else drawn from ``rng``, else
    task order.  Keys: step, tasks, groups, norm {task}, norm_ratio {"a__b":
    ‖g_a‖/‖g_b‖}, cos {"a__b"}, layer_cos {"a__b": {group: cos}}, conflict
    {"a__b": cos < 0}, conflict_rate, pcgrad_removed {task}, pcgrad_cos_sum.
    """
    n_groups, T, _ = K_groups.shape
    if n_groups != len(group_names) or T != len(task_names):
        raise ValueError(
            f"K_groups has shape {tuple(K_groups.shape)} for {len(group_names)} groups "
            f"and {len(task_names)} tasks"
        )
    K_groups = K_groups.to(torch.float64).cpu()
    K = K_groups.sum(0)  # [T, T]
    if order is not None:
        orders = as_orders(order, T)
    elif rng is not None:
        orders = random_orders(T, rng)
    else:
        orders = as_orders(range(T), T)

    n = norms(K)  # [T]
    cos = cosines(K)  # [T, T]
    ratio = norm_ratios(K)  # [T, T]
    layer = torch.stack([cosines(Kg) for Kg in K_groups])  # [n_groups, T, T]
    removed = pcgrad_removed(K, orders)  # [T]
    pairs = pair_keys(task_names)
    return {
        "step": int(step),
        "tasks": list(task_names),
        "groups": list(group_names),
        "norm": {t: float(n[i]) for i, t in enumerate(task_names)},
        "norm_ratio": {key: float(ratio[i, j]) for i, j, key in pairs},
        "cos": {key: float(cos[i, j]) for i, j, key in pairs},
        "layer_cos": {
            key: {g: float(layer[k, i, j]) for k, g in enumerate(group_names)} for i, j, key in pairs
        },
        "conflict": {key: bool(cos[i, j] < 0) for i, j, key in pairs},
        "conflict_rate": conflict_rate(K),
        "pcgrad_removed": {t: float(removed[i]) for i, t in enumerate(task_names)},
        "pcgrad_cos_sum": pcgrad_cos_sum(K, orders),
    }
