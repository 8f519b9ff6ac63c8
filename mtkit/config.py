"""Typed run configuration: dataclasses loaded from YAML plus dotted overrides.

`load("configs/x.yaml", {"train.seed": "3", "tasks.sst.lr": "1e-3"})` returns a `Config`. Unknown keys
and wrong types fail fast with the file, the YAML line and the list of valid keys, before any model is
built. Tasks are addressed by name in overrides (`tasks.<name>.<field>`). A YAML file may start from
another with `base: other.yaml` (see `_read_config`); `keys_help()` is the key list of `mtkit train --help`.
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import math
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
    eval_only: bool = False             # no head, never trained: scored from the encoder's embeddings at every
                                        # evaluation (out-of-distribution data); see mtkit.evaluate
    probe_split: Optional[str] = None   # eval-only classification: the split its logistic probe is fitted on
    threshold_split: Optional[str] = None  # eval-only binary pairs: the split the cosine threshold is chosen on
    eval_with: Optional[str] = None     # eval-only, with model.task_layers: the trained task whose encoder
                                        # top embeds this task's texts

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
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # where scalars and figures go
                                        # (rank 0): tensorboard (tb/), wandb (wandb/, offline), mlflow (mlruns/),
                                        # jsonl (scalars.jsonl); empty for none. See mtkit.report
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
    nonfinite: str = "stop"             # NaN/inf loss or gradient: stop (checkpoint, exit 2) | skip the step.
                                        # stop: it usually means bad data or a diverging lr, which skipping hides
    collective_timeout_s: Optional[float] = None  # a hung rank ends the others after this; None: 60 s on
                                        # CPU (gloo), 600 s on GPU (NCCL). It also bounds DeepSpeed's barrier
                                        # while rank 0 writes the model file of a checkpoint (big models, slow
                                        # disks: raise it)
    barrier_timeout_s: float = 1800.0   # mtkit's barriers, where ranks wait for rank 0's file writes


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

    def trained_tasks(self) -> list[TaskConfig]:
        """The tasks that have a head and are trained: all but the eval-only ones."""
        return [t for t in self.tasks if not t.eval_only]

    def micro_batches_per_step(self) -> int:
        """Backward passes per optimizer step: grad_accum, times the task count in joint mode."""
        return self.train.grad_accum * (len(self.trained_tasks()) if self.train.strategy != "none" else 1)

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
    "train.nonfinite": {"stop", "skip"},
    "diagnostics.mode": {"off", "probe", "stream"},
}


# ---------------------------------------------------------------- loading

def load(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
         report: bool = True) -> Config:
    """Config from a YAML file (or defaults when path is None) with dotted overrides applied. `report=False`
    for a config that will not train (a finished run's, to evaluate or export): the packages of its
    `train.report_to` backends need not be installed."""
    raw, lines, source = {}, {}, "<defaults>"
    if path is not None:
        source = str(path)
        raw, lines = _read_config(path)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value, source)
        lines[key] = "override"
    where = _Where(source, lines)
    cfg = _build(Config, raw, "", where)
    validate(cfg, source, where, report)
    return cfg


def is_pipeline(path: str | os.PathLike) -> bool:
    try:
        raw, _ = _read_config(path)
    except ConfigError:
        return False  # load() reports the problem
    return "stages" in raw


def load_pipeline(path: str | os.PathLike) -> PipelineConfig:
    """A pipeline file; every stage's own config is loaded and validated too, so mistakes surface early."""
    source = str(path)
    raw, lines = _read_config(path)
    pipe = _build(PipelineConfig, raw, "", _Where(source, lines))
    names = [s.name for s in pipe.stages]
    if not names or len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"{source}: stages need unique, non-empty names, got {names}")
    for i, stage in enumerate(pipe.stages):
        if stage.init_from is not None and stage.init_from not in names[:i]:
            raise ConfigError(f"{source}: stage {stage.name!r} init_from {stage.init_from!r} must name an "
                              f"earlier stage, one of {names[:i]}")
        load(Path(path).parent / stage.config, stage.overrides)
    return pipe


def _read_config(path: str | os.PathLike, chain: tuple[Path, ...] = ()) -> tuple[dict, dict[str, Any]]:
    """A YAML config with its `base:` chain resolved: (the merged mapping, dotted key -> (file, line)).

    `base: other.yaml` (relative to the including file) is read first and this file is merged over it:
    mappings key by key, lists of named mappings (tasks, stages) item by item by `name`, anything else
    replaced. Each key keeps the file and line its value came from."""
    raw, numbers = _read_yaml(path)
    lines: dict[str, Any] = {key: (str(path), line) for key, line in numbers.items()}
    if "base" not in raw:
        return raw, lines
    base, where = raw.pop("base"), f"{path}:{numbers.get('base')}"
    lines.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{where}: base must name one YAML file (relative to {path}), got {base!r}")
    here = resolve_path(path)  # a shipped config (mtkit:configs/...) inherits from its shipped neighbours
    base_path, chain = here.parent / base, (*chain, here.resolve())
    if base_path.resolve() in chain:
        cycle = chain[chain.index(base_path.resolve()):] + (base_path.resolve(),)
        raise ConfigError(f"{where}: base: {base} makes a cycle ({' -> '.join(map(str, cycle))}); a config "
                          "cannot inherit from itself")
    if not base_path.is_file():
        raise ConfigError(f"{where}: base file {base_path} not found (base is relative to the including file)")
    base_raw, base_lines = _read_config(base_path, chain)
    return _merge(base_raw, raw), {**base_lines, **lines}


def _merge(base: Any, over: Any) -> Any:
    """`over` laid over `base` (see _read_config)."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in over.items()}}
    if _named_items(base) and _named_items(over):
        merged = {str(item["name"]): item for item in base}
        for item in over:
            name = str(item["name"])
            merged[name] = _merge(merged[name], item) if name in merged else item
        return list(merged.values())
    return over


def _named_items(value: Any) -> bool:
    """A non-empty list of mappings with distinct names (duplicates are left for validation to report)."""
    if not (isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value)):
        return False
    names = [v["name"] for v in value]
    return len(set(map(str, names))) == len(names)


PACKAGED = "mtkit:"  # `mtkit:configs/x.yaml`: an example config shipped with mtkit


def resolve_path(path: str | os.PathLike) -> Path:
    """`path` itself, or for `mtkit:configs/...` the file shipped with mtkit: inside the installed package
    (the wheel puts the repository's configs/ at mtkit/configs), else configs/ beside the package (a source
    checkout or an editable install). A pipeline's stage path, `mtkit:configs/` + its relative path,
    resolves the same way."""
    text = os.fspath(path)
    if not text.startswith(PACKAGED):
        return Path(text)
    rel = Path(text[len(PACKAGED):])
    shipped = sorted(str(p.relative_to(_configs_dir().parent)) for p in _configs_dir().rglob("*")
                     if p.suffix in (".yaml", ".json"))
    if rel.parts[:1] != ("configs",) or ".." in rel.parts or str(rel) not in shipped:
        raise ConfigError(f"{text}: mtkit ships no such file; shipped: "
                          + ", ".join(PACKAGED + p for p in shipped))
    return _configs_dir().parent / rel


def _configs_dir() -> Path:
    from importlib import resources
    installed = Path(str(resources.files("mtkit"))) / "configs"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[1] / "configs"


def _read_yaml(path: str | os.PathLike) -> tuple[dict, dict[str, int | str]]:
    """(the top-level mapping, dotted key -> line) of a YAML file; every problem is a ConfigError naming
    the file and, where the parser knows it, the line."""
    source = str(path)
    try:
        data = resolve_path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{source}: cannot read config: {e.strerror}") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}:{_line_of(data[:e.start].decode('latin-1'))}: not UTF-8 text ({e.reason}, "
                          f"byte {data[e.start]:#04x}); save the file as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
        lines = _line_numbers(yaml.compose(text))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{line}: invalid YAML: {e.problem or e.context}") from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow, located by offset
        raise ConfigError(f"{source}:{_line_of(text[:e.position])}: invalid YAML: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    if raw is None:
        return {}, {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw, lines


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _finite(v) -> bool:
    return math.isfinite(v)


# Ranges of numeric settings, as (test, what a valid value is). Optional fields left at None are skipped.
_COUNT = (lambda v: v >= 1, "use an integer >= 1")
_NONNEG = (lambda v: _finite(v) and v >= 0, "use a finite number >= 0")
_POSITIVE = (lambda v: _finite(v) and v > 0, "use a finite number > 0")
_SHARE = (lambda v: _finite(v) and 0 <= v < 1, "use a number in [0, 1)")

RANGES = {
    "model.max_length": (lambda v: v >= 3, "use an integer >= 3 (room for [CLS], a token and [SEP])"),
    "model.embed_chunk": _COUNT,
    "data.temperature": _POSITIVE,
    "data.steps_per_epoch": _COUNT,
    "data.bucket": _COUNT,
    "optim.encoder_lr": _NONNEG,
    "optim.encoder_weight_decay": _NONNEG,
    "optim.eps": _POSITIVE,
    "optim.warmup_ratio": _SHARE,
    "optim.max_grad_norm": _NONNEG,
    "train.lp_steps": (lambda v: v >= 0, "use an integer >= 0"),
    "train.epochs": _POSITIVE,
    "train.max_steps": _COUNT,
    "train.batch_size": _COUNT,
    "train.grad_accum": _COUNT,
    "train.eval_every": _COUNT,
    "train.eval_batch_size": _COUNT,
    "train.log_every": _COUNT,
    "train.seed": (lambda v: 0 <= v < 2 ** 32 - 1024, "use an integer in [0, 2**32 - 1024) (numpy seeds, "
                   "plus the rank)"),
    "train.num_threads": _COUNT,
    "train.collective_timeout_s": _POSITIVE,
    "train.barrier_timeout_s": _POSITIVE,
    "model.task_layers": (lambda v: v >= 0, "use 0 (all shared) or more"),
    "diagnostics.every": _COUNT,
    "diagnostics.probe_batch_size": _COUNT,
    "diagnostics.stream_beta": _SHARE,
    "deepspeed.zero_stage": (lambda v: v in (0, 1, 2), "use 0, 1 or 2 (ZeRO stage 3 is not supported: "
                             "diagnostics and per-head isolation need whole parameters on every rank)"),
}
TASK_RANGES = {
    "num_labels": (lambda v: v >= 2, "use an integer >= 2"),
    "head_hidden": (lambda v: v >= 0, "use 0 (a linear head) or a hidden width >= 1"),
    "dropout": _SHARE,
    "lr": _NONNEG,
    "weight_decay": _NONNEG,
    "batch_size": _COUNT,
    "weight": _NONNEG,
    "temperature": _POSITIVE,
    "max_train": _COUNT,
    "max_eval": _COUNT,
    "calibrate": (_SHARE[0], "use a share of the training set in [0, 1)"),
}
SPLITS = ("dev", "test")  # train.predict


def dev_metrics(task: TaskConfig) -> list[str]:
    """The dev metrics mtkit.evaluate reports for a task (a calibrated head's fitted threshold aside)."""
    if task.kind == "pair_regression":  # the cosine of the two sentence embeddings, when they are encoded
        return ["pearson", "spearman"] + ([] if task.decoder == "cross" else ["cosine_pearson", "cosine_spearman"])
    if task.kind in ("classification", "pair_classification"):
        return ["acc", "f1"] if _label_count(task) == 2 else ["acc"]
    if task.kind == "contrastive":
        return ["triplet_acc"]
    return []  # sentences: nothing to score


def _label_count(task: TaskConfig) -> int | None:
    return task.num_labels or (len(task.label_names) if task.label_names else None)


def read_deepspeed_json(path: str) -> dict:
    """A DeepSpeed JSON config; errors name the file and, for malformed JSON, the line."""
    try:
        text = resolve_path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read DeepSpeed config: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        ds = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: a DeepSpeed config is a JSON object, got {type(ds).__name__}")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: zero_optimization must be an object, got {zero!r}")
    stage = zero.get("stage")
    if stage is not None and (isinstance(stage, bool) or stage not in (0, 1, 2, 3)):
        raise ConfigError(f"{path}: zero_optimization.stage = {stage!r}; use 0, 1 or 2")
    return ds


def deepspeed_owned(cfg: Config, world_size: int | None = None) -> dict[str, tuple[Any, str, str]]:
    """DeepSpeed JSON keys that mtkit's config decides: key -> (value, how the config gives it, the mtkit key
    to change). train_batch_size needs the world size, known at launch."""
    steps, t = cfg.micro_batches_per_step(), cfg.train
    accum = f"train.grad_accum = {t.grad_accum}" + (f" x {len(cfg.tasks)} tasks per joint step"
                                                  if t.strategy != "none" else "")
    owned = {
        "train_micro_batch_size_per_gpu": (t.batch_size, f"train.batch_size = {t.batch_size}", "train.batch_size"),
        "gradient_accumulation_steps": (steps, accum, "train.grad_accum"),
        "gradient_clipping": (cfg.optim.max_grad_norm, f"optim.max_grad_norm = {cfg.optim.max_grad_norm}",
                              "optim.max_grad_norm"),
        "bf16.enabled": (t.precision == "bf16", f"train.precision = {t.precision!r}", "train.precision"),
        "fp16.enabled": (t.precision == "fp16", f"train.precision = {t.precision!r}", "train.precision"),
    }
    if world_size is not None:
        owned["train_batch_size"] = (t.batch_size * steps * world_size, f"train.batch_size = {t.batch_size} x "
                                     f"{accum} x {world_size} rank(s)", "train.batch_size")
    return owned


def deepspeed_conflict(cfg: Config, ds: dict, path: str, world_size: int | None = None) -> str | None:
    """The first value of a DeepSpeed JSON that contradicts the mtkit config, as an error message, or None.
    Values mtkit owns may be "auto" (mtkit fills them in, as with accelerate and the HF Trainer), absent, or
    equal to what the mtkit config gives; anything else would be silently replaced, so it is refused."""
    for key, (want, how, change) in deepspeed_owned(cfg, world_size).items():
        block, _, name = key.rpartition(".")
        node = ds.get(block, {}) if block else ds
        if not isinstance(node, dict):
            return f"{path}: {block} must be an object, got {json.dumps(node)}"
        have = node.get(name, "auto")
        if isinstance(want, bool):
            same = have is want
        else:
            same = isinstance(have, (int, float)) and not isinstance(have, bool) and have == want
        if have != "auto" and not same:
            return (f"{path}: {key} = {json.dumps(have)}, but mtkit's {how} makes it {json.dumps(want)}; set it to "
                    f'"auto" in the JSON (mtkit fills it in) or change {change}')
    per_rank = cfg.train.batch_size * cfg.micro_batches_per_step()
    total = ds.get("train_batch_size", "auto")
    if world_size is None and total != "auto" and (isinstance(total, bool) or not isinstance(total, int)
                                                    or total <= 0 or total % per_rank):
        return (f"{path}: train_batch_size = {json.dumps(total)}, but mtkit's train.batch_size x accumulation "
                f"gives {per_rank} per rank, so it must be a multiple of {per_rank} (per rank x ranks); set it "
                'to "auto" in the JSON (mtkit fills it in) or change train.batch_size')
    return None


def encoder_config(model: ModelConfig):
    """The encoder's Hugging Face config with model.arch applied, from local files only (cheap and
    offline); None when it is not on this machine yet (a hub id not downloaded, a pipeline stage's
    encoder exported by an earlier stage): the model load reports those."""
    try:
        from transformers import AutoConfig
        from mtkit.model.encoder import resolve_model_path
        return AutoConfig.from_pretrained(resolve_model_path(model.name_or_path), local_files_only=True)
    except (ImportError, OSError, ValueError):  # transformers: OSError when absent, ValueError when unknown
        return None


def validate(cfg: Config, source: str = "<config>", where: _Where | None = None, report: bool = True) -> None:
    """Ranges, choices and relations of every setting, before anything is built. Errors name the key and
    where its value came from (file:line, or the override)."""
    where = where or _Where(source, {})

    def fail(key: str, value: Any, problem: str) -> None:
        raise ConfigError(f"{where(key)}: {key} = {value!r}; {problem}")

    def check(key: str, value: Any, choices) -> None:
        if value not in choices:
            fail(key, value, f"choose one of {sorted(choices)}")

    for key in ("model.pooling", "data.schedule", "optim.lr_schedule", "train.mode", "train.precision",
                "train.engine", "train.device", "train.strategy", "train.nonfinite", "diagnostics.mode"):
        section, name = key.split(".")
        check(key, getattr(getattr(cfg, section), name), CHOICES[key])
    for key, (ok, valid) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and not ok(value):
            fail(key, value, valid)
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(_SHARE[0](b) for b in betas):
        fail("optim.betas", betas, "use two numbers in [0, 1), e.g. [0.9, 0.999]")
    for split in cfg.train.predict:
        check("train.predict", split, SPLITS)
    _validate_report_to(cfg.train.report_to, fail, check, report)
    if cfg.train.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            fail("train.device", "cuda", "CUDA is not available on this machine; use auto or cpu")

    _validate_tasks(cfg, fail, check)
    _validate_eval_only(cfg, fail)
    names = [t.name for t in cfg.trained_tasks()]
    if cfg.train.strategy != "none" and cfg.diagnostics.mode == "stream":
        fail("diagnostics.mode", "stream", "stream reads one task's gradient per step; joint strategies "
             "put every task in a step (use probe)")
    if cfg.train.strategy != "none" and (cfg.data.steps_per_epoch or len(names)) < len(names):
        fail("data.steps_per_epoch", cfg.data.steps_per_epoch,
             f"a joint step takes one batch of each of the {len(names)} tasks; use at least {len(names)}")
    choices = ["overall"] + [f"{t.name}.{m}" for t in cfg.trained_tasks() if t.dev for m in dev_metrics(t)]
    if cfg.train.select_metric not in choices:
        evaluated_only = [t.name for t in cfg.tasks if t.eval_only]
        fail("train.select_metric", cfg.train.select_metric, f"choose one of {choices} (a task's metrics "
             "exist only when it has a dev split" + (f"; eval-only tasks ({', '.join(evaluated_only)}) never pick "
                                                     "the checkpoint" if evaluated_only else "") + ")")
    if cfg.train.mode == "lp_ft" and cfg.train.lp_steps <= 0:
        fail("train.lp_steps", cfg.train.lp_steps, "train.mode = lp_ft needs train.lp_steps > 0")
    if cfg.train.mode == "lp_ft" and cfg.train.max_steps is not None and cfg.train.lp_steps >= cfg.train.max_steps:
        fail("train.lp_steps", cfg.train.lp_steps, f"lp_ft fine-tunes after lp_steps, but train.max_steps = "
             f"{cfg.train.max_steps} ends training first")
    check("train.cagrad.rescale", cfg.train.cagrad.rescale, CHOICES["train.cagrad.rescale"])
    if not (_finite(cfg.train.cagrad.c) and cfg.train.cagrad.c >= 0):
        fail("train.cagrad.c", cfg.train.cagrad.c, "use a finite number >= 0")
    if not (_finite(cfg.train.gradvac.beta) and 0.0 < cfg.train.gradvac.beta <= 1.0):
        fail("train.gradvac.beta", cfg.train.gradvac.beta, "use a number in (0, 1]")
    _validate_task_layers(cfg.model, names, fail)
    _validate_encoder(cfg.model, fail, where)
    _validate_deepspeed(cfg, fail)


def _validate_report_to(names: list[str], fail, check, installed: bool) -> None:
    from mtkit.report import BACKENDS, missing_package
    for name in names:
        check("train.report_to", name, BACKENDS)
    if len(set(names)) != len(names):
        fail("train.report_to", names, "name each backend once")
    for name in names if installed else ():  # now, not when the backend opens after the model and data are built
        problem = missing_package(name)
        if problem:
            fail("train.report_to", names, problem)


def _validate_task_layers(model: ModelConfig, names: list[str], fail) -> None:
    if model.task_layers < 0:
        fail("model.task_layers", model.task_layers, "use 0 (all shared) or more")
    if model.task_groups and not model.task_layers:
        fail("model.task_groups", model.task_groups, "needs model.task_layers > 0 (there are no tops to share)")
    grouped = [n for members in model.task_groups.values() for n in members]
    for name in grouped:
        if name not in names:
            fail("model.task_groups", model.task_groups, f"no task named {name!r}; tasks: {names}")
        if grouped.count(name) > 1:
            fail("model.task_groups", model.task_groups, f"task {name!r} is in more than one group")


def _validate_tasks(cfg: Config, fail, check) -> None:
    from mtkit.tasks.readers import DEFAULT_COLUMNS, FORMATS
    names = [t.name for t in cfg.tasks]
    if not cfg.tasks:
        fail("tasks", [], "declare at least one task (tasks: [...])")
    if len(set(names)) != len(names):
        fail("tasks", names, "task names must be unique")
    for t in cfg.tasks:
        key = f"tasks.{t.name}"
        if not t.name:
            fail(f"{key}.name", t.name, "every task needs a name")
        for field_name in ("kind", "decoder", "loss"):
            check(f"{key}.{field_name}", getattr(t, field_name), CHOICES[f"task.{field_name}"])
        check(f"{key}.format", t.format, {"auto", *FORMATS})
        for field_name, (ok, valid) in TASK_RANGES.items():
            value = getattr(t, field_name)
            if value is not None and not ok(value):
                fail(f"{key}.{field_name}", value, valid)
        if not t.train and not t.eval_only:
            fail(f"{key}.train", t.train, "every task needs a train split (a file or hf:NAME@SPLIT)")
        roles = set(DEFAULT_COLUMNS[t.kind])
        for columns in ("columns", "hub_columns"):
            unknown = sorted(set(getattr(t, columns)) - roles)
            if unknown:
                fail(f"{key}.{columns}", getattr(t, columns), f"unknown role(s) {unknown} for a {t.kind} task; "
                     f"roles: {sorted(roles)}")
        unknown = sorted(set(t.hub) - {"train", "dev", "test"})
        if unknown:
            fail(f"{key}.hub", t.hub, f"unknown split(s) {unknown}; splits: dev, test, train")
        if t.label_names is not None:
            if len(t.label_names) < 2 or len(set(t.label_names)) != len(t.label_names):
                fail(f"{key}.label_names", t.label_names, "use at least two distinct names")
            if t.num_labels is not None and t.num_labels != len(t.label_names):
                fail(f"{key}.num_labels", t.num_labels, f"but {len(t.label_names)} label_names are given")
        if t.kind in ("classification", "pair_classification") and not _label_count(t):
            fail(f"{key}.num_labels", t.num_labels, f"a {t.kind} task needs num_labels or label_names")
        if t.calibrate and not (t.kind in ("classification", "pair_classification") and _label_count(t) == 2):
            fail(f"{key}.calibrate", t.calibrate, f"calibrate sets a binary decision threshold; a {t.kind} "
                 f"task with {_label_count(t)} labels has none")
        if t.label_range is not None and not (len(t.label_range) == 2 and all(map(_finite, t.label_range))
                                              and t.label_range[0] < t.label_range[1]):
            fail(f"{key}.label_range", t.label_range, "use [low, high] with low < high")


EVAL_ONLY_FIT = {"classification": "probe_split", "pair_classification": "threshold_split"}


def _validate_eval_only(cfg: Config, fail) -> None:
    """An eval-only task is scored on its test split (its dev split when it declares no test), and what is
    fitted for it (a probe, a threshold) is fitted on another declared split of its own: never on the
    split it is scored on, never on a test split."""
    trained = [t.name for t in cfg.trained_tasks()]
    if not trained:
        fail("tasks", [t.name for t in cfg.tasks], "every task is eval_only; at least one task must train")
    for t in cfg.tasks:
        key = f"tasks.{t.name}"
        fit_field = EVAL_ONLY_FIT.get(t.kind)
        for name in ("probe_split", "threshold_split", "eval_with"):
            value = getattr(t, name)
            if value is None:
                continue
            if not t.eval_only:
                fail(f"{key}.{name}", value, "only for tasks with eval_only: true")
            if name != "eval_with" and name != fit_field:
                fail(f"{key}.{name}", value, f"an eval-only {t.kind} task fits "
                     + (f"its {fit_field}, not a {name}" if fit_field else "nothing"))
        if not t.eval_only:
            continue
        if t.kind == "sentences":
            fail(f"{key}.kind", t.kind, "unlabelled sentences have nothing to score; an eval-only task is "
                 "pair_regression, pair_classification, classification or contrastive")
        if not (t.dev or t.test):
            fail(f"{key}.test", t.test, "an eval-only task needs a test (or dev) split to be scored on")
        scored = "test" if t.test else "dev"
        if t.calibrate:
            fail(f"{key}.calibrate", t.calibrate, "an eval-only task has no head to calibrate")
        if t.joint:
            fail(f"{key}.decoder", t.decoder, "an eval-only task is scored from sentence embeddings; a "
                 "cross-encoder decoder needs a trained head")
        if t.kind == "pair_classification" and _label_count(t) != 2:
            fail(f"{key}.num_labels", _label_count(t), "an eval-only pair_classification task is scored by a "
                 "cosine threshold: it needs 2 labels")
        if fit_field:
            split = getattr(t, fit_field)
            what = "the logistic probe is fitted" if fit_field == "probe_split" else "the cosine threshold is chosen"
            if split is None:
                fail(f"{key}.{fit_field}", split, f"name the split {what} on: train or dev (declared by the task, "
                     f"not the {scored} split it is scored on)")
            if split not in ("train", "dev"):
                fail(f"{key}.{fit_field}", split, f"use train or dev: {what} on it, and fitting on test data "
                     "would tune on what is reported")
            if split == scored:
                fail(f"{key}.{fit_field}", split, f"{what} on it but the task is scored on its {scored} split "
                     "(it declares no test); declare a test split or fit on train")
            if getattr(t, split) is None:
                fail(f"{key}.{fit_field}", split, f"the task declares no {split} split")
        fits_on_train = fit_field is not None and getattr(t, fit_field) == "train"
        if t.train and not fits_on_train:
            fail(f"{key}.train", t.train, "an eval-only task is never trained; a train split is only read as "
                 "its probe_split/threshold_split")
        if t.name in {n for members in cfg.model.task_groups.values() for n in members}:
            fail("model.task_groups", cfg.model.task_groups, f"{t.name!r} is eval_only and has no encoder top; "
                 f"set tasks.{t.name}.eval_with to the task whose top embeds it")
        if t.eval_with is not None and t.eval_with not in trained:
            fail(f"{key}.eval_with", t.eval_with, f"name a trained task, one of {trained}")
        if cfg.model.task_layers and t.eval_with is None:
            fail(f"{key}.eval_with", t.eval_with, f"with model.task_layers the encoder's top layers belong to "
                 f"trained tasks; name the one whose top embeds this eval-only task, one of {trained}")


def _validate_encoder(model: ModelConfig, fail, where: _Where) -> None:
    hf = encoder_config(model)
    if hf is None:
        return
    for key, value in model.arch.items():
        if not hasattr(hf, key):
            fail(f"model.arch.{key}", value, f"{type(hf).__name__} has no such field")
        setattr(hf, key, value)
    layers = getattr(hf, "num_hidden_layers", None)
    if model.task_layers and layers is not None and model.task_layers >= layers:
        fail("model.task_layers", model.task_layers, f"the encoder has {layers} layers; use 1..{layers - 1} so "
             "some stay shared")
    positions = getattr(hf, "max_position_embeddings", None)
    if positions is not None and model.max_length > positions:
        source = (f"model.arch.max_position_embeddings, {where('model.arch.max_position_embeddings')}"
                  if "max_position_embeddings" in model.arch else f"max_position_embeddings of {model.name_or_path}")
        fail("model.max_length", model.max_length, f"the encoder has {positions} positions ({source})")


def _validate_deepspeed(cfg: Config, fail) -> None:
    ds = cfg.deepspeed
    if ds.config is None:
        return
    try:
        values = read_deepspeed_json(ds.config)
    except ConfigError as e:
        fail("deepspeed.config", ds.config, str(e))
    problem = deepspeed_conflict(cfg, values, ds.config)  # the world size is checked at launch
    if problem:
        fail("deepspeed.config", ds.config, problem)
    stage = values.get("zero_optimization", {}).get("stage")
    if ds.zero_stage is None and stage == 3:  # deepspeed.zero_stage, when set, replaces the JSON's stage
        fail("deepspeed.config", ds.config, f"{ds.config} asks for ZeRO stage 3, which is not supported: "
             "diagnostics and per-head isolation need whole parameters on every rank (use 0, 1 or 2, or set "
             "deepspeed.zero_stage)")


def _line_of(before: str) -> int:
    """The 1-based line that follows the text `before`, with LF, CR and CRLF each ending a line."""
    return before.count("\n") + before.count("\r") - before.count("\r\n") + 1


class _Where:
    """Where a key came from, for error messages."""

    def __init__(self, source: str, lines: dict[str, int | str]):
        self.source, self.lines = source, lines

    def __call__(self, key: str) -> str:
        parts = key.split(".")
        for i in range(len(parts), 0, -1):  # an override of a whole section covers its keys
            if self.lines.get(".".join(parts[:i])) == "override":
                return f"override --{'.'.join(parts[:i])}"
        line = self.lines.get(key)
        if isinstance(line, tuple):  # (file, line): a key of an inherited (base:) file
            return f"{line[0]}:{line[1]}"
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
                raise ConfigError(f"override --{key}: no task named {part!r}; tasks: {names}")
            node = match[0]
        elif isinstance(node, dict):
            node = node.setdefault(part, [] if part == "tasks" else {})
        else:
            raise ConfigError(f"override --{key}: {'.'.join(parts[:i])} is {node!r} in {source}, not a mapping")
    if isinstance(node, list):
        raise ConfigError(f"override --{key}: address a task field as tasks.<name>.<field>")
    if not isinstance(node, dict):
        raise ConfigError(f"override --{key}: {'.'.join(parts[:-1])} is {node!r} in {source}, not a mapping")
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


# ---------------------------------------------------------------- help

def keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, Any, list | None, str]]:
    """Every settable key, as (dotted key, type, default, allowed values or None, the field's comment),
    read from the dataclasses themselves so that `mtkit train --help` cannot drift from them."""
    from mtkit.report import BACKENDS
    from mtkit.tasks.readers import FORMATS
    allowed = {**CHOICES, "task.format": {"auto", *FORMATS}, "train.predict": set(SPLITS),
               "train.report_to": set(BACKENDS)}
    hints, comments = typing.get_type_hints(cls), _field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp):
            out += keys(tp, key + ".")
        elif item is not None and dataclasses.is_dataclass(item):  # tasks, addressed by name
            out += keys(item, f"{key}.<name>.")
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            choices = allowed.get(key.replace("tasks.<name>.", "task."))
            out.append((key, tp, default, sorted(choices) if choices else None, comments.get(f.name, "")))
    return out


def keys_help(width: int = 100) -> str:
    """The config keys as help text: key, type, default, allowed values, and the comment on the field."""
    import textwrap
    rows = keys()
    pad = max(len(key) for key, *_ in rows)
    lines = []
    for key, tp, default, choices, comment in rows:
        head = f"  {key:<{pad}}  {_type_name(tp)} = {_shown(default)}"
        if choices:
            head += f"; {'each ' if typing.get_origin(tp) is list else ''}one of {', '.join(choices)}"
        lines.append(head)
        if comment and not (choices and set(comment.split(" | ")) == set(choices)):  # not just the choices
            lines += textwrap.wrap(comment, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args if a is not type(None)) + " | none"
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _shown(value: Any) -> str:
    """A default as it would be written on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) if value else "[]"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value) if value != "" else '""'


def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line and on the comment-only lines below it, from the source."""
    import inspect
    import re
    comments: dict[str, str] = {}
    current = None
    for line in inspect.getsource(cls).splitlines()[1:]:
        field_line = re.match(r"    (\w+): [^#]*?(?:#\s?(.*))?$", line)
        if field_line:
            current = field_line.group(1)
            comments[current] = (field_line.group(2) or "").strip()
        elif current and re.match(r"\s{8,}#", line):  # a comment continued on the next line
            comments[current] = (comments[current] + " " + line.strip().lstrip("#").strip()).strip()
        else:
            current = None
    return comments
