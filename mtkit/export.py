"""Exports of trained models.

Encoder: a Hugging Face folder (`AutoModel.from_pretrained(folder)` loads it) with the tokenizer and an
`mtkit_encoder.json` naming the pooling to use. Whole multi-task model: the run folder itself, i.e.
`config.json` (the resolved mtkit config) + `best/model.pt` (state dict of encoder and heads), which is
what `mtkit eval RUN_DIR` loads.
"""
from __future__ import annotations

import json
from pathlib import Path

from mtkit.config import Config


def export_encoder(model, tokenizer, cfg: Config, path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.encoder.bert.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "mtkit_encoder.json").write_text(json.dumps(
        {"pooling": cfg.model.pooling, "max_length": cfg.model.max_length,
         "trained_from": cfg.model.name_or_path, "run": cfg.name}, indent=2))
    return path
