"""Exports of trained models.

Encoder: a Hugging Face folder (`AutoModel.from_pretrained(folder)` loads it) with the tokenizer and an
`mtkit_encoder.json` naming the pooling to use. With task-specific layers (model.task_layers) there is one
such folder per task group, `<path>/<group>/`, each a complete encoder (shared trunk plus that group's top
layers), and `<path>/groups.json` maps each group to its tasks. Whole multi-task model: the run folder itself, i.e.
`config.json` (the resolved mtkit config) + `best/model.pt` (state dict of encoder and heads), which is
what `mtkit eval RUN_DIR` loads.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from torch import nn

from mtkit.config import Config


def export_encoder(model, tokenizer, cfg: Config, path: Path) -> Path:
    path = Path(path)
    encoder = model.encoder
    if not encoder.tops:
        _save(encoder.bert, tokenizer, cfg, path, tasks=list(model.tasks))
        return path
    members: dict[str, list[str]] = {}
    for task, group in model.top_of.items():
        members.setdefault(group, []).append(task)
    for group, top in encoder.tops.items():
        bert = copy.deepcopy(encoder.bert)
        bert.encoder.layer = nn.ModuleList([*bert.encoder.layer, *copy.deepcopy(top)])
        _save(bert, tokenizer, cfg, path / group, tasks=members[group])
    (path / "groups.json").write_text(json.dumps(members, indent=2))
    return path


def _save(bert, tokenizer, cfg: Config, path: Path, tasks: list[str]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    bert.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "mtkit_encoder.json").write_text(json.dumps(
        {"pooling": cfg.model.pooling, "max_length": cfg.model.max_length,
         "trained_from": cfg.model.name_or_path, "run": cfg.name, "tasks": tasks}, indent=2))
