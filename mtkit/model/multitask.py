"""One shared encoder, one head per task, one task per batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtkit import objectives
from mtkit.contrastive import distributed_info_nce, unsup_views
from mtkit.config import Config, TaskConfig
from mtkit.model.encoder import Encoder
from mtkit.model.heads import make_head

NO_DECAY = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm.weight", "layer_norm.bias")


class MultiTaskModel(nn.Module):
    def __init__(self, encoder: Encoder, tasks: list[TaskConfig], embed_chunk: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.embed_chunk = embed_chunk
        self.tasks = {t.name: t for t in tasks}
        self.heads = nn.ModuleDict({t.name: make_head(t, encoder.hidden_size) for t in tasks})
        self.encoder_frozen = False

    # ------------------------------------------------------------ parameters
    def shared_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.encoder.named_parameters() if p.requires_grad]

    def head_parameters(self, task: str) -> list[tuple[str, nn.Parameter]]:
        return [(f"heads.{task}.{n}", p) for n, p in self.heads[task].named_parameters()]

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
    def embed(self, batch: dict) -> torch.Tensor:
        # batch input_ids [n_texts * B, L] (text-major) -> [n_texts, B, H]
        if batch.get("views"):  # unsupervised SimCSE: two dropout views of each sentence in one call
            ids, mask = unsup_views(batch["input_ids"], batch["attention_mask"])
            batch = {"input_ids": ids, "attention_mask": mask, "n_texts": 2}
        grad = torch.is_grad_enabled() and not self.encoder_frozen
        with torch.set_grad_enabled(grad):
            emb = self._encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                               chunked=grad)
        return emb.view(batch["n_texts"], -1, emb.shape[-1])

    def _encode(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None,
                chunked: bool) -> torch.Tensor:
        """Gradient caching (Gao et al. 2021) as activation recomputation: each chunk keeps only its
        inputs and RNG state in forward, and is re-encoded (same dropout masks) when backward reaches
        it, so activation memory is one chunk's while the loss still sees every embedding at once."""
        c = self.embed_chunk
        if not chunked or not c or ids.shape[0] <= c:
            return self.encoder(ids, mask, types)
        return torch.cat([checkpoint(self.encoder, ids[i:i + c], mask[i:i + c],
                                     None if types is None else types[i:i + c], use_reentrant=False)
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
        emb = self.embed(batch)
        if weight is not None:
            # Joint strategies: the encoder must receive weight * this task's gradient while the head keeps
            # its own. Same value as emb; d(emb_w)/d(emb) = weight.
            emb = emb.detach() + weight * (emb - emb.detach())
        if self.tasks[task].leave_out:
            emb = emb.detach()  # the head still learns; the encoder never sees this task's loss
        return self.loss(task, self.loss_input(task, emb), batch)

    def probe_loss(self, task: str, batch: dict) -> torch.Tensor:
        """The task's loss with the encoder in the graph whatever the training mode (frozen encoder,
        leave-out task), so diagnostics can measure the gradient the task *would* send."""
        frozen, self.encoder_frozen = self.encoder_frozen, False
        try:
            emb = self.embed(batch)
        finally:
            self.encoder_frozen = frozen
        return self.loss(task, self.loss_input(task, emb), batch)


def build_model(cfg: Config) -> MultiTaskModel:
    return MultiTaskModel(Encoder(cfg.model), cfg.tasks, cfg.model.embed_chunk)
