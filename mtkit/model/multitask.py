"""One shared encoder, one head per task, one task per batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtkit import objectives
from mtkit.contrastive import distributed_info_nce, unsup_views
from mtkit.config import Config, TaskConfig
from mtkit.model.encoder import Encoder, scale_grad
from mtkit.model.heads import make_head

NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm.weight", "layer_norm.bias")


def task_groups(groups: dict[str, list[str]], tasks: list[TaskConfig]) -> dict[str, str]:
    """task -> the group whose task-specific encoder top it uses (model.task_groups; default: its own)."""
    names = [t.name for t in tasks]
    out = {}
    for group, members in groups.items():
        for name in members:
            if name not in names:
                raise ValueError(f"model.task_groups.{group}: no task named {name!r}; tasks: {names}")
            if name in out:
                raise ValueError(f"model.task_groups: task {name!r} is in both {out[name]!r} and {group!r}")
            out[name] = group
    return {name: out.get(name, name) for name in names}


class MultiTaskModel(nn.Module):
    def __init__(self, encoder: Encoder, tasks: list[TaskConfig], embed_chunk: int | None = None,
                 groups: dict[str, list[str]] | None = None):
        super().__init__()
        self.encoder = encoder
        self.embed_chunk = embed_chunk
        self.tasks = {t.name: t for t in tasks}
        self.heads = nn.ModuleDict({t.name: make_head(t, encoder.hidden_size) for t in tasks})
        self.encoder_frozen = False
        # task -> its encoder top; empty when the whole encoder is shared
        self.top_of = task_groups(groups or {}, tasks) if encoder.tops else {}
        if set(self.top_of.values()) != set(encoder.tops):
            raise ValueError(f"encoder tops {sorted(encoder.tops)} do not match the task groups "
                             f"{sorted(set(self.top_of.values()))}")

    # ------------------------------------------------------------ parameters
    def shared_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters every task trains: the encoder less any task-specific tops."""
        return [(n, p) for n, p in self.encoder.shared_named_parameters() if p.requires_grad]

    def head_parameters(self, task: str) -> list[tuple[str, nn.Parameter]]:
        return [(f"heads.{task}.{n}", p) for n, p in self.heads[task].named_parameters()]

    def top_parameters(self, group: str) -> list[tuple[str, nn.Parameter]]:
        return [(f"encoder.tops.{group}.{n}", p) for n, p in self.encoder.tops[group].named_parameters()]

    def param_groups(self, cfg: Config) -> list[dict]:
        """Encoder (with and without weight decay) plus one group per head, each with its own lr.

        Groups carry a `name` so engines, schedulers and TensorBoard can address them.
        """
        decay, no_decay = [], []
        for n, p in self.shared_parameters():
            (no_decay if n.endswith(NO_DECAY) else decay).append(p)
        groups = [
            {"name": "encoder", "params": decay, "lr": cfg.optim.encoder_lr,
             "weight_decay": cfg.optim.encoder_weight_decay},
            {"name": "encoder.no_decay", "params": no_decay, "lr": cfg.optim.encoder_lr, "weight_decay": 0.0},
        ]
        for group in self.encoder.tops:  # task-specific encoder layers train like the encoder
            decay, no_decay = [], []
            for n, p in self.top_parameters(group):
                (no_decay if n.endswith(NO_DECAY) else decay).append(p)
            groups += [{"name": f"top.{group}", "params": decay, "lr": cfg.optim.encoder_lr,
                        "weight_decay": cfg.optim.encoder_weight_decay},
                       {"name": f"top.{group}.no_decay", "params": no_decay, "lr": cfg.optim.encoder_lr,
                        "weight_decay": 0.0}]
        for name, task in self.tasks.items():
            params = [p for _, p in self.head_parameters(name)]
            if params:
                groups.append({"name": f"head.{name}", "params": params, "lr": task.lr,
                               "weight_decay": task.weight_decay})
        return groups

    def freeze_encoder(self, frozen: bool) -> None:
        """Linear probing: the encoder runs without autograd and without dropout."""
        self.encoder_frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    # ------------------------------------------------------------ forward
    def embed(self, batch: dict, task: str | None = None, trunk_grad_scale: float | None = None) -> torch.Tensor:
        # batch input_ids [n_texts * B, L] (text-major) -> [n_texts, B, H]
        if batch.get("views"):  # unsupervised SimCSE: two dropout views of each sentence in one call
            ids, mask = unsup_views(batch["input_ids"], batch["attention_mask"])
            batch = {"input_ids": ids, "attention_mask": mask, "n_texts": 2}
        grad = torch.is_grad_enabled() and not self.encoder_frozen
        with torch.set_grad_enabled(grad):
            emb = self._encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                               chunked=grad, group=self.top_of.get(task), trunk_grad_scale=trunk_grad_scale)
        return emb.view(batch["n_texts"], -1, emb.shape[-1])

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None,
                chunked: bool, **kw) -> torch.Tensor:
        """Gradient caching (Gao et al. 2021) as activation recomputation: each chunk keeps only its
        inputs and RNG state in forward, and is re-encoded (same dropout masks) when backward reaches
        it, so activation memory is one chunk's while the loss still sees every embedding at once."""
        c = self.embed_chunk
        if not chunked or not c or ids.shape[0] <= c:
            return self.encoder(ids, mask, types, **kw)
        return torch.cat([checkpoint(self.encoder, ids[i:i + c], mask[i:i + c],
                                     None if types is None else types[i:i + c], use_reentrant=False, **kw)
                          for i in range(0, ids.shape[0], c)])

    def predict(self, task: str, emb: torch.Tensor) -> torch.Tensor:
        """The head's output: logits [B, C] or scores [B]."""
        return self.heads[task](emb)

    def loss_input(self, task: str, emb: torch.Tensor) -> torch.Tensor:
        """What the task's loss reads: the head's output, except that CoSENT on a `cosine` head ranks
        cos(u, v) itself [B], as published (Su 2022, scale 20 on the cosine). Through the head's
        a * cos + b the scale would be 20 * a (100 at the start on STS) and trained along with a.
        The head's score still serves prediction; under CoSENT its a and b keep their initial values."""
        cfg = self.tasks[task]
        if cfg.decoder == "cosine" and cfg.kind.startswith("pair_") and self.loss_name(task) == "cosent":
            return F.cosine_similarity(emb[0], emb[1], dim=-1)
        return self.predict(task, emb)

    def loss_name(self, task: str) -> str:
        cfg = self.tasks[task]
        return objectives.DEFAULT_LOSS[cfg.kind] if cfg.loss == "auto" else cfg.loss

    def loss(self, task: str, output: torch.Tensor, batch: dict) -> torch.Tensor:
        cfg = self.tasks[task]
        if cfg.kind in ("contrastive", "sentences"):
            # output [2 or 3, B, H]; every rank's candidates are negatives for every anchor
            negative = output[2] if output.shape[0] > 2 else None
            return cfg.weight * distributed_info_nce(output[0], output[1], negative, cfg.temperature)
        return cfg.weight * objectives.LOSSES[self.loss_name(task)](output, batch["labels"])

    def forward(self, task: str, batch: dict, weight: float | None = None) -> torch.Tensor:
        # Joint strategies: the shared encoder must receive weight * this task's gradient while the head (and
        # a task-specific encoder top) keep their own; the scale sits where the shared part ends.
        if self.encoder.tops:
            emb = self.embed(batch, task, trunk_grad_scale=weight)
        else:
            emb = scale_grad(self.embed(batch, task), weight)
        if self.tasks[task].leave_out:
            emb = emb.detach()  # the head still learns; the encoder never sees this task's loss
        return self.loss(task, self.loss_input(task, emb), batch)

    def probe_loss(self, task: str, batch: dict) -> torch.Tensor:
        """The task's loss with the encoder in the graph whatever the training mode (frozen encoder,
        leave-out task), so diagnostics can measure the gradient the task *would* send."""
        frozen, self.encoder_frozen = self.encoder_frozen, False
        try:
            emb = self.embed(batch, task)
        finally:
            self.encoder_frozen = frozen
        return self.loss(task, self.loss_input(task, emb), batch)


def build_model(cfg: Config) -> MultiTaskModel:
    tasks = cfg.trained_tasks()  # eval-only tasks have no head and no encoder top
    groups = sorted(set(task_groups(cfg.model.task_groups, tasks).values())) if cfg.model.task_layers else []
    return MultiTaskModel(Encoder(cfg.model, groups), tasks, cfg.model.embed_chunk, cfg.model.task_groups)
