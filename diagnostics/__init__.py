"""Gradient-conflict diagnostics for multi-task training, computed from Gram matrices.

The statistics depend on torch and mtkit.strategies (PCGrad's projection); `diagnostics.hooks`
connects them to mtkit's training loop.
"""

from .gram import global_group_grams, group_grams, param_grams
from .groups import flat_group_ids, group_index, layer_groups
from .probe import GradientProbe, StreamTracker
from .report import format_table, plot_run, summarize_run
from .stats import (
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
from .writer import DiagnosticsWriter

__all__ = [
    "DiagnosticsWriter",
    "GradientProbe",
    "StreamTracker",
    "conflict_rate",
    "conflicts",
    "cosines",
    "flat_group_ids",
    "format_table",
    "global_group_grams",
    "group_grams",
    "group_index",
    "layer_groups",
    "norm_ratios",
    "norms",
    "param_grams",
    "pcgrad_coefficients",
    "pcgrad_cos_sum",
    "pcgrad_removed",
    "plot_run",
    "random_orders",
    "summarize",
    "summarize_run",
]
