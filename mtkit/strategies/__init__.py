"""Multi-task gradient-combination strategies as Gram-derived task weights.

``make_strategy(name, **kwargs).weights(K)`` with ``K`` the [T, T] Gram of
the per-task shared-parameter gradients returns ``w`` [T]; train on
``Σ_t w_t · L_t`` with ``w`` detached.
"""

from .base import STRATEGIES, SeededStrategy, Strategy, make_strategy, random_orders, register
from .cagrad import CAGrad, cagrad_objective, cagrad_simplex_weights, cagrad_weights
from .gradvac import GradVac, gradvac_coefficients
from .pcgrad import PCGrad, pcgrad_coefficients
from .simple import SumStrategy

__all__ = [
    "STRATEGIES",
    "CAGrad",
    "GradVac",
    "PCGrad",
    "SeededStrategy",
    "Strategy",
    "SumStrategy",
    "cagrad_objective",
    "cagrad_simplex_weights",
    "cagrad_weights",
    "gradvac_coefficients",
    "make_strategy",
    "pcgrad_coefficients",
    "random_orders",
    "register",
]
