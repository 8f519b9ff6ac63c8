"""Typed run configuration: dataclasses loaded from YAML plus dotted overrides.

`load("configs/x.yaml", {"train.seed": "3", "tasks.sst.lr": "1e-3"})` returns a `Config`. Unknown keys
and wrong types fail fast with the file, the YAML line and the list of valid keys, before any model is
built. Tasks are addressed by name in overrides (`tasks.<name>.<field>`).
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

BUNDLED_MODEL = "bundled:all-MiniLM-L6-v2"


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    name_or_path: str = BUNDLED_MODEL   # HF id, local folder, or the bundled encoder
    pooling: str = "mean"               # cls | pooler | mean
    max_length: int = 128
    random_init: bool = False           # keep the architecture and tokenizer, draw fresh weights
    arch: dict[str, int] = field(default_factory=dict)  # BertConfig overrides, e.g. tiny test models
    embed_chunk: Optional[int] = None   # encode at most N texts at once, recomputing activations in
                                        # backward (gradient caching): big contrastive batches, small memory
    task_layers: int = 0                # >0: the top N encoder layers are task-specific (one copy per group)
    task_groups: dict[str, list[str]] = field(default_factory=dict)  # group -> tasks sharing one top;
                                        # tasks not listed get a top of their own


@dataclass
class TaskConfig:
    name: str = ""
    kind: str = ""                      # classification | pair_classification | pair_regression | contrastive
    train: Optional[str] = None         # path under data.root, absolute path, or hf:NAME[:CONFIG]@SPLIT
    dev: Optional[str] = None
    test: Optional[str] = None
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    num_labels: Optional[int] = None
    label_names: Optional[list[str]] = None
    label_range: Optional[list[float]] = None
    hub: dict[str, str] = field(default_factory=dict)  # split -> hf path used when the files are absent
    hub_columns: dict[str, str] = field(default_factory=dict)  # column map of the hub copy
    decoder: str = "concat"             # pair tasks: concat | product | sbert | cosine | cross | cross_cosine
    loss: str = "auto"                  # auto | ce | mse | cosent
    head_hidden: int = 0                # 0: linear head; >0: one hidden layer of this width
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: Optional[int] = None    # per rank; defaults to train.batch_size
    weight: float = 1.0                 # loss weight
    temperature: float = 0.05           # contrastive kinds: cosine / temperature (SimCSE)
    leave_out: bool = False             # head trains, but its loss never reaches the encoder
    max_train: Optional[int] = None     # first N training examples (debugging, slices)
    max_eval: Optional[int] = None
    calibrate: float = 0.0              # binary tasks: hold out this share of train (seeded by train.seed)
                                        # and set the decision threshold on it (Platt scaling) at evaluation

    @property
    def joint(self) -> bool:
        """A cross-encoder pair task: both texts are also tokenized and encoded as one sequence."""
        return self.decoder in ("cross", "cross_cosine") and self.kind in ("pair_classification",
                                                                          "pair_regression")


@dataclass
class DataConfig:
    root: Optional[str] = None          # default: $MTKIT_DATA, else ../shared/data
    cache_dir: str = ".cache/mtkit"     # tokenized splits, keyed by file and tokenizer
    schedule: str = "proportional"      # round_robin | proportional | temperature
    temperature: float = 2.0
    steps_per_epoch: Optional[int] = None
    bucket: int = 50                    # global batches per length-sorted chunk
    hub_fallback: bool = True           # use task.hub copies when the files are absent


@dataclass
class OptimConfig:
    encoder_lr: float = 2e-5
    encoder_weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lr_schedule: str = "linear"         # linear | cosine | constant (all after warmup)
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0          # 0 disables clipping


@dataclass
class GradVacConfig:
    beta: float = 0.01                  # EMA rate of the target cosines (Wang et al. 2021), in (0, 1]


@dataclass
class CAGradConfig:
    c: float = 0.5                      # radius of the ball around the mean gradient, >= 0 (Liu et al. 2021)
    rescale: str = "1+c^2"              # 1+c^2 (reference code) | 1+c | none: the update is divided by this


@dataclass
class TrainConfig:
    mode: str = "finetune"              # finetune | linear_probe | lp_ft
    lp_steps: int = 0                   # lp_ft: steps of linear probing before full fine-tuning
    epochs: float = 1.0
    max_steps: Optional[int] = None     # overrides epochs when set
    batch_size: int = 32                # per rank
    grad_accum: int = 1
    eval_every: Optional[int] = None    # steps; default: end of each epoch
    eval_batch_size: int = 128
    log_every: int = 50
    seed: int = 0
    precision: str = "fp32"             # fp32 | bf16 | fp16
    engine: str = "auto"                # auto | torch | deepspeed
    device: str = "auto"                # auto | cpu | cuda
    num_threads: Optional[int] = None   # torch intra-op threads
    save_checkpoints: bool = True
    predict: list[str] = field(default_factory=lambda: ["dev"])  # splits to write prediction files for
    strategy: str = "none"             # none (one task per step) | sum | pcgrad | gradvac | cagrad (joint)
    gradvac: GradVacConfig = field(default_factory=GradVacConfig)  # read when strategy = gradvac
    cagrad: CAGradConfig = field(default_factory=CAGradConfig)     # read when strategy = cagrad
    select_metric: str = "overall"      # best checkpoint by dev "overall" or "<task>.<metric>"
    export_encoder: bool = False        # also save the best encoder as an HF folder (DIR/encoder)
    trace: bool = False                 # per-rank JSONL of (step, task, example indices), for audits


@dataclass
class DiagnosticsConfig:
    mode: str = "off"                   # off | probe | stream
    # A probe (a forward and backward per task on its probe batch) costs 4-6 training steps of the bundled
    # MiniLM job on CPU: random probe batches pad to their longest example, training batches are
    # length-bucketed. Every 200 steps that is 2-3 %; at 50 it was 9 %. Smaller probe batches would cost as
    # little but make every probe noisier; a rarer probe keeps each one as good, with fewer points in time.
    every: int = 200                    # probe / stream record interval, in optimizer steps
    probe_batch_size: int = 32
    stream_beta: float = 0.9


@dataclass
class DeepSpeedConfig:
    config: Optional[str] = None        # DeepSpeed JSON; zero stage etc. come from there
    zero_stage: Optional[int] = None    # overrides the JSON's stage


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task named {name!r}; tasks: {[t.name for t in self.tasks]}")

    def micro_batches_per_step(self) -> int:
        """Backward passes per optimizer step: grad_accum, times the task count in joint mode."""
        return self.train.grad_accum * (len(self.tasks) if self.train.strategy != "none" else 1)

    def data_root(self) -> Path:
        return Path(self.data.root or os.environ.get("MTKIT_DATA") or "../shared/data")


@dataclass
class StageConfig:
    name: str = ""
    config: str = ""                    # a run config, relative to the pipeline file
    overrides: dict[str, str] = field(default_factory=dict)
    init_from: Optional[str] = None     # an earlier stage whose exported encoder starts this one


@dataclass
class PipelineConfig:
    """Stages run in order, each in DIR/<stage>; a stage can start from an earlier stage's encoder."""
    name: str = "pipeline"
    stages: list[StageConfig] = field(default_factory=list)


CHOICES = {
    "model.pooling": {"cls", "pooler", "mean"},
    "task.kind": {"classification", "pair_classification", "pair_regression", "contrastive", "sentences"},
    "task.decoder": {"concat", "product", "sbert", "cosine", "cross", "cross_cosine"},
    "task.loss": {"auto", "ce", "mse", "cosent"},
    "data.schedule": {"round_robin", "proportional", "temperature"},
    "optim.lr_schedule": {"linear", "cosine", "constant"},
    "train.mode": {"finetune", "linear_probe", "lp_ft"},
    "train.precision": {"fp32", "bf16", "fp16"},
    "train.engine": {"auto", "torch", "deepspeed"},
    "train.device": {"auto", "cpu", "cuda"},
    "train.strategy": {"none", "sum", "pcgrad", "gradvac", "cagrad"},
    "train.cagrad.rescale": {"1+c^2", "1+c", "none"},
    "diagnostics.mode": {"off", "probe", "stream"},
}


# ---------------------------------------------------------------- loading

def load(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Config from a YAML file (or defaults when path is None) with dotted overrides applied."""
    raw, lines, source = {}, {}, "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{source}: cannot read config: {e.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
            lines = _line_numbers(yaml.compose(text))
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: top level must be a mapping of sections")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value, source)
        lines[key] = "override"
    cfg = _build(Config, raw, "", _Where(source, lines))
    validate(cfg, source)
    return cfg


def is_pipeline(path: str | os.PathLike) -> bool:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # load() reports the problem
    return isinstance(raw, dict) and "stages" in raw


def load_pipeline(path: str | os.PathLike) -> PipelineConfig:
    """A pipeline file; every stage's own config is loaded and validated too, so mistakes surface early."""
    source = str(path)
    text = Path(path).read_text()
    pipe = _build(PipelineConfig, yaml.safe_load(text) or {}, "", _Where(source, _line_numbers(yaml.compose(text))))
    names = [s.name for s in pipe.stages]
    if not names or len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"{source}: stages need unique, non-empty names, got {names}")
    for i, stage in enumerate(pipe.stages):
        if stage.init_from is not None and stage.init_from not in names[:i]:
            raise ConfigError(f"{source}: stage {stage.name!r} init_from {stage.init_from!r} must name an "
                              f"earlier stage, one of {names[:i]}")
        load(Path(path).parent / stage.config, stage.overrides)
    return pipe


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def validate(cfg: Config, source: str = "<config>") -> None:
    def check(key: str, value: Any) -> None:
        if value not in CHOICES[key]:
            raise ConfigError(f"{source}: {key} = {value!r}; choose one of {sorted(CHOICES[key])}")

    for key in ("model.pooling", "data.schedule", "optim.lr_schedule", "train.mode", "train.precision",
                "train.engine", "train.device", "train.strategy", "diagnostics.mode"):
        section, name = key.split(".")
        check(key, getattr(getattr(cfg, section), name))
    names = [t.name for t in cfg.tasks]
    if not cfg.tasks:
        raise ConfigError(f"{source}: no tasks declared (tasks: [...])")
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: task names must be unique, got {names}")
    for t in cfg.tasks:
        if not t.name:
            raise ConfigError(f"{source}: every task needs a name")
        for key in ("kind", "decoder", "loss"):
            value = getattr(t, key)
            if value not in CHOICES[f"task.{key}"]:
                raise ConfigError(f"{source}: tasks.{t.name}.{key} = {value!r}; "
                                  f"choose one of {sorted(CHOICES[f'task.{key}'])}")
        if t.kind in ("classification", "pair_classification") and not (t.num_labels or t.label_names):
            raise ConfigError(f"{source}: tasks.{t.name}: a {t.kind} task needs num_labels or label_names")
        if not 0.0 <= t.calibrate < 1.0:
            raise ConfigError(f"{source}: tasks.{t.name}.calibrate = {t.calibrate}; use a share of the "
                              "training set in [0, 1)")
        if t.calibrate and not (t.kind in ("classification", "pair_classification")
                                and (t.num_labels or len(t.label_names or [])) == 2):
            raise ConfigError(f"{source}: tasks.{t.name}.calibrate sets a binary decision threshold; "
                              f"{t.kind} with {t.num_labels or len(t.label_names or [])} labels has none")
        if t.label_range is not None and len(t.label_range) != 2:
            raise ConfigError(f"{source}: tasks.{t.name}.label_range must be [low, high]")
    check("train.cagrad.rescale", cfg.train.cagrad.rescale)
    if cfg.train.cagrad.c < 0:
        raise ConfigError(f"{source}: train.cagrad.c = {cfg.train.cagrad.c}; must be >= 0")
    if not 0.0 < cfg.train.gradvac.beta <= 1.0:
        raise ConfigError(f"{source}: train.gradvac.beta = {cfg.train.gradvac.beta}; must be in (0, 1]")
    if cfg.train.strategy != "none" and cfg.diagnostics.mode == "stream":
        raise ConfigError(f"{source}: diagnostics.mode = stream reads one task's gradient per step; "
                          "joint strategies put every task in a step (use probe)")
    if cfg.train.select_metric != "overall":
        task, _, metric = cfg.train.select_metric.partition(".")
        if task not in names or not metric:
            raise ConfigError(f"{source}: train.select_metric = {cfg.train.select_metric!r}; use 'overall' or "
                              f"'<task>.<metric>' with a task in {names}")
    if cfg.train.mode == "lp_ft" and cfg.train.lp_steps <= 0:
        raise ConfigError(f"{source}: train.mode = lp_ft needs train.lp_steps > 0")
    if cfg.model.task_layers < 0:
        raise ConfigError(f"{source}: model.task_layers = {cfg.model.task_layers}; use 0 (all shared) or more")
    if cfg.model.task_groups and not cfg.model.task_layers:
        raise ConfigError(f"{source}: model.task_groups needs model.task_layers > 0 (there are no tops to share)")
    grouped = [n for members in cfg.model.task_groups.values() for n in members]
    for name in grouped:
        if name not in names:
            raise ConfigError(f"{source}: model.task_groups: no task named {name!r}; tasks: {names}")
        if grouped.count(name) > 1:
            raise ConfigError(f"{source}: model.task_groups: task {name!r} is in more than one group")


class _Where:
    """Where a key came from, for error messages."""

    def __init__(self, source: str, lines: dict[str, int | str]):
        self.source, self.lines = source, lines

    def __call__(self, key: str) -> str:
        line = self.lines.get(key)
        if line == "override":
            return f"override --{key}"
        return f"{self.source}:{line}" if line else self.source


def _line_numbers(node: yaml.Node | None, prefix: str = "") -> dict[str, int | str]:
    """Dotted key -> 1-based YAML line, with task list items addressed by their name."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = key_node.start_mark.line + 1
            out.update(_line_numbers(value_node, key + "."))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            name = str(i)
            if isinstance(item, yaml.MappingNode):
                name = next((v.value for k, v in item.value if k.value == "name"), name)
            out[f"{prefix}{name}"] = item.start_mark.line + 1
            out.update(_line_numbers(item, f"{prefix}{name}."))
    return out


def _set_dotted(raw: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):  # tasks.<name>.field
            match = [t for t in node if isinstance(t, dict) and t.get("name") == part]
            if not match:
                names = [t.get("name") for t in node if isinstance(t, dict)]
                raise ConfigError(f"override {key}: no task named {part!r}; tasks: {names}")
            node = match[0]
        else:
            node = node.setdefault(part, [] if part == "tasks" else {})
    if isinstance(node, list):
        raise ConfigError(f"override {key}: address a task field as tasks.<name>.<field>")
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str, where: _Where) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where(prefix.rstrip('.'))}: {prefix.rstrip('.') or 'config'} must be a mapping, "
                          f"got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in valid:
            raise ConfigError(f"{where(prefix + str(key))}: unknown key {prefix + str(key)!r}; "
                              f"valid keys: {', '.join(valid)}")
        kwargs[key] = _coerce(hints[key], value, prefix + key, where)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, where: _Where) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", where)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where(key)}: {key} must be a list, got {value!r}")
        if args and dataclasses.is_dataclass(args[0]):
            out = []
            for i, item in enumerate(value):
                name = item.get("name", str(i)) if isinstance(item, dict) else str(i)
                out.append(_build(args[0], item, f"{key}.{name}.", where))
            return out
        return [_coerce(args[0], v, key, where) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where(key)}: {key} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}", where) for k, v in value.items()}
    return _scalar(tp, value, key, where)


def _scalar(tp: type, value: Any, key: str, where: _Where) -> Any:
    bad = ConfigError(f"{where(key)}: {key} expects {tp.__name__}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    return value
