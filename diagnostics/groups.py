"""Map shared-parameter names to layer groups.

A layer group is the unit at which per-layer gradient statistics are
reported (one Gram matrix per group).  For BERT-family encoders the groups
are ``embeddings``, ``layer.0`` ... ``layer.{L-1}`` and ``pooler``.
"""

from __future__ import annotations

import re

import torch

_BERT_LAYER = re.compile(r"(?:^|\.)encoder\.layer\.(\d+)(?:\.|$)")
_FIRST_INDEX = re.compile(r"^(.*?(?:^|\.)\d+)(?:\.|$)")


def group_of(name: str) -> str:
    """Group name of one parameter.

    BERT-style names (optionally under a prefix such as ``bert.``):
    ``embeddings.*`` -> ``embeddings``, ``encoder.layer.{i}.*`` -> ``layer.{i}``,
    ``pooler.*`` -> ``pooler``.  Any other name: the prefix up to and including
    the first integer component (``transformer.h.3.attn.w`` -> ``transformer.h.3``),
    else the first component (``lm_head.weight`` -> ``lm_head``).
    """
    layer = _BERT_LAYER.search(name)
    if layer is not None:
        return f"layer.{layer.group(1)}"
    parts = name.split(".")
    if "pooler" in parts[:-1]:
        return "pooler"
    if "embeddings" in parts[:-1]:
        return "embeddings"
    indexed = _FIRST_INDEX.match(name)
    if indexed is not None:
        return indexed.group(1)
    return parts[0]


def layer_groups(names: list[str]) -> list[str]:
    """Group name for each parameter name (same length and order as ``names``)."""
    return [group_of(name) for name in names]


def group_index(names: list[str]) -> tuple[list[str], list[int]]:
    """Distinct group names in first-seen order, and each name's group index."""
    order: dict[str, int] = {}
    ids = [order.setdefault(group, len(order)) for group in layer_groups(names)]
    return list(order), ids


def flat_group_ids(names: list[str], numels: list[int]) -> tuple[list[str], torch.Tensor]:
    """Group names and the group id of every element of the flattened parameters.

    The flattened vector is the concatenation of the parameters in the given
    order, as produced by ``torch.cat([p.reshape(-1) for p in params])``.
    Ids are int32 (half the memory of int64 at ~1e8 parameters); every
    function in this package accepts any integer dtype.
    """
    if len(names) != len(numels):
        raise ValueError(f"{len(names)} names but {len(numels)} sizes")
    group_names, ids = group_index(names)
    flat = torch.repeat_interleave(
        torch.tensor(ids, dtype=torch.int32), torch.tensor(numels, dtype=torch.long)
    )  # [P]
    return group_names, flat
