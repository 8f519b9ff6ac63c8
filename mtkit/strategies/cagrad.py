"""CAGrad (Liu et al. 2021, "Conflict-Averse Gradient Descent for Multi-task Learning") in Gram form."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import minimize

from .base import Strategy, as_gram, register

RESCALES = ("1+c", "1+c^2", "none")


def cagrad_objective(x: np.ndarray, A: np.ndarray, c: float) -> float:
    """F(x) = g_xᵀ g0 + c ‖g0‖ ‖g_x‖ with g_x = Σ x_t g_t, g0 the mean gradient; A: [T, T] Gram."""
    b = np.full(len(x), 1.0 / len(x))  # [T], g0 = Σ b_t g_t
    g0_norm = math.sqrt(max(b @ A @ b, 0.0))
    return float(x @ A @ b + c * g0_norm * math.sqrt(max(x @ A @ x, 0.0)))


def cagrad_simplex_weights(K: torch.Tensor, c: float) -> torch.Tensor:
    """The minimiser x ([T], on the simplex) of :func:`cagrad_objective`.  K: [T, T].

    Solved with SLSQP on K divided by its mean diagonal: the minimiser does
    not change under scaling of K, and unit scale keeps tolerances meaningful.
    """
    K = as_gram(K)
    T = K.shape[0]
    scale = float(K.diagonal().mean())
    uniform = np.full(T, 1.0 / T)
    if scale <= 0 or T == 1:
        return torch.from_numpy(uniform)
    A = (K / scale).numpy()  # [T, T]
    Ab = A @ uniform  # [T]
    radius = c * math.sqrt(max(uniform @ Ab, 0.0))  # c ‖g0‖
    # The tiny offset keeps the gradient of ‖g_x‖ finite where g_x = 0.
    eps = 1e-18

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        Ax = A @ x
        norm = math.sqrt(max(x @ Ax, 0.0) + eps)
        return float(x @ Ab + radius * norm), Ab + radius * Ax / norm

    result = minimize(
        objective,
        uniform,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * T,
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1.0, "jac": lambda x: np.ones_like(x)}],
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    x = np.clip(result.x, 0.0, None)
    return torch.from_numpy(x / x.sum())


def cagrad_weights(K: torch.Tensor, c: float = 0.5, rescale: str = "1+c^2") -> torch.Tensor:
    """CAGrad task weights.  K: [T, T] -> [T].

    With g0 = mean task gradient and x the simplex minimiser of
    :func:`cagrad_objective`, the paper's update is
    ``d = g0 + (c ‖g0‖ / ‖g_x‖) g_x``.  The weights returned are
    ``T · (1/T + λ x) / r`` with ``λ = c ‖g0‖ / ‖g_x‖`` (0 if g_x = 0): the
    factor T puts them on the scale of ``sum`` (c = 0 gives all ones).  ``r``
    is one of the three rescalings of the reference implementation:
    ``1 + c²`` (default: the reference code's default, used for the paper's
    experiments, so learning rates carry over), ``1 + c`` (then
    ‖Σ w_t g_t‖ ≤ ‖Σ g_t‖, since ‖d‖ ≤ (1 + c)‖g0‖), or 1 for ``"none"``.
    """
    if c < 0:
        raise ValueError(f"c must be >= 0, got {c}")
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
    K = as_gram(K)
    T = K.shape[0]
    x = cagrad_simplex_weights(K, c)  # [T]
    uniform = torch.full((T,), 1.0 / T, dtype=torch.float64)
    g0_norm = math.sqrt(max(float(uniform @ K @ uniform), 0.0))
    gx_norm = math.sqrt(max(float(x @ K @ x), 0.0))
    lam = c * g0_norm / gx_norm if gx_norm > 0 else 0.0
    divisor = {"1+c": 1.0 + c, "1+c^2": 1.0 + c * c, "none": 1.0}[rescale]
    return (1.0 + T * lam * x) / divisor


@register
class CAGrad(Strategy):
    """Conflict-averse direction: maximise the worst task's improvement within radius c‖g0‖ of g0.

    Stateless and deterministic; see :func:`cagrad_weights` for the scaling.
    """

    name = "cagrad"

    def __init__(self, c: float = 0.5, rescale: str = "1+c^2") -> None:
        if c < 0:
            raise ValueError(f"c must be >= 0, got {c}")
        if rescale not in RESCALES:
            raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
        self.c = c
        self.rescale = rescale

    def weights(self, K: torch.Tensor) -> torch.Tensor:
        return cagrad_weights(K, self.c, self.rescale)
