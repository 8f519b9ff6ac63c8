"""Per-group Gram matrices of per-task gradients, single-process and distributed.

With ``G = [T, P]`` per-task gradients of the shared parameters and a group id
per parameter element, the Gram of group ``g`` is ``K_g = G_g G_gᵀ`` (``[T, T]``):
its diagonal holds squared gradient norms, its off-diagonal entries the dot
products from which cosines and conflicts follow.  ``Σ_g K_g`` is the Gram of
the whole shared vector.

:func:`param_grams` gets the same Grams from per-parameter gradients without
concatenating them: a group's Gram is the sum of its parameters' Grams, so no
[T, P] copy of the gradients is ever made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.distributed as dist

Method = Literal["auto", "reduce_scatter", "all_reduce"]


def group_grams(G: torch.Tensor, group_ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Gram of each group, accumulated in float64.

    G: [T, P] per-task gradients; group_ids: [P] integer group of each column.
    Returns [n_groups, T, T].  Work is done per run of equal consecutive ids,
    so ids should come in few contiguous runs (parameters in module order).
    """
    T, P = G.shape
    if group_ids.shape != (P,):
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)}, expected ({P},)")
    K = torch.zeros(n_groups, T, T, dtype=torch.float64, device=G.device)
    if P == 0:
        return K
    run_ids, run_lengths = torch.unique_consecutive(group_ids, return_counts=True)
    start = 0
    for gid, length in zip(run_ids.tolist(), run_lengths.tolist()):
        block = G[:, start : start + length].to(torch.float64)  # [T, length]
        K[gid] += block @ block.T  # [T, T]
        start += length
    return K


# Elements per float64 block in param_grams: T x 2^20 x 8 bytes stays in the tens of MB.
CHUNK = 1 << 20


def param_grams(
    grads: Sequence[Sequence[torch.Tensor | None]], param_groups: Sequence[int], n_groups: int
) -> torch.Tensor:
    """Per-group Grams from per-parameter gradients, accumulated in float64.

    grads[k][t]: task t's gradient of parameter k (any shape; None means zero);
    param_groups[k]: the group of parameter k.  Returns [n_groups, T, T],
    equal to :func:`group_grams` of the concatenated gradients.  Large
    parameters are widened to float64 one chunk of ``CHUNK`` elements at a time.
    """
    if len(grads) != len(param_groups):
        raise ValueError(f"{len(grads)} parameters but {len(param_groups)} group ids")
    T = len(grads[0]) if grads else 0
    device = next((g.device for row in grads for g in row if g is not None), torch.device("cpu"))
    K = torch.zeros(n_groups, T, T, dtype=torch.float64, device=device)
    for row, gid in zip(grads, param_groups):
        if len(row) != T:
            raise ValueError(f"a parameter has gradients for {len(row)} tasks, expected {T}")
        present = [t for t, g in enumerate(row) if g is not None]
        if not present:
            continue
        flat = [row[t].reshape(-1) for t in present]
        n = flat[0].numel()
        block = torch.empty(len(present), min(n, CHUNK), dtype=torch.float64, device=device)  # [T', C]
        partial = torch.zeros(len(present), len(present), dtype=torch.float64, device=device)
        for start in range(0, n, CHUNK):
            width = min(CHUNK, n - start)
            for r, g in enumerate(flat):
                block[r, :width].copy_(g[start : start + width])
            partial += block[:, :width] @ block[:, :width].T  # [T', T']
        index = torch.tensor(present, device=device)
        K[gid, index[:, None], index[None, :]] += partial
    return K


def global_group_grams(
    local_G: torch.Tensor,
    group_ids: torch.Tensor,
    n_groups: int,
    group: dist.ProcessGroup | None = None,
    method: Method = "auto",
) -> torch.Tensor:
    """Per-group Grams of the global (rank-mean) gradients, identical on every rank.

    local_G: [T, P] this rank's per-task gradients on its local batch shard;
    the global gradient is the mean of ``local_G`` over the ranks of ``group``.
    group_ids: [P].  Returns [n_groups, T, T] float64.

    Each rank ends up with a [T, ceil(P/W)] column slice of the global
    gradients (``reduce_scatter``), computes the partial Grams of its slice,
    and one ``all_reduce`` of the small [n_groups, T, T] sums them: exact,
    with 1/W of the Gram work per rank.  P is padded with zero columns to a
    multiple of W; they add nothing.

    method: ``"reduce_scatter"``, ``"all_reduce"`` (reduce the full [T, P],
    then keep the own slice; about twice the traffic, supported by every
    backend) or ``"auto"``: try reduce_scatter and fall back to all_reduce if
    the backend rejects it.  Backends reject unsupported collectives for a given
    dtype/version identically on every rank before exchanging data, so all
    ranks fall back together; gloo in torch 2.13 supports reduce_scatter for
    float32/float64.

    Every rank runs the same collectives in the same order; call it on all
    ranks of ``group``.  Without an initialised process group, or with world
    size 1, no collective runs and this equals :func:`group_grams`.
    """
    if method not in ("auto", "reduce_scatter", "all_reduce"):
        raise ValueError(f"unknown method {method!r}; expected auto, reduce_scatter or all_reduce")
    if not (dist.is_available() and dist.is_initialized()):
        return group_grams(local_G, group_ids, n_groups)
    world = dist.get_world_size(group)
    if world == 1:
        return group_grams(local_G, group_ids, n_groups)
    rank = dist.get_rank(group)
    T, P = local_G.shape
    shard = -(-P // world)
    # bf16/fp16 gradients are summed in float32 so the rank-sum keeps precision.
    dtype = torch.float64 if local_G.dtype == torch.float64 else torch.float32
    blocks = torch.zeros(world, T, shard, dtype=dtype, device=local_G.device)  # [W, T, S]
    for r in range(world):
        columns = local_G[:, r * shard : (r + 1) * shard]  # [T, <= S]; the last may be short
        blocks[r, :, : columns.shape[1]] = columns
    my_ids = group_ids[rank * shard : (rank + 1) * shard]
    pad = torch.zeros(shard - len(my_ids), dtype=group_ids.dtype, device=group_ids.device)
    my_ids = torch.cat([my_ids, pad])  # [S]; padded columns are zero, any group will do

    my_slice = _rank_sum_of_own_block(blocks, rank, group, method)  # [T, S]
    my_slice /= world
    K = group_grams(my_slice, my_ids, n_groups)  # [n_groups, T, T], this slice's share
    dist.all_reduce(K, op=dist.ReduceOp.SUM, group=group)
    return K


def _rank_sum_of_own_block(
    blocks: torch.Tensor,
    rank: int,
    group: dist.ProcessGroup | None,
    method: Method,
) -> torch.Tensor:
    """Sum over ranks of ``blocks[rank]``.  blocks: [W, T, S] (overwritten) -> [T, S]."""
    if method in ("auto", "reduce_scatter"):
        out = torch.empty_like(blocks[rank])
        try:
            dist.reduce_scatter(out, list(blocks.unbind(0)), op=dist.ReduceOp.SUM, group=group)
            return out
        except (RuntimeError, NotImplementedError):
            if method == "reduce_scatter":
                raise
    dist.all_reduce(blocks, op=dist.ReduceOp.SUM, group=group)
    return blocks[rank]
