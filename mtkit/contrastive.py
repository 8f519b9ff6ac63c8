"""Contrastive learning at large batch: cross-rank negatives and unsupervised views.

Shapes: B anchors per rank, W ranks, H hidden, L tokens. (Gradient caching for big batches on small
memory is `model.embed_chunk`, see `MultiTaskModel._encode`.)

Gradient convention across ranks
--------------------------------
The target is the single-process loss over the global batch of N = W*B anchors,

    L = 1/N * sum_j l_j,        l_j = -log softmax_k(cos(a_j, c_k) / t)[label_j],

with candidates c = all positives then all hard negatives of every rank. Rank r computes only its own
anchors against every candidate, L_r = 1/B * sum_{j on r} l_j, so L = 1/W * sum_r L_r.

L_r depends on the embeddings of rank r (its anchors and its own candidates) and on the candidates of
the other ranks, which rank r only holds as constants. The gradient of L_s with respect to rank r's
candidates is therefore produced on rank s, and `gather_with_grad` sends it back: its backward
all-reduces (sums) the gradient of the gathered tensor and keeps the local slice. Rank r then
back-propagates

    g_r = dL_r/da_r * da_r/dtheta + sum_s dL_s/dc_r * dc_r/dtheta,

and the mean that DDP / DeepSpeed take over ranks is

    1/W * sum_r g_r = d(1/W * sum_s L_s)/dtheta = dL/dtheta,

exactly the single-process gradient, with no extra factor on the loss. Two consequences: each rank's
loss is the plain mean over its own anchors (what `distributed_info_nce` returns), and an engine that
*sums* gradients over ranks instead of averaging needs the loss divided by W. Leaving the other ranks'
candidates as constants without the backward sum would drop every sum_{s != r} term: the gradient
would only see the pull of local anchors on local candidates, which is not the global-batch gradient.
"""
from __future__ import annotations


import torch
import torch.distributed as dist
import torch.nn.functional as F



def _world_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward returns, to each rank, the sum over ranks of the gradient of its slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, world: int, rank: int) -> torch.Tensor:
        # x [B, H] -> [W*B, H]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.rows = slice(rank * x.shape[0], (rank + 1) * x.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        # grad [W*B, H]: this rank's loss with respect to every rank's rows
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rows], None, None


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, rank-major: [B, H] -> [W*B, H]; identity without a process group or at W = 1.

    The local slice stays in the autograd graph; its backward receives the gradient that every rank's
    loss puts on these rows (see the module docstring for why this makes averaged gradients exact).
    Every rank must call this, in the same order, with the same shape; shapes are gathered first so a
    mismatch raises the same error on every rank rather than leaving the others blocked in the gather.
    """
    world, rank = _world_rank()
    if world == 1:
        return x
    # Fixed-length (ndim, rows, cols) so that even a tensor of the wrong rank is reported on every rank.
    head = (list(x.shape[:2]) + [-1, -1])[:2]
    desc = torch.tensor([x.dim(), *head], dtype=torch.long, device=x.device)   # [3]
    descs = [torch.empty_like(desc) for _ in range(world)]
    dist.all_gather(descs, desc)
    descs = [tuple(d.tolist()) for d in descs]
    if len(set(descs)) != 1 or descs[0][0] != 2:
        raise ValueError(f"gather_with_grad needs the same [B, H] tensor on every rank, got (ndim, B, H) = "
                         f"{descs} by rank: drop or pad the last uneven batch (e.g. a sampler with "
                         "drop_last)")
    return _GatherWithGrad.apply(x.contiguous(), world, rank)


def distributed_info_nce(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None,
                         temperature: float = 0.05, rank_offset: int | None = None) -> torch.Tensor:
    """Supervised SimCSE over the global batch: local anchors against every rank's candidates.

    Candidates are all ranks' positives, then all ranks' hard negatives when given, so on W ranks of B
    rows the result equals `objectives.info_nce` on the concatenated W*B batch restricted to this
    rank's anchors; the positive of local anchor i sits at row rank_offset + i, by default rank*B (the
    place `gather_with_grad` puts this rank's positives). Averaging this loss over ranks gives the
    global loss and, under gradient averaging, the global gradient (module docstring).

    rank_offset overrides that row, e.g. to score one shard of anchors against a full batch of
    candidates in a single process.
    """
    # anchor [B, H], positive [B, H], negative [B, H] or None
    _, rank = _world_rank()
    positives = gather_with_grad(positive)                                      # [W*B, H]
    candidates = positives if negative is None else torch.cat([positives, gather_with_grad(negative)])
    offset = rank * positive.shape[0] if rank_offset is None else rank_offset
    if offset < 0 or offset + anchor.shape[0] > positives.shape[0]:
        raise ValueError(f"anchors [{offset}, {offset + anchor.shape[0]}) fall outside the "
                         f"{positives.shape[0]} gathered positives")
    # Normalise then matmul: same cosine as info_nce without its [B, C, H] broadcast, which at W*B
    # candidates would dominate memory. At least fp32, as info_nce, so half precision is not summed in.
    dtype = torch.promote_types(anchor.dtype, torch.float32)
    a = F.normalize(anchor.to(dtype), dim=-1, eps=1e-8)                         # [B, H]
    c = F.normalize(candidates.to(dtype), dim=-1, eps=1e-8)                     # [W*B or 2*W*B, H]
    labels = offset + torch.arange(anchor.shape[0], device=anchor.device)      # [B]
    return F.cross_entropy(a @ c.T / temperature, labels)


def unsup_views(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsupervised SimCSE (Gao et al. 2021) input: every sentence twice, so dropout makes two views.

    Text-major layout: rows [0, B) are view 1 and rows [B, 2B) view 2 (n_texts = 2), so one encoder
    call gives emb [2B, H] -> emb.view(2, B, H) and the loss is info_nce(emb[0], emb[1], None)
    (distributed_info_nce across ranks): each sentence's other view is its positive, every other
    sentence's view a negative. The views differ only through dropout, so the encoder must be in train
    mode; in eval mode they coincide and the loss carries no signal.
    """
    # input_ids, attention_mask [B, L] -> [2B, L]
    return torch.cat([input_ids, input_ids]), torch.cat([attention_mask, attention_mask])
