"""Exports of trained models.

Encoder: a sentence-transformers folder. `SentenceTransformer(folder)` encodes exactly as the run's encoder
(its pooling, its max_length), and the transformer sits at the top level, so `AutoModel.from_pretrained(folder)`
loads it too. Next to it: `mtkit_encoder.json` (pooling, max_length, tasks) and a model card (`README.md`)
with the tasks, their data files, the dev metrics, the gradient-conflict summary and the config. With
task-specific layers (model.task_layers) there is one such folder per task group, `<path>/<group>/`, each a
complete encoder (shared trunk plus that group's top layers), and `<path>/groups.json` maps each group to
its tasks. Whole multi-task model: the run folder itself, i.e. `config.json` (the resolved mtkit config) +
`best/model.pt` (state dict of encoder and heads), which is what `mtkit eval RUN_DIR` loads.

sentence-transformers (the `st` extra) is imported here only, when an export runs.
"""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import yaml
from torch import nn

from mtkit.config import BUNDLED_MODEL, Config, to_dict

MARKERS = ("mtkit_encoder.json", "groups.json")  # what tells an earlier export apart from other folders


class ExportError(ValueError):
    pass


def export_encoder(model, tokenizer, cfg: Config, path: Path, run_dir: Path | None = None,
                   normalize: bool = False, checkpoint: str | None = None) -> Path:
    """Write the encoder of `model` to `path` (an earlier export there is replaced). `run_dir`, when given,
    supplies the model card's dev metrics and conflict summary; `normalize` appends a unit-length
    normalisation; `checkpoint` names the weights when they are not the run's best."""
    path = Path(path)
    run = _run_facts(run_dir)  # before anything is removed: a damaged results.json stops the export
    _clear(path)
    encoder = model.encoder
    if not encoder.tops:
        _save(encoder.bert, tokenizer, cfg, path, list(model.tasks), run, normalize, checkpoint)
        return path
    members: dict[str, list[str]] = {}
    for task, group in model.top_of.items():
        members.setdefault(group, []).append(task)
    for group, top in encoder.tops.items():
        bert = copy.deepcopy(encoder.bert)
        bert.encoder.layer = nn.ModuleList([*bert.encoder.layer, *copy.deepcopy(top)])
        _save(bert, tokenizer, cfg, path / group, members[group], run, normalize, checkpoint, group)
    (path / "groups.json").write_text(json.dumps(members, indent=2))
    (path / "README.md").write_text(_groups_card(cfg, members))
    return path


def push_to_hub(path: Path, repo_id: str, private: bool = False, group: str | None = None) -> str:
    """Upload an exported encoder folder (one group's, for an export with task-specific layers) to the
    Hugging Face Hub as a model repository, creating it when needed. Returns the commit URL."""
    from huggingface_hub import HfApi
    path = Path(path)
    groups = json.loads((path / "groups.json").read_text()) if (path / "groups.json").exists() else None
    if groups is not None:
        if group not in groups:
            raise ExportError(f"{path} holds one encoder per task group ({', '.join(groups)}): pass --group "
                              "with one of them to push that group's encoder")
        path = path / group
    elif group is not None:
        raise ExportError(f"--group {group}: {path} has no task groups (the run has no model.task_layers)")
    if not (path / "modules.json").exists():
        raise ExportError(f"{path} is not an exported encoder (no modules.json); run `mtkit export` first")
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    # The folder holds exactly what the export wrote (_clear removed anything older), so all of it goes.
    info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(path),
                             commit_message="Upload sentence encoder exported by mtkit")
    return str(getattr(info, "commit_url", info))


def _clear(path: Path) -> None:
    """Make `path` an empty folder; only an earlier export is removed, never anything else."""
    if path.is_file():
        raise ExportError(f"{path} is a file; the export needs a folder")
    if path.is_dir() and any(path.iterdir()):
        if not any((path / m).exists() for m in MARKERS):
            raise ExportError(f"{path} is not empty and holds no earlier mtkit export (no "
                              f"{' or '.join(MARKERS)}); choose a new or empty folder")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)


def _save(bert, tokenizer, cfg: Config, path: Path, tasks: list[str], run: dict, normalize: bool,
          checkpoint: str | None, group: str | None = None) -> None:
    try:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    except ImportError as e:
        raise ExportError(f"exporting an encoder needs sentence-transformers >= 6.2 ({e}); "
                          "pip install 'mtkit[st]'") from None
    pooler = cfg.model.pooling == "pooler"
    hidden = bert.config.hidden_size
    with tempfile.TemporaryDirectory() as tmp:
        # sentence-transformers builds its Transformer module from a folder (the weights round-trip
        # exactly); without our pooler the HF model must not grow a fresh random one.
        bert.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        modules = [Transformer(tmp, max_seq_length=cfg.model.max_length,
                               model_kwargs={"add_pooling_layer": pooler}),
                   Pooling(hidden, "mean" if cfg.model.pooling == "mean" else "cls")]
        if pooler:
            # Pooling has no "pooler" mode: BERT's pooler is tanh(W h_CLS + b), i.e. CLS pooling then a
            # Dense layer with tanh that carries the pooler's weights.
            dense = bert.pooler.dense
            modules.append(Dense(hidden, hidden, activation_function=nn.Tanh(),
                                 init_weight=dense.weight.detach().clone(), init_bias=dense.bias.detach().clone()))
        if normalize:
            modules.append(Normalize())
        SentenceTransformer(modules=modules, device="cpu").save(str(path), create_model_card=False)
    (path / "mtkit_encoder.json").write_text(json.dumps(
        {"pooling": cfg.model.pooling, "max_length": cfg.model.max_length, "normalize": normalize,
         "trained_from": cfg.model.name_or_path, "run": cfg.name, "tasks": tasks}, indent=2))
    (path / "README.md").write_text(model_card(cfg, tasks, run, normalize, checkpoint, group, hidden,
                                               bert.config.num_hidden_layers))


# ---------------------------------------------------------------- model card

POOLING_TEXT = {"mean": "mean of the token states (padding masked)", "cls": "the [CLS] token state",
                "pooler": "the [CLS] token state through BERT's pooler (dense + tanh)"}
HF_POOLING = {"mean": "average `last_hidden_state` over the tokens where `attention_mask` is 1",
              "cls": "take `last_hidden_state[:, 0]`", "pooler": "take `pooler_output`"}

MINILM_CAVEAT = (
    "**Caveat:** the base model, all-MiniLM-L6-v2, was itself trained by sentence-transformers on about 1B "
    "sentence pairs, among them Quora duplicate questions and NLI pairs. Scores on Quora, STS or NLI data "
    "are therefore not comparable with those of an encoder that never saw such pairs.")


def _run_facts(run_dir: Path | None) -> dict:
    """What the card reports about the run: results.json and the diagnostics summary, when present."""
    facts: dict = {"run_dir": run_dir}
    if run_dir is None:
        return facts
    results = Path(run_dir) / "results.json"
    if results.exists():
        try:
            facts["results"] = json.loads(results.read_text())
        except ValueError as e:
            raise ExportError(f"{results}: not valid JSON ({e}); the model card reads its dev metrics") from None
    if (Path(run_dir) / "diagnostics.jsonl").exists():
        from diagnostics.report import format_table, summarize_run
        facts["conflicts"] = format_table(summarize_run(run_dir))
    return facts


def _base_model(cfg: Config) -> str | None:
    """The Hub id of the starting weights, for the card's metadata (None: random or local weights)."""
    if cfg.model.random_init:
        return None
    if cfg.model.name_or_path == BUNDLED_MODEL:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return None if Path(cfg.model.name_or_path).exists() else cfg.model.name_or_path


def model_card(cfg: Config, tasks: list[str], run: dict, normalize: bool = False, checkpoint: str | None = None,
               group: str | None = None, hidden: int | None = None, layers: int | None = None) -> str:
    """README.md of an exported encoder: what it is, how to load it, what it was trained on and how well."""
    base = _base_model(cfg)
    meta = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
            "tags": ["sentence-transformers", "feature-extraction", "sentence-similarity", "mtkit"]}
    if base:
        meta["base_model"] = base
    start = (f"random weights in the architecture of `{cfg.model.name_or_path}`" if cfg.model.random_init
             else f"`{cfg.model.name_or_path}`")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {cfg.name}" + (f" ({group} group)" if group else ""), "",
             f"A sentence encoder fine-tuned with mtkit (one shared encoder, one head per task) from {start} on "
             f"{', '.join(tasks)}. The task heads are not part of this folder.", "",
             "```python", "from sentence_transformers import SentenceTransformer",
             'model = SentenceTransformer("PATH_OR_REPO")',
             'embeddings = model.encode(["A sentence to embed.", "Another one."])', "```", "",
             "The transformer is also a plain Hugging Face model (`AutoModel.from_pretrained`): "
             + HF_POOLING[cfg.model.pooling]
             + (", then divide by the norm" if normalize else "") + " to get the same embeddings."
             + ("" if cfg.model.pooling == "pooler" else " The BERT pooler is not part of this model: loading "
                "reports its weights as missing (newly initialised), which does not affect these embeddings."), "",
             "## Encoder", "", "| | |", "|---|---|",
             f"| starting weights | {start} |",
             f"| pooling | `{cfg.model.pooling}`: {POOLING_TEXT[cfg.model.pooling]} |",
             f"| max_seq_length | {cfg.model.max_length} tokens (longer texts are truncated) |",
             f"| normalised | {'yes (unit length)' if normalize else 'no'} |"]
    if hidden:
        lines.append(f"| embedding size | {hidden} |")
    if layers:
        split = f" ({layers - cfg.model.task_layers} shared, {cfg.model.task_layers} of this group)" if group \
            else ""
        lines.append(f"| layers | {layers}{split} |")
    lines += ["", "## Tasks", "", "Data files as named in the config (relative to its data root).", "",
              "| task | kind | head | train | dev | test | loss weight |", "|---|---|---|---|---|---|---|"]
    for name in tasks:
        t = cfg.task(name)
        if t.kind in ("pair_classification", "pair_regression"):
            head = f"`{t.decoder}` decoder"
        else:
            head = f"MLP ({t.head_hidden})" if t.head_hidden else "linear"
        files = " | ".join(f"`{f}`" if f else "-" for f in (t.train, t.dev, t.test))
        lines.append(f"| {name} | {t.kind} | {head} | {files} | {t.weight:g} |")
    lines += ["", "## Dev metrics", ""]
    results = run.get("results")
    if results:
        dev = results.get("dev") or {}
        lines += [f"From the run's `results.json`: its best evaluation by `{cfg.train.select_metric}`, at step "
                  f"{results.get('best_step')} of {results.get('steps')}"
                  + (f"; the exported weights are from `{checkpoint}`, which may be another step." if checkpoint
                     else " (the exported weights)."), "", "| task | metric | value |", "|---|---|---|"]
        for task in tasks:
            lines += [f"| {task} | {m} | {v:.4f} |" for m, v in (dev.get(task) or {}).items()
                      if isinstance(v, (int, float))]
        if isinstance(dev.get("overall"), (int, float)):
            lines.append(f"| all tasks of the run | CS224N overall | {dev['overall']:.4f} |")
        if any(cfg.task(t).kind == "pair_regression" for t in tasks):
            lines += ["", "Regression tasks: `pearson`/`spearman` score the head's output (the CS224N protocol), "
                      "`cosine_pearson`/`cosine_spearman` the cosine of the two embeddings (the SBERT protocol)."]
    else:
        lines.append("The run has no `results.json` (it did not finish).")
    if run.get("conflicts"):
        lines += ["", "## Gradient conflicts during training", "",
                  "Per task pair, the cosine between the task gradients on the shared encoder (diagnostics "
                  f"`{cfg.diagnostics.mode}` every {cfg.diagnostics.every} steps, as `mtkit diagnose RUN_DIR` "
                  "prints it):", "", "```", run["conflicts"], "```"]
    lines += ["", "## How it was made", ""]
    if results:
        lines.append(f"Engine `{results.get('engine')}` on {results.get('world_size')} rank(s), seed "
                     f"{results.get('seed')}, git commit `{results.get('git_commit')}`.")
    lines += ["Trained with the resolved config below: save it as `config.yaml` and run "
              "`mtkit train --config config.yaml --out runs/x` to train it again. Exported with "
              "`mtkit export RUN_DIR" + (f" --checkpoint {checkpoint}" if checkpoint else "")
              + (" --normalize" if normalize else "") + "`.", "",
              "<details><summary>config</summary>", "", "```yaml",
              yaml.safe_dump(to_dict(cfg), sort_keys=False).strip(), "```", "", "</details>"]
    if cfg.model.name_or_path == BUNDLED_MODEL and not cfg.model.random_init:
        lines += ["", MINILM_CAVEAT]
    return "\n".join(lines) + "\n"


def _groups_card(cfg: Config, members: dict[str, list[str]]) -> str:
    lines = [f"# {cfg.name}: one encoder per task group", "",
             f"The top {cfg.model.task_layers} layer(s) were task-specific (`model.task_layers`), so each "
             "group has its own complete encoder in its own folder, each with its own model card:", "",
             "| folder | tasks |", "|---|---|"]
    lines += [f"| [`{g}/`]({g}/README.md) | {', '.join(ts)} |" for g, ts in members.items()]
    return "\n".join(lines) + "\n"
