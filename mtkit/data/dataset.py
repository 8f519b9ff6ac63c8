"""Tokenized task splits: read once, tokenize once, cache on disk, pad per batch.

A split keeps token ids unpadded; `collate` pads to the longest text of the batch (dynamic padding),
which with length-bucketed batches keeps almost no padding on the wire.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mtkit import progress
from mtkit.config import Config, TaskConfig
from mtkit.tasks import DataError, Example, get_kind, read_examples

log = logging.getLogger("mtkit.data")

CACHE_VERSION = 2


@dataclass
class Split:
    examples: list[Example]
    tokens: list[tuple[list[int], ...]]   # per example, one id list per text; joint pairs: the pair first
    segments: list[list[int]] | None = None  # joint pairs: the pair's token type ids (0: text 1, 1: text 2)

    def __len__(self) -> int:
        return len(self.examples)

    def lengths(self) -> list[int]:
        return [max(len(t) for t in texts) for texts in self.tokens]

    def subset(self, indices: list[int]) -> "Split":
        return Split([self.examples[i] for i in indices], [self.tokens[i] for i in indices],
                     None if self.segments is None else [self.segments[i] for i in indices])


@dataclass
class TaskData:
    cfg: TaskConfig
    splits: dict[str, Split]              # train / dev / test, those that were declared
    sources: dict[str, str]               # split -> where it was read from


def resolve_source(task: TaskConfig, split: str, root: Path, hub_fallback: bool) -> tuple[str, str, dict, bool]:
    """(path, format, columns, is_fallback) for one split; the task's hub copy when the file is absent."""
    path = getattr(task, split)
    if path.startswith("hf:"):
        return path, "hf", task.columns, False
    full = Path(path) if os.path.isabs(path) else root / path
    if full.exists():
        return str(full), task.format, task.columns, False
    hub = task.hub.get(split)
    if hub and hub_fallback:
        log.warning("%s: %s not found; using the public hub copy %s (needs network access)",
                    task.name, full, hub)
        return hub, "hf", task.hub_columns or task.columns, True
    raise DataError(str(full), None,
                    f"file not found for task {task.name!r} ({split}). Put the CS224N files under the data "
                    f"root (data.root in the config, or the MTKIT_DATA environment variable; currently "
                    f"{root}), e.g. a copy of the project's shared data folder"
                    + ("" if hub else ", or declare a hub copy in tasks[].hub"))


def load_tasks(cfg: Config, tokenizer, splits=("train", "dev", "test")) -> dict[str, TaskData]:
    root = cfg.data_root()
    out = {}
    for task in cfg.tasks:
        loaded, sources = {}, {}
        for split in splits:
            if getattr(task, split) is None:
                continue
            src, fmt, columns, fallback = resolve_source(task, split, root, cfg.data.hub_fallback)
            limit = task.max_train if split == "train" else task.max_eval
            try:
                loaded[split] = _load_split(task, split, src, fmt, columns, limit, tokenizer,
                                            cfg.model.max_length, Path(cfg.data.cache_dir))
            except DataError as e:
                if not fallback:
                    raise
                # The hub copy was only a fallback: say how to provide the real files.
                raise DataError(str(root / getattr(task, split)), None,
                                f"not found, and the hub copy failed ({e.problem}). Put the CS224N files "
                                f"under the data root (data.root or MTKIT_DATA; currently {root})") from None
            sources[split] = src
        if "train" in splits and "train" not in loaded and not task.eval_only:
            raise DataError(f"<config task {task.name}>", None, "a task needs a train split")
        if task.calibrate and "train" in loaded:
            loaded["train"], loaded["calib"] = hold_out(loaded["train"], task.calibrate, cfg.train.seed)
        out[task.name] = TaskData(task, loaded, sources)
    return out


def hold_out(train: Split, share: float, seed: int) -> tuple[Split, Split]:
    """(rest, held out): a seeded random `share` of the rows, never trained on; both keep file order."""
    n = round(len(train) * share)
    if not 0 < n < len(train):
        raise ValueError(f"calibrate = {share} holds out {n} of {len(train)} training rows; "
                         "both parts need at least one")
    held = set(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return (train.subset([i for i in range(len(train)) if i not in held]),
            train.subset(sorted(held)))


def _load_split(task: TaskConfig, split: str, src: str, fmt: str, columns: dict, limit: int | None,
                tokenizer, max_length: int, cache_dir: Path) -> Split:
    key = _cache_key(task, split, src, fmt, columns, limit, tokenizer, max_length)
    cached = cache_dir / f"{task.name}-{split}-{key}.pt"
    if cached.exists():
        data = torch.load(cached, weights_only=False)
        return Split([Example(*e) for e in data["examples"]], data["tokens"], data["segments"])
    examples = read_examples(src, kind=task.kind, fmt=fmt, columns=columns or None,
                             num_labels=task.num_labels, label_names=task.label_names,
                             label_range=tuple(task.label_range) if task.label_range else None,
                             labelled=split != "test" or task.eval_only)  # eval-only tasks are scored on test
    if limit is not None:
        examples = examples[:limit]
    tokenized = tokenize(task, examples, tokenizer, max_length, split)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    torch.save({"examples": [(e.id, e.texts, e.label, e.group) for e in examples], "tokens": tokenized.tokens,
                "segments": tokenized.segments}, tmp)
    os.replace(tmp, cached)  # atomic, so concurrent ranks never read half a file
    return tokenized


def tokenize(task: TaskConfig, examples: list[Example], tokenizer, max_length: int, split: str = "") -> Split:
    """A split of `examples` (read from a file, or given in memory by `mtkit.api`) tokenized for `task`;
    `split` only names the progress bar."""
    segments = None
    tokens = [()] * len(examples)
    if not task.joint or task.decoder == "cross_cosine":  # each text on its own
        n_texts = len(get_kind(task.kind).roles)
        flat = [text for ex in examples for text in ex.texts]
        ids = [i for s in progress.bar(range(0, len(flat), 8192), f"tokenize {task.name} {split}".rstrip())
               for i in tokenizer(flat[s:s + 8192], truncation=True, max_length=max_length,
                                  add_special_tokens=True)["input_ids"]]
        tokens = [tuple(ids[i * n_texts:(i + 1) * n_texts]) for i in range(len(examples))]
    if task.joint:  # [CLS] a [SEP] b [SEP] first; the longer text is truncated first
        enc = tokenizer([ex.texts[0] for ex in examples], [ex.texts[1] for ex in examples],
                        truncation=True, max_length=max_length, return_token_type_ids=True)
        segments = enc["token_type_ids"]
        tokens = [(joint, *single) for joint, single in zip(enc["input_ids"], tokens)]
    return Split(examples, tokens, segments)


def _cache_key(task, split, src, fmt, columns, limit, tokenizer, max_length) -> str:
    stat = ""
    if not src.startswith("hf:") and os.path.exists(src):
        # A folder (a SemEval STS year) is keyed by its files: editing one leaves the folder's mtime alone.
        files = sorted(os.path.join(src, f) for f in os.listdir(src)) if os.path.isdir(src) else [src]
        stat = ";".join(f"{os.path.abspath(f)}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in files)
    parts = [CACHE_VERSION, src, stat, fmt, sorted(columns.items()), limit, task.kind, task.num_labels,
             task.label_names, task.label_range, split, tokenizer.name_or_path, len(tokenizer), max_length,
             task.decoder if task.joint else None, task.eval_only]
    return hashlib.sha1(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def collate(tokens: list[tuple[list[int], ...]], labels: list, pad_id: int, label_dtype,
            segments: list[list[int]] | None = None) -> dict:
    """Pad a batch to its longest text.

    Texts are laid out text-major: rows [k*B, (k+1)*B) hold text k of every example, so the encoder
    embeds all texts of a pair task in one call and the head reshapes to [n_texts, B, H]. For joint pairs
    text 0 is the pair as one sequence, and its token type ids (`segments`) are padded alike; every
    other row has type 0.
    """
    n_texts = len(tokens[0])
    flat = [ex[k] for k in range(n_texts) for ex in tokens]
    width = max(len(t) for t in flat)
    input_ids = torch.full((len(flat), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(flat), width), dtype=torch.long)
    for i, ids in enumerate(flat):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, :len(ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "n_texts": n_texts}
    if segments is not None:
        types = torch.zeros_like(input_ids)
        for i, seg in enumerate(segments):
            types[i, :len(seg)] = torch.tensor(seg, dtype=torch.long)
        batch["token_type_ids"] = types
    if labels and labels[0] is not None:
        batch["labels"] = torch.tensor(labels, dtype=label_dtype)
    return batch


def batch_for(task: TaskData, split: str, indices: list[int], pad_id: int) -> dict:
    s = task.splits[split]
    dtype = torch.float32 if get_kind(task.cfg.kind).label == "float" else torch.long
    segments = [s.segments[i] for i in indices] if s.segments is not None else None
    batch = collate([s.tokens[i] for i in indices], [s.examples[i].label for i in indices], pad_id, dtype,
                    segments)
    if task.cfg.kind == "sentences" and split == "train":
        batch["views"] = True  # the model encodes each sentence twice (dropout views)
    return batch


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
