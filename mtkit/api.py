"""Python API, for notebooks and scripts: `train` a run, `load` it, `encode` sentences, `predict` labels.

    import mtkit
    results = mtkit.train("mtkit:configs/debug_tiny.yaml", out="runs/x", train__max_steps=4)
    model = mtkit.load("runs/x")
    model.encode(["a good film"], normalize=True)       # np.ndarray [1, hidden]
    model.predict("sst", ["a good film"])               # [label]
    model.predict("sts", [("a good film", "a fine movie")])

Overrides are the dotted keys of `mtkit train`, written `train__max_steps=4` or `**{"train.max_steps": 4}`.

In-memory data: a task's `train`, `dev` or `test` may be a list of dicts or a `datasets.Dataset` (in a config
dict, on a `Config`, or as an override `tasks__sst__train=rows`). Each row names its fields by the task's
column names (`sentence`, `sentiment`, ...: tasks[].columns over mtkit.tasks.DEFAULT_COLUMNS) or by their
roles (`text`, `label`, ...). `train` writes such a split to `OUT/inputs/<task>-<split>-<content hash>.jsonl`
and puts that path in the config, so the rest of mtkit stays file-based: the config stays typed, the run
folder holds the data it was trained on (`mtkit eval OUT` works), and `resume="auto"` with the same rows
finds the same file, hence the same config, and continues exactly. results.json lists these files under
`in_memory_data`.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtkit import checkpoint, config as config_mod
from mtkit.config import Config, TaskConfig
from mtkit.data.dataset import TaskData, collate, load_tasks, tokenize
from mtkit.evaluate import fit_threshold, predict_task
from mtkit.tasks import DEFAULT_COLUMNS, DataError, Example, get_kind

log = logging.getLogger("mtkit.api")

SPLITS = ("train", "dev", "test")
IN_MEMORY = "<in memory>"  # stands in for a split's path until its rows are written


def train(config: str | os.PathLike | dict | Config, out: str | os.PathLike, *, resume: str | None = None,
          overwrite: bool = False, allow_config_change: bool = False, **overrides: Any) -> dict:
    """Train into the run folder `out`, as `mtkit train` does; returns the run's results (results.json).

    `config`: a YAML path (`mtkit:configs/...` names a shipped example), a `Config`, or a dict shaped like
    the YAML. `overrides`: dotted keys, `__` standing for `.`. `resume` / `overwrite` /
    `allow_config_change`: as on the command line."""
    out = Path(out)
    overrides = {key.replace("__", "."): value for key, value in overrides.items()}
    memory: dict[tuple[str, str], Any] = {}
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "tasks" and parts[2] in SPLITS and _in_memory(value):
            memory[parts[1], parts[2]] = value
            overrides[key] = IN_MEMORY

    if isinstance(config, (str, os.PathLike)):
        if config_mod.is_pipeline(config):
            if memory:
                raise ValueError(f"{config} is a pipeline: give in-memory data to a single-run config")
            from mtkit.pipeline import run_pipeline
            return run_pipeline(config, out, overrides, resume, overwrite, allow_config_change)
        cfg = config_mod.load(config, overrides)
    else:
        raw = _raw_config(config, memory)
        cfg = config_mod.load(None, {**raw, **overrides})

    written = {}
    if memory:
        folder = out / "inputs"
        if overwrite and not resume and folder.is_dir():
            shutil.rmtree(folder)  # a fresh start keeps only this call's data
        for (name, split), rows in memory.items():
            task = cfg.task(name)
            path = write_split(folder, task, split, rows)
            setattr(task, split, str(path.resolve()))  # absolute: data.root must not apply
            written[f"{name}.{split}"] = str(path.relative_to(out))

    from mtkit.run import run
    results = run(cfg, out, resume, overwrite, allow_config_change)
    if written:
        results["in_memory_data"] = written
        if int(os.environ.get("RANK", "0")) == 0:
            checkpoint.write_json(out / "results.json", results)
    return results


def _in_memory(value: Any) -> bool:
    return value is not None and not isinstance(value, (str, os.PathLike))


def _raw_config(config: dict | Config, memory: dict) -> dict:
    """A YAML-shaped dict of `config` whose in-memory splits are moved into `memory`."""
    if isinstance(config, Config):
        tasks = []
        for t in config.tasks:
            held = {s: getattr(t, s) for s in SPLITS if _in_memory(getattr(t, s))}
            memory.update({(t.name, s): rows for s, rows in held.items()})
            tasks.append(dataclasses.replace(t, **{s: IN_MEMORY for s in held}))  # asdict would deep-copy rows
        return config_mod.to_dict(dataclasses.replace(config, tasks=tasks))
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a YAML path, a dict or a mtkit Config, got {type(config).__name__}")
    raw = dict(config)
    if isinstance(raw.get("tasks"), list):
        raw["tasks"] = [dict(t) if isinstance(t, dict) else t for t in raw["tasks"]]
        for t in raw["tasks"]:
            for split in SPLITS:
                if isinstance(t, dict) and _in_memory(t.get(split)):
                    memory[t.get("name", ""), split] = t[split]
                    t[split] = IN_MEMORY
    return copy.deepcopy(raw)  # overrides are set into nested sections: leave the caller's dict alone


def write_split(folder: Path, task: TaskConfig, split: str, rows: Any) -> Path:
    """Rows (a list of dicts, or a datasets.Dataset) as JSONL in the task's column names; the file name holds
    a hash of the content, so the same rows always give the same path."""
    where = f"tasks.{task.name}.{split}"
    if task.format not in ("auto", "jsonl"):
        raise ValueError(f"{where}: in-memory rows are stored as JSONL, but tasks.{task.name}.format = "
                         f"{task.format!r} would read them as {task.format}; use format: auto")
    if not isinstance(rows, (list, tuple)) and not hasattr(rows, "column_names"):
        raise TypeError(f"{where}: expected a file path, a list of dicts or a datasets.Dataset, got "
                        f"{type(rows).__name__}")
    spec = get_kind(task.kind)
    columns = {**DEFAULT_COLUMNS[task.kind], **task.columns}
    roles = ["id", *spec.roles, *(["label"] if spec.label else [])]
    lines = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"{where}: row {i} is a {type(row).__name__}, not a dict")
        record = {}
        for role in roles:
            key = next((k for k in (columns[role], role) if k in row), None)
            if key is not None:
                record[columns[role]] = _plain(row[key])
            elif role in spec.roles:
                raise ValueError(f"{where}: row {i} has no {columns[role]!r} (or {role!r}) field; fields: "
                                 f"{sorted(row)}")
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    if not lines:
        raise ValueError(f"{where}: no rows")
    text = "".join(lines)
    path = folder / f"{task.name}-{split}-{hashlib.sha1(text.encode()).hexdigest()[:12]}.jsonl"
    if not path.exists():  # an unchanged file keeps its mtime, so the tokenized cache still matches
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return path


def _plain(value: Any) -> Any:
    """numpy and torch scalars as Python numbers, for JSON."""
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


# ---------------------------------------------------------------- inference

def load(run_dir: str | os.PathLike, device: str = "auto") -> "Model":
    """The best model of a finished run (RUN_DIR/config.json + best/model.pt), in eval mode on `device`
    (auto: CUDA when available)."""
    from mtkit.model import build_model
    from mtkit.model.encoder import load_tokenizer
    from mtkit.run import best_weights, read_run_config
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    weights = best_weights(run_dir)
    module = build_model(cfg)
    module.load_state_dict(weights)
    tokenizer = load_tokenizer(cfg.model)
    module.pad_id = tokenizer.pad_token_id
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Model(cfg, module.to(device).eval(), tokenizer, torch.device(device), run_dir)


class Model:
    """A trained multi-task model: the shared encoder (the run's pooling and max_length) and a head per
    task. `module` is the `MultiTaskModel` itself, `config` the run's `Config`."""

    def __init__(self, config: Config, module, tokenizer, device: torch.device, run_dir: Path | None = None):
        self.config, self.module, self.tokenizer, self.device, self.run_dir = config, module, tokenizer, device, run_dir
        self._thresholds: dict[str, float] = {}

    @property
    def tasks(self) -> list[str]:
        return list(self.module.tasks)

    def __repr__(self) -> str:
        m = self.config.model
        return (f"Model(run={str(self.run_dir)!r}, tasks={self.tasks}, pooling={m.pooling!r}, "
                f"max_length={m.max_length}, task_layers={m.task_layers})")

    @torch.no_grad()
    def encode(self, sentences: list[str], batch_size: int = 32, normalize: bool = False,
               task: str | None = None) -> np.ndarray:
        """Sentence embeddings [N, hidden] (float32), in input order; `normalize` scales each to unit length.
        A run with task-specific top layers (model.task_layers) has one encoder per task group: `task`
        picks the one that task trains."""
        group = self._group(task)
        sentences = _texts(sentences, 1, "encode")
        ids = self.tokenizer([s for (s,) in sentences], truncation=True, max_length=self.config.model.max_length)
        ids = ids["input_ids"]
        out = np.zeros((len(ids), self.module.encoder.hidden_size), dtype=np.float32)
        self.module.eval()
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths batch with little padding
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([(ids[i],) for i in idx], [], self.module.pad_id, torch.long)
            emb = self.module.encoder(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                                      group=group)
            out[idx] = emb.float().cpu().numpy()
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    @torch.no_grad()
    def predict(self, task: str, inputs: list, batch_size: int = 128) -> list:
        """The task head's predictions, as `mtkit eval` makes them: a classification task takes sentences, a
        pair task (text1, text2) tuples. Labels come back as label names when the task declares
        `label_names`, else as class indices; a pair_regression task gives scores. A calibrated binary task
        (tasks[].calibrate) uses the threshold `mtkit eval` fits, see `threshold`."""
        t = self._task(task)
        if t.kind not in ("classification", "pair_classification", "pair_regression"):
            raise ValueError(f"predict: task {task!r} is a {t.kind} task, which has no head to predict with; "
                             "use encode")
        texts = _texts(inputs, len(get_kind(t.kind).roles), f"predict({task!r})")
        examples = [Example(str(i), tx, None) for i, tx in enumerate(texts)]
        data = TaskData(t, {"inputs": tokenize(t, examples, self.tokenizer, self.config.model.max_length)}, {})
        self.module.eval()
        res = predict_task(self.module, data, "inputs", batch_size, self.device)
        if t.kind == "pair_regression":
            return [float(p) for p in res["pred"]]
        pred = res["pred"]
        threshold = self.threshold(task) if "margin" in res else None
        if threshold is not None:  # as mtkit.evaluate.evaluate does
            pred = (res["margin"] > threshold).astype(int)
        return [t.label_names[int(p)] if t.label_names else int(p) for p in pred]

    def threshold(self, task: str) -> float | None:
        """The decision threshold on the logit margin of a calibrated binary task, fitted as `mtkit eval`
        does (Platt scaling on the training rows held out by tasks[].calibrate, at these weights); None for
        a task without calibration. Without its training data, the threshold recorded in results.json for
        these (best) weights stands in."""
        t = self._task(task)
        if not t.calibrate:
            return None
        if task not in self._thresholds:
            one = dataclasses.replace(self.config, tasks=[dataclasses.replace(t, dev=None, test=None)])
            try:
                data = load_tasks(one, self.tokenizer, splits=("train",))[task]
            except DataError as e:
                recorded = self._recorded_threshold(task)
                if recorded is None:
                    raise DataError(e.path, e.line, f"{e.problem} (predict needs the training rows of "
                                    f"{task!r} to fit its calibrated threshold, as mtkit eval does)") from None
                log.warning("%s: training data unavailable (%s); using the threshold in results.json", task, e)
                self._thresholds[task] = recorded
            else:
                self.module.eval()
                held = predict_task(self.module, data, "calib", self.config.train.eval_batch_size, self.device)
                labels = np.asarray([e.label for e in data.splits["calib"].examples])
                self._thresholds[task] = fit_threshold(held["margin"], labels)
        return self._thresholds[task]

    def _recorded_threshold(self, task: str) -> float | None:
        path = self.run_dir / "results.json" if self.run_dir else None
        if path is None or not path.exists():
            return None
        return json.loads(path.read_text()).get("dev", {}).get(task, {}).get("threshold")

    def _task(self, name: str) -> TaskConfig:
        if name not in self.module.tasks:
            raise ValueError(f"no task named {name!r}; tasks: {self.tasks}")
        return self.module.tasks[name]

    def _group(self, task: str | None) -> str | None:
        if task is not None:
            self._task(task)
        if not self.module.top_of:
            return None
        if task is None:
            raise ValueError(f"this run has task-specific top layers (model.task_layers = "
                             f"{self.config.model.task_layers}): pass task=NAME to pick its encoder; "
                             f"tasks: {self.tasks}")
        return self.module.top_of[task]


def _texts(inputs: Any, n: int, what: str) -> list[tuple[str, ...]]:
    """Inputs as n-tuples of texts: sentences for n = 1, (text1, text2) pairs for n = 2."""
    if isinstance(inputs, str):
        raise TypeError(f"{what}: expected a list, got one string (wrap it in a list)")
    out = []
    for i, item in enumerate(inputs):
        texts = (item,) if n == 1 else tuple(item) if isinstance(item, (list, tuple)) else None
        if texts is None or len(texts) != n or not all(isinstance(s, str) for s in texts):
            want = "a string" if n == 1 else f"a ({', '.join(['text'] * n)}) tuple of strings"
            raise TypeError(f"{what}: input {i} is {item!r}; expected {want}")
        out.append(texts)
    return out
