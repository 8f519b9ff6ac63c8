"""Property tests: readers and the config loader either read back exactly what was written, or raise their
own error (DataError / ConfigError) located at a file and line; never another exception.

Deterministic and quick: derandomized, a modest number of examples each, no example database."""
from __future__ import annotations

import codecs
import csv
import io
import json
import math

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from mtkit import config as config_mod
from mtkit.config import ConfigError
from mtkit.tasks import DataError, read_examples

SETTINGS = settings(derandomize=True, deadline=None, database=None, max_examples=60,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Problems about a whole file rather than one of its lines.
FILE_LEVEL = ("empty file: no header row", "no rows: the dataset is empty", "rows have an empty label")

# Any text Python can encode as UTF-8, with the characters that trouble delimited files drawn often.
TRICKY = st.sampled_from(["\t", ",", '"', "'", "\r", "\n", "\r\n", " ", "\ufeff", "\x00", "\x85", "\u2028", "é",
                          "\U0001f600"])
TEXT = st.lists(st.one_of(st.text(max_size=8), TRICKY), max_size=6).map("".join)
SENTENCE = TEXT.filter(lambda t: t.strip() != "")
ID = st.text("abcXYZ019-_", min_size=1, max_size=6)
NEWLINE = st.sampled_from(["\n", "\r\n"])


def physical_line(data: bytes, offset: int) -> int:
    """1-based line of byte `offset`, with LF, CR and CRLF each ending one line."""
    before = data[:offset]
    return before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1


def read_or_error(path, **kwargs):
    """Examples, or the DataError; any other exception fails the test. A DataError names the file and,
    unless it is about the whole file, a line."""
    try:
        return read_examples(path, **kwargs)
    except DataError as err:
        assert err.path == str(path) and str(err).startswith(f"{path}")
        assert err.line is not None or any(p in err.problem for p in FILE_LEVEL) or "missing column" in err.problem, \
            str(err)
        return err


def write_delimited(path, header, rows, *, delimiter, newline, bom) -> None:
    """A well-formed file: every field holding a CR or LF quoted. (Python's writer leaves a lone CR
    unquoted when the line terminator is LF; readers, ours too, take that CR for a line break.)"""
    out = []
    for row in [header, *rows]:
        buf = io.StringIO()
        csv.writer(buf, delimiter=delimiter, lineterminator="\r\n").writerow(row)  # quotes CR and LF
        out.append(buf.getvalue()[:-2] + newline)
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + "".join(out).encode("utf-8"))


# --- round trips --------------------------------------------------------------------------------------


@SETTINGS
@given(rows=st.lists(st.tuples(ID, SENTENCE, st.integers(0, 4), st.booleans()), min_size=1, max_size=6),
       fmt=st.sampled_from(["cs224n", "tsv", "csv", "auto"]), newline=NEWLINE, bom=st.booleans())
def test_classification_files_round_trip(tmp_path, rows, fmt, newline, bom):
    delimiter = "," if fmt == "csv" else "\t"
    path = tmp_path / "sst.csv"
    # The CS224N layout: an unnamed index column first; labels as "3" or "3.0".
    write_delimited(path, ["", "id", "sentence", "sentiment"],
                    [[i, id_, text, f"{label}.0" if dotted else label]
                     for i, (id_, text, label, dotted) in enumerate(rows)],
                    delimiter=delimiter, newline=newline, bom=bom)
    examples = read_examples(path, kind="classification", fmt=fmt, num_labels=5)
    assert [(e.id, e.texts, e.label) for e in examples] == [
        (id_, (text.strip(),), label) for id_, text, label, _ in rows]


@SETTINGS
@given(rows=st.lists(st.tuples(SENTENCE, SENTENCE, st.floats(0, 5)), min_size=1, max_size=6),
       fmt=st.sampled_from(["tsv", "csv"]), newline=NEWLINE, bom=st.booleans(),
       names=st.sampled_from([("a", "b", "score"), ("q 1", 'q"2', "lab,el")]))
def test_pair_files_with_column_maps_round_trip(tmp_path, rows, fmt, newline, bom, names):
    path = tmp_path / f"pairs.{fmt}"
    write_delimited(path, [names[2], names[0], names[1]], [[repr(y), a, b] for a, b, y in rows],
                    delimiter="," if fmt == "csv" else "\t", newline=newline, bom=bom)
    examples = read_examples(path, kind="pair_regression", fmt=fmt, label_range=(0, 5),
                             columns={"text1": names[0], "text2": names[1], "label": names[2]})
    # Without an id column, ids are the physical line numbers of the rows (a quoted newline spans lines).
    text = path.read_bytes().decode("utf-8-sig").replace("\r\n", "\n")
    assert [(e.texts, e.label) for e in examples] == [((a.strip(), b.strip()), y) for a, b, y in rows]
    assert int(examples[-1].id) == text.rstrip("\n").count("\n") + text.rstrip("\n").count("\r") + 1


@SETTINGS
@given(rows=st.lists(st.tuples(ID, SENTENCE, SENTENCE, SENTENCE), min_size=1, max_size=6),
       newline=NEWLINE, bom=st.booleans(), ascii_only=st.booleans(), blank=st.sampled_from(["", " ", "\t"]))
def test_jsonl_round_trip(tmp_path, rows, newline, bom, ascii_only, blank):
    path = tmp_path / "nli.jsonl"
    lines = [json.dumps({"k": id_, "p": a, "e": b, "c": c, "extra": [1]}, ensure_ascii=ascii_only)
             for id_, a, b, c in rows]
    body = newline.join(line for pair in zip(lines, [blank] * len(lines)) for line in pair)  # blank lines too
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + body.encode("utf-8"))
    examples = read_examples(path, kind="contrastive",
                             columns={"id": "k", "anchor": "p", "positive": "e", "negative": "c"})
    assert [(e.id, e.texts, e.label) for e in examples] == [
        (id_, (a.strip(), b.strip(), c.strip()), None) for id_, a, b, c in rows]


@SETTINGS
@given(texts=st.lists(SENTENCE.map(lambda t: t.replace("\r", " ").replace("\n", " ")), min_size=1, max_size=8),
       newline=NEWLINE, bom=st.booleans(), final=st.booleans())
def test_lines_round_trip(tmp_path, texts, newline, bom, final):
    assume(bom or not texts[0].startswith("\ufeff"))  # U+FEFF opening a file is its byte order mark
    path = tmp_path / "wiki.txt"
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + (newline.join(texts) + (newline if final else "")).encode())
    examples = read_examples(path, kind="sentences")
    assert [(e.id, e.texts) for e in examples] == [(str(i), (t.strip(),)) for i, t in enumerate(texts, 1)]


# --- bad input: the reader's own error, at the right line ------------------------------------------------


@SETTINGS
@given(width=st.integers(1, 5), counts=st.lists(st.integers(1, 7), min_size=1, max_size=6),
       fmt=st.sampled_from(["csv", "tsv"]), newline=NEWLINE)
def test_wrong_field_count_is_reported_at_its_line(tmp_path, width, counts, fmt, newline):
    path = tmp_path / f"x.{fmt}"
    header = ["sentence"] + [f"c{i}" for i in range(1, width)]
    rows = [[f"w{i}" for i in range(n)] for n in counts]
    write_delimited(path, header, rows, delimiter="," if fmt == "csv" else "\t", newline=newline, bom=False)
    got = read_or_error(path, kind="sentences", fmt=fmt)
    bad = [i for i, n in enumerate(counts) if n != width]
    if not bad:
        assert [e.texts for e in got] == [("w0",)] * len(counts)
        return
    assert isinstance(got, DataError) and got.line == bad[0] + 2
    assert got.problem == f"row has {counts[bad[0]]} fields but the header has {width}"


HEADERS = {"csv": b"id,sentence,sentiment\n", "tsv": b"id\tsentence\tsentiment\n",
           "cs224n": b"\tid\tsentence\tsentiment\n", "jsonl": b"", "lines": b"", "auto": b""}


@SETTINGS
@given(fmt=st.sampled_from(sorted(HEADERS)), header=st.booleans(),
       body=st.one_of(st.binary(max_size=200),
                      st.lists(st.one_of(st.binary(max_size=6),
                                         st.sampled_from([b"\xff", b"\xc3", b"\xe2\x82", b"\r", b"\n", b"\t", b",",
                                                          b'"', b"{", b"}", b'"sentence": ', b"1", b"\xef\xbb\xbf",
                                                          "é".encode(), b"\xed\xa0\x80"])),
                               max_size=30).map(b"".join)))
def test_arbitrary_bytes_load_or_raise_a_located_data_error(tmp_path, fmt, header, body):
    kind = "sentences" if fmt == "lines" else "classification"
    path = tmp_path / ("x.txt" if fmt == "lines" else "x.jsonl" if fmt == "jsonl" else "x.csv")
    data = (HEADERS[fmt] if header else b"") + body
    path.write_bytes(data)
    got = read_or_error(path, kind=kind, fmt=fmt, num_labels=5)
    text = data[3:] if data.startswith(codecs.BOM_UTF8) else data
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as exc:  # located independently of the reader
        assert isinstance(got, DataError) and "not UTF-8 text" in got.problem, got
        assert got.line == physical_line(text, exc.start), (got, text)
    else:
        assert isinstance(got, (DataError, list)), got
        if isinstance(got, list):
            assert all(e.texts and all(t == t.strip() and t for t in e.texts) for e in got)
            assert all(e.label is None or e.label in range(5) for e in got)


@SETTINGS
@given(value=st.one_of(st.integers(-10 ** 400, 10 ** 400), st.floats(), st.booleans(), st.none(), st.text(max_size=5),
                       st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(),
                                                                             max_size=2)),
       role=st.sampled_from(["sentence", "sentiment", "id"]))
def test_any_json_value_in_any_column(tmp_path, value, role):
    path = tmp_path / "x.jsonl"
    row = {"id": "a", "sentence": "fine", "sentiment": 1, role: value}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    got = read_or_error(path, kind="classification", num_labels=5)
    if isinstance(got, DataError):
        assert got.line == 1 or (role == "sentiment" and "empty label" in got.problem), got
    else:
        [e] = got
        assert e.texts == (row["sentence"].strip(),) and e.label == int(float(row["sentiment"]))


# --- the config loader ------------------------------------------------------------------------------


@SETTINGS
@given(data=st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from([b"train:\n", b"  seed: 1\n", b"tasks:\n", b"  - name: a\n", b"    kind: x\n",
                              b"model: {arch: {hidden_size: 0}}\n", b"- ", b": ", b"{", b"[", b"\t", b"\r\n",
                              b"\xff", b"\xef\xbb\xbf", b"\x00", b"&a ", b"*a", b"!!python/object ", b"? ",
                              b"train: 5\n", b"epochs: .nan\n"]), max_size=25).map(b"".join)))
def test_config_bytes_load_or_raise_a_located_config_error(tmp_path, data):
    path = tmp_path / "x.yaml"
    path.write_bytes(data)
    try:
        cfg = config_mod.load(path)
    except ConfigError as err:
        assert str(err).startswith(str(path)), str(err)
        text = data[3:] if data.startswith(codecs.BOM_UTF8) else data
        try:
            text.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = physical_line(text, exc.start)
            assert str(err).startswith(f"{path}:{line}: not UTF-8 text"), str(err)
        return
    assert cfg.tasks  # loading needs at least one valid task


# Each numeric setting: (type, None allowed, the valid range as the user-facing contract states it).
COUNT = lambda v: v >= 1  # noqa: E731
SPEC = {
    "model.max_length": (int, False, lambda v: 3 <= v <= 512),  # the bundled encoder's 512 positions
    "model.embed_chunk": (int, True, COUNT),
    "data.temperature": (float, False, lambda v: 0 < v < math.inf),
    "data.bucket": (int, False, COUNT),
    "optim.encoder_lr": (float, False, lambda v: 0 <= v < math.inf),
    "optim.warmup_ratio": (float, False, lambda v: 0 <= v < 1),
    "optim.eps": (float, False, lambda v: 0 < v < math.inf),
    "train.epochs": (float, False, lambda v: 0 < v < math.inf),
    "train.max_steps": (int, True, COUNT),
    "train.batch_size": (int, False, COUNT),
    "train.grad_accum": (int, False, COUNT),
    "train.eval_every": (int, True, COUNT),
    "train.eval_batch_size": (int, False, COUNT),
    "train.log_every": (int, False, COUNT),
    "train.seed": (int, False, lambda v: 0 <= v < 2 ** 32 - 1024),
    "diagnostics.every": (int, False, COUNT),
    "diagnostics.probe_batch_size": (int, False, COUNT),
    "diagnostics.stream_beta": (float, False, lambda v: 0 <= v < 1),
    "deepspeed.zero_stage": (int, True, lambda v: v in (0, 1, 2)),
    "tasks.sst.lr": (float, False, lambda v: 0 <= v < math.inf),
    "tasks.sst.dropout": (float, False, lambda v: 0 <= v < 1),
    "tasks.sst.temperature": (float, False, lambda v: 0 < v < math.inf),
    "tasks.sst.batch_size": (int, True, COUNT),
    "tasks.sst.num_labels": (int, True, lambda v: v == 5),  # as many as the task's label_names
    "tasks.sst.weight": (float, False, lambda v: 0 <= v < math.inf),
}
TASK = ["tasks:", "  - name: sst", "    kind: classification", "    train: sst/ids-sst-train.csv",
        "    dev: sst/ids-sst-dev.csv", "    label_names: [a, b, c, d, e]"]
MODEL = ["model:", "  random_init: true",
         "  arch: {hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 64}"]

_BAD = object()


def coerced(tp, optional, value):
    """What a typed field makes of a YAML value or an override string: the number, None, or _BAD."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        return None if optional else _BAD
    if isinstance(value, bool):
        return _BAD
    if isinstance(value, str):
        try:
            value = tp(value)
        except (ValueError, OverflowError):
            return _BAD
    if tp is int and isinstance(value, float):
        return int(value) if value.is_integer() else _BAD
    return tp(value)


@SETTINGS
@given(key=st.sampled_from(sorted(SPEC)), via=st.sampled_from(["yaml", "override"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-3, 2 ** 33), st.floats(-2, 1e6),
                       st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e-300, 0.5, 1.0, 512, 513, 2]),
                       st.text("0123456789.-e xn", max_size=5)))
def test_each_setting_loads_iff_valid_and_errors_are_located(tmp_path, key, via, value):
    tp, optional, valid = SPEC[key]
    section, name = key.rsplit(".", 1)
    lines = list(TASK) + list(MODEL)
    if via == "yaml":
        scalar = json.dumps(value) if isinstance(value, str) else "null" if value is None else \
            str(value).lower() if isinstance(value, bool) else \
            {math.inf: ".inf", -math.inf: "-.inf"}.get(value, ".nan" if value != value else repr(value))
        if section.startswith("tasks."):
            lines.insert(len(TASK), f"    {name}: {scalar}")
        elif section == "model":
            lines.append(f"  {name}: {scalar}")
        else:
            lines += [f"{section}:", f"  {name}: {scalar}"]
        line = next(i for i, text in enumerate(lines, 1) if text.startswith(f"  {name}: ") or
                    text.startswith(f"    {name}: "))
        overrides, where = {}, None
    else:
        value = "none" if value is None else str(value)
        overrides = {key: value}
    path = tmp_path / "x.yaml"
    path.write_text("\n".join(lines) + "\n")
    where = f"{path}:{line}" if via == "yaml" else f"override --{key}"
    if via == "yaml":
        value = yaml.safe_load(f"v: {scalar}")["v"]  # what the user wrote, as YAML reads it
    expected = coerced(tp, optional, value)
    if expected is not _BAD and (expected is None or valid(expected)):
        cfg = config_mod.load(path, overrides)
        got = cfg.task("sst") if section.startswith("tasks.") else getattr(cfg, section)
        assert getattr(got, name) == expected and type(getattr(got, name)) is type(expected)
    else:
        with pytest.raises(ConfigError) as err:
            config_mod.load(path, overrides)
        assert str(err.value).startswith(f"{where}: {key} "), str(err.value)
