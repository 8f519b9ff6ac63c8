"""The Python API (`mtkit.train`, `mtkit.load`, `Model.encode` / `Model.predict`), checked against the paths the
command line takes: embeddings against `mtkit.evaluate.embed_split` on a model rebuilt from the run folder,
predictions against the prediction files the run's evaluation wrote, in-memory data against the same rows
read from CS224N files. Also: `mtkit:configs/...` paths, `__version__`, and the README's Python example.
"""
from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
import yaml

import mtkit
from conftest import CONFIGS, REPO, write_toy_data
from mtkit import config as config_mod
from mtkit.api import IN_MEMORY, _raw_config, write_split
from mtkit.checkpoint import model_weights
from mtkit.data.dataset import load_tasks
from mtkit.evaluate import embed_split
from mtkit.model import build_model
from mtkit.model.encoder import load_tokenizer
from mtkit.run import read_run_config
from mtkit.tasks import DataError

SST_NAMES = ["very negative", "negative", "neutral", "positive", "very positive"]


def tiny_dict(root, cache) -> dict:
    """configs/debug_tiny.yaml as a dict, on the toy files, with task-specific tops (a shared one for the two
    pair tasks), named SST labels and a calibrated Quora threshold."""
    raw = yaml.safe_load((CONFIGS / "debug_tiny.yaml").read_text())
    raw["data"].update(root=str(root), cache_dir=str(cache))
    raw["model"].update(task_layers=1, task_groups={"pairs": ["quora", "sts"]})
    raw["diagnostics"] = {"mode": "off"}
    raw["train"].update(max_steps=6, eval_every=3, log_every=3)
    for t in raw["tasks"]:
        t.update(max_train=None, max_eval=None)
    raw["tasks"][0]["label_names"] = SST_NAMES
    raw["tasks"][0].pop("num_labels")
    raw["tasks"][1]["calibrate"] = 0.25
    return raw


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training twice: from the toy files, and with SST's splits and Quora's training rows given in
    memory (read from those files: a list of dicts, a datasets.Dataset, an override)."""
    tmp = tmp_path_factory.mktemp("api")
    root = write_toy_data(tmp / "data")
    files = mtkit.train(tiny_dict(root, tmp / "cache"), out=tmp / "files")

    raw = tiny_dict(root, tmp / "cache")
    tok = load_tokenizer(config_mod.load(None, raw).model)
    read = load_tasks(config_mod.load(None, raw), tok)
    sst_train = [{"id": e.id, "text": e.texts[0], "label": e.label} for e in read["sst"].splits["train"].examples]
    sst_dev = datasets.Dataset.from_list([{"id": e.id, "sentence": e.texts[0], "sentiment": SST_NAMES[e.label]}
                                          for e in read["sst"].splits["dev"].examples])
    quora = [{"id": e.id, "sentence1": e.texts[0], "sentence2": e.texts[1], "is_duplicate": e.label}
             for e in read["quora"].splits["train"].examples + read["quora"].splits["calib"].examples]
    quora.sort(key=lambda r: int(r["id"][len("qtrain"):]))  # file order (calibrate held rows out of it)
    raw["tasks"][0].update(train=sst_train, dev=sst_dev)
    memory = mtkit.train(raw, out=tmp / "memory", tasks__quora__train=quora)
    return tmp, files, memory


def test_in_memory_rows_train_exactly_like_the_same_rows_in_files(runs):
    tmp, files, memory = runs
    assert memory["dev"] == files["dev"]
    assert memory["best_step"] == files["best_step"]
    recorded = json.loads((tmp / "memory" / "results.json").read_text())["in_memory_data"]
    assert sorted(recorded) == ["quora.train", "sst.dev", "sst.train"]
    cfg = read_run_config(tmp / "memory")
    for key, rel in recorded.items():
        task, split = key.split(".")
        assert getattr(cfg.task(task), split) == str((tmp / "memory" / rel).resolve())
    # The files run's predictions (ids included) come back from the in-memory run.
    for name in ("sst", "quora", "sts"):
        assert ((tmp / "memory" / "predictions" / f"{name}-dev-output.csv").read_text()
                == (tmp / "files" / "predictions" / f"{name}-dev-output.csv").read_text())


def _reference(run_dir):
    """The run rebuilt without the API: config.json, best/model.pt, the dev splits as mtkit eval reads them."""
    cfg = read_run_config(run_dir)
    model = build_model(cfg)
    model.load_state_dict(model_weights(run_dir / "best" / "model.pt"))
    tokenizer = load_tokenizer(cfg.model)
    model.pad_id = tokenizer.pad_token_id
    return model.eval(), load_tasks(cfg, tokenizer, splits=("dev",))


def test_encode_equals_the_evaluation_embeddings_of_each_task_encoder(runs):
    tmp, _, _ = runs
    model = mtkit.load(tmp / "files", device="cpu")
    ref_model, tasks = _reference(tmp / "files")
    assert set(ref_model.top_of.values()) == {"sst", "pairs"}
    for name, task in tasks.items():
        want = embed_split(ref_model, task, "dev", 16, torch.device("cpu"))     # [n_texts, N, H]
        for k in range(want.shape[0]):
            texts = [e.texts[k] for e in task.splits["dev"].examples]
            got = model.encode(texts, batch_size=7, task=name)
            np.testing.assert_allclose(got, want[k].numpy(), atol=1e-5)
            unit = model.encode(texts, task=name, normalize=True)
            np.testing.assert_allclose(unit, want[k].numpy() / np.linalg.norm(want[k].numpy(), axis=1,
                                                                              keepdims=True), atol=1e-5)
    # The tops differ, so the task picks the encoder.
    assert not np.allclose(model.encode(["a good film"], task="sst"), model.encode(["a good film"], task="sts"))
    with pytest.raises(ValueError, match="task-specific top layers.*pass task=NAME"):
        model.encode(["a good film"])
    with pytest.raises(ValueError, match="no task named 'nope'"):
        model.encode(["a good film"], task="nope")


def _prediction_file(path):
    lines = path.read_text().splitlines()[1:]
    return [float(line.split(",")[1]) for line in lines]


def test_predict_equals_the_prediction_files_of_the_run(runs):
    tmp, files, _ = runs
    model = mtkit.load(tmp / "files", device="cpu")
    _, tasks = _reference(tmp / "files")
    for name, task in tasks.items():
        examples = task.splits["dev"].examples
        inputs = [e.texts[0] for e in examples] if task.cfg.kind == "classification" else [e.texts for e in examples]
        got = model.predict(name, inputs)
        want = _prediction_file(tmp / "files" / "predictions" / f"{name}-dev-output.csv")
        if name == "sst":
            assert all(isinstance(g, str) for g in got)
            got = [SST_NAMES.index(g) for g in got]
        np.testing.assert_allclose(got, want, atol=1e-5)
    # The calibrated threshold is refitted as mtkit eval does; training's evaluation of the same weights agrees.
    assert model.threshold("quora") == pytest.approx(files["dev"]["quora"]["threshold"], abs=1e-6)
    assert model.threshold("sst") is None
    with pytest.raises(TypeError, match="expected a list, got one string"):
        model.predict("sst", "a good film")
    with pytest.raises(TypeError, match=r"input 0 is 'a good film'; expected a \(text, text\) tuple"):
        model.predict("quora", ["a good film"])


def test_write_split_maps_roles_and_columns_and_names_files_by_content(tmp_path):
    cfg = config_mod.load(CONFIGS / "debug_tiny.yaml", {"tasks.sts.train": IN_MEMORY})
    sts = cfg.task("sts")
    rows = [{"text1": "a", "sentence2": "b", "label": np.float32(2.5), "extra": 1}, {"sentence1": "c", "text2": "d",
                                                                                    "similarity": 1}]
    path = write_split(tmp_path, sts, "train", rows)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"sentence1": "a", "sentence2": "b", "similarity": 2.5}, {"sentence1": "c", "sentence2": "d", "similarity": 1}]
    assert write_split(tmp_path, sts, "train", [dict(r) for r in rows]) == path
    assert write_split(tmp_path, sts, "train", rows[:1]) != path
    with pytest.raises(ValueError, match=r"tasks.sts.train: row 1 has no 'sentence2' \(or 'text2'\) field"):
        write_split(tmp_path, sts, "train", [rows[0], {"sentence1": "x", "label": 1}])
    with pytest.raises(TypeError, match="expected a file path, a list of dicts or a datasets.Dataset, got int"):
        write_split(tmp_path, sts, "train", 3)
    sts.format = "cs224n"
    with pytest.raises(ValueError, match="stored as JSONL, but tasks.sts.format = 'cs224n'"):
        write_split(tmp_path, sts, "train", rows)


def test_config_objects_and_dicts_hand_over_their_rows_and_stay_untouched():
    rows = [{"sentence": "a good film", "label": 1}]
    want = config_mod.load(CONFIGS / "debug_tiny.yaml", {"tasks.sst.train": IN_MEMORY, "train.seed": 3})
    cfg = config_mod.load(CONFIGS / "debug_tiny.yaml")
    cfg.task("sst").train = rows
    memory = {}
    assert config_mod.load(None, {**_raw_config(cfg, memory), "train.seed": 3}) == want
    assert memory == {("sst", "train"): rows} and cfg.task("sst").train is rows
    raw = yaml.safe_load((CONFIGS / "debug_tiny.yaml").read_text())
    raw["tasks"][0]["train"] = rows
    before = json.dumps(raw)
    memory = {}
    assert config_mod.load(None, {**_raw_config(raw, memory), "train.seed": 3}) == want
    assert memory == {("sst", "train"): rows} and json.dumps(raw) == before


def test_bad_in_memory_labels_are_reported_at_their_row(tmp_path):
    root = write_toy_data(tmp_path / "data")
    rows = [{"sentence": "a good film", "label": 1}, {"sentence": "bad", "label": 7}]
    with pytest.raises(DataError, match=r"sst-train-\w+\.jsonl:2: label 7 .* out of range"):
        mtkit.train("mtkit:configs/debug_tiny.yaml", tmp_path / "run", tasks__sst__train=rows,
                    **{"data.root": str(root), "data.cache_dir": str(tmp_path / "cache")})


def test_packaged_config_paths_resolve_to_the_shipped_files():
    assert config_mod.load("mtkit:configs/debug_tiny.yaml") == config_mod.load(CONFIGS / "debug_tiny.yaml")
    pipe = config_mod.load_pipeline("mtkit:configs/debug_tiny_simcse.yaml")  # stage configs resolve beside it
    assert [s.config for s in pipe.stages] == ["debug_tiny_nli.yaml", "debug_tiny.yaml"]
    ds = config_mod.read_deepspeed_json("mtkit:configs/deepspeed/zero2.json")
    assert ds == json.loads((CONFIGS / "deepspeed" / "zero2.json").read_text())
    for bad in ("mtkit:configs/nope.yaml", "mtkit:configs/../setup.py"):
        with pytest.raises(config_mod.ConfigError, match=f"{re.escape(bad)}: mtkit ships no such file; shipped: "
                           ".*mtkit:configs/debug_tiny.yaml"):
            config_mod.load(bad)
    with pytest.raises(config_mod.ConfigError, match="override --deepspeed.config: .*zero9.json: mtkit ships no"):
        config_mod.load("mtkit:configs/debug_tiny.yaml", {"deepspeed.config": "mtkit:configs/deepspeed/zero9.json"})


def test_version_is_the_installed_metadata_version_and_setup_reads_it():
    try:
        installed = importlib.metadata.version("mtkit")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mtkit is not installed (pip install -e .): no metadata to compare with")
    assert mtkit.__version__ == installed
    built = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    assert built[-1] == mtkit.__version__


def readme_python_example() -> str:
    """The fenced python block under the README's "Python API" heading."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MTKIT_DATA", str(write_toy_data(tmp_path / "data")))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_python_example(), "README.md (Python API)", "exec"), scope)
    assert scope["emb"].shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(scope["emb"], axis=1), 1.0, rtol=1e-5)
    assert json.loads((tmp_path / "runs/api_rows/results.json").read_text())["sizes"]["sst"]["train"] == 32
