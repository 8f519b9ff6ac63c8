"""Read task data into :class:`Example` lists.

Formats (``fmt``):

``cs224n``
    The CS224N minBERT files: tab-separated despite the ``.csv`` name, a header row and an
    unnamed leading index column, read by column name (so extra columns are ignored).
``tsv`` / ``csv``
    Tab- / comma-separated with a header row; columns by name, csv quoting (strict: a malformed
    quote is an error).
``jsonl``
    One JSON object per line; columns are keys.
``lines``
    Plain text, one sentence per line, for kinds with a single text role and no label
    (``sentences``, or any such kind read with ``labelled=False``).
``sick``
    SICK (SemEval-2014 task 1) ``SICK_*.txt``: tab-separated with the header ``pair_ID, sentence_A,
    sentence_B, relatedness_score, entailment_judgment``, read without quote processing. Default
    columns: relatedness (1-5) for ``pair_regression``, the entailment judgment for
    ``pair_classification`` (give ``label_names``).
``mrpc``
    The Microsoft Research Paraphrase Corpus ``msr_paraphrase_*.txt``: tab-separated with the header
    ``Quality, #1 ID, #2 ID, #1 String, #2 String``, read without quote processing; kind
    ``pair_classification`` (Quality 0/1).
``semeval_sts``
    A folder of one SemEval STS year: ``STS.input.<genre>.txt`` (two tab-separated sentences a line;
    further columns, such as sources, are ignored) with ``STS.gs.<genre>.txt`` (one gold score a line,
    empty when the pair was not scored: such pairs are skipped). Kind ``pair_regression``; every
    example carries its genre (``Example.group``) and the id ``<genre>-<line>``.
``hf``
    A Hugging Face ``datasets`` dataset named by the path ``hf:NAME[:CONFIG]@SPLIT``, e.g.
    ``hf:SetFit/sst5@train``, ``hf:glue:qqp@validation``, ``hf:sentence-transformers/stsb@test``.
    The config is separated by ``:`` because hub names themselves contain ``/``; SPLIT is
    required and may use ``datasets`` slicing (``train[:1000]``). Line numbers in errors and
    default ids are 0-based row indices.
``auto`` (default)
    ``hf:`` prefix -> hf; a folder -> semeval_sts; ``SICK*.txt`` -> sick; ``msr_paraphrase*.txt`` ->
    mrpc; ``.jsonl`` -> jsonl, ``.txt`` -> lines; otherwise the header line is sniffed: a tab means
    tab-separated (cs224n/tsv), else csv.

Files may have a UTF-8 BOM, CRLF line endings and no final newline. The public corpora (sick, mrpc,
semeval_sts) hold raw text with unbalanced quotes, so they are split on tabs with no quote processing.
Blank lines are skipped.
Line numbers in errors count physical lines (a quoted field may span several); bytes that are not UTF-8
are reported at their line.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, TextIO

from .base import DataError, Example, KindSpec, get_kind

log = logging.getLogger("mtkit.tasks")

Row = Mapping[str, Any]
# A format reader takes the path and the column names it must provide, and yields
# (physical line number, row) pairs in file order.
RowReader = Callable[[str, Sequence[str]], Iterator[tuple[int, Row]]]

DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "classification": {"id": "id", "text": "sentence", "label": "sentiment"},
    "pair_classification": {"id": "id", "text1": "sentence1", "text2": "sentence2", "label": "is_duplicate"},
    "pair_regression": {"id": "id", "text1": "sentence1", "text2": "sentence2", "label": "similarity"},
    "contrastive": {"id": "id", "anchor": "sent0", "positive": "sent1", "negative": "hard_neg"},
    "sentences": {"id": "id", "text": "sentence"},
}

# DictReader's restkey: collects fields beyond the header; no real header name can equal it.
_EXTRA_FIELDS = "\0extra"
# Row keys a reader may add beside the columns: the example's group (a SemEval STS genre), and the
# files its text and label come from when they are not `path` (a folder read as one dataset).
_GROUP = "\0group"
_FILES = "\0files"
_HF_PATH = re.compile(r"(?:hf:)?(?P<name>[^:@]+)(?::(?P<config>[^@]+))?@(?P<split>.+)")
_WARN_EXAMPLES = 5


def _open(path: str) -> TextIO:
    try:
        # newline="" lets csv see quoted newlines and CR/LF untranslated; utf-8-sig drops a BOM.
        return open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise DataError(path, None, "file not found; set data.root or MTKIT_DATA to the data directory") from None
    except OSError as exc:
        raise DataError(path, None, f"cannot open file: {exc.strerror}") from None


def _check_columns(path: str, line: int | None, found: Sequence[str], required: Sequence[str]) -> None:
    missing = [name for name in required if name not in found]
    if missing:
        raise DataError(
            path, line, f"missing column(s) {', '.join(map(repr, missing))}; columns found: {list(found)}"
        )
    twice = sorted({name for name in required if list(found).count(name) > 1})
    if twice:  # a dict row would silently keep the last one
        raise DataError(path, line, f"column(s) {', '.join(map(repr, twice))} appear more than once")


def _read_delimited(path: str, required: Sequence[str], *, delimiter: str,
                    quoting: int = csv.QUOTE_MINIMAL) -> Iterator[tuple[int, Row]]:
    with _open(path) as fp:
        # strict: a stray quote (`"a"b`, or one never closed, which would swallow the rows after it) is an
        # error rather than text silently changed.
        reader = csv.DictReader(fp, delimiter=delimiter, restkey=_EXTRA_FIELDS, restval=None, strict=True,
                                quoting=quoting)
        try:
            header = reader.fieldnames
            if header is None:
                raise DataError(path, None, "empty file: no header row")
            _check_columns(path, 1, header, required)
            for row in reader:
                extra = row.get(_EXTRA_FIELDS, [])
                absent = sum(value is None for value in row.values())
                if extra or absent:
                    count = len(header) + len(extra) - absent
                    problem = f"row has {count} fields but the header has {len(header)}"
                    raise DataError(path, reader.line_num, problem)
                yield reader.line_num, row
        except csv.Error as exc:  # the inner reader's count includes the line it failed on
            line = reader.reader.line_num
            if str(exc) == "unexpected end of data":  # reported at the end: point at where the row began
                start = (reader.line_num or 1) + 1
                raise DataError(path, start, f"malformed row: a quote opened in this row is never closed "
                                f"(the file ends at line {line} inside it)") from None
            raise DataError(path, line, f"malformed row: {exc}") from None


def _read_jsonl(path: str, required: Sequence[str]) -> Iterator[tuple[int, Row]]:
    with _open(path) as fp:
        for line, text in enumerate(fp, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(path, line, f"malformed JSON: {exc.msg} at column {exc.colno}") from None
            except RecursionError:
                raise DataError(path, line, "malformed JSON: nested too deeply") from None
            if not isinstance(row, dict):
                raise DataError(path, line, f"expected a JSON object, got {type(row).__name__}")
            _check_columns(path, line, list(row), required)
            yield line, row


def _read_lines(path: str, required: Sequence[str]) -> Iterator[tuple[int, Row]]:
    if len(required) != 1:
        raise DataError(
            path, None, f"the lines format holds one sentence per line but columns {list(required)} are needed; "
            "use kind='sentences' or labelled=False"
        )
    column = required[0]
    with _open(path) as fp:
        for line, text in enumerate(fp, start=1):
            if text.strip():
                yield line, {column: text}


def _read_hf(path: str, required: Sequence[str]) -> Iterator[tuple[int, Row]]:
    match = _HF_PATH.fullmatch(path)
    if match is None:
        raise DataError(path, None, "expected a path like hf:NAME[:CONFIG]@SPLIT, e.g. hf:glue:sst2@validation")
    name, config, split = match.group("name", "config", "split")
    try:
        import datasets  # lazy: slow to import and only needed for hub data
    except ImportError:
        raise DataError(path, None, "the hf format needs the 'datasets' package") from None
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many types: connection, missing config/split, ...
        raise DataError(
            path, None, f"cannot load Hugging Face dataset {name!r} (config {config!r}, split {split!r}); "
            f"offline or unavailable? {type(exc).__name__}: {exc}"
        ) from exc
    _check_columns(path, None, list(data.column_names), required)
    yield from enumerate(data)


def _physical_lines(path: str) -> list[tuple[int, str]]:
    """(line number, text without its line ending) of a whole file; LF, CR and CRLF each end a line, as
    csv counts them. No quote processing."""
    try:
        with _open(path) as fp:
            return [(line, text.rstrip("\r\n")) for line, text in enumerate(fp, start=1)]
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _read_semeval_sts(path: str, required: Sequence[str]) -> Iterator[tuple[int, Row]]:
    """One SemEval STS year: every STS.input.<genre>.txt of the folder with its STS.gs.<genre>.txt."""
    if not os.path.isdir(path):
        raise DataError(path, None, "the semeval_sts format reads a folder of STS.input.<genre>.txt and "
                        "STS.gs.<genre>.txt files, not a file")
    _check_columns(path, None, list(SEMEVAL_COLUMNS.values()), required)
    genres = sorted(name[len("STS.input."):-len(".txt")] for name in os.listdir(path)
                    if name.startswith("STS.input.") and name.endswith(".txt"))
    if not genres:
        raise DataError(path, None, "no STS.input.<genre>.txt files in this folder")
    for genre in genres:
        inputs = os.path.join(path, f"STS.input.{genre}.txt")
        gold_path = os.path.join(path, f"STS.gs.{genre}.txt")
        if not os.path.exists(gold_path):
            raise DataError(gold_path, None, f"file not found: genre {genre!r} has sentence pairs ({inputs}) "
                            "but no gold scores")
        gold = [text for _, text in _physical_lines(gold_path)]
        pairs = _physical_lines(inputs)
        if len(gold) != len(pairs):
            raise DataError(gold_path, None, f"{len(gold)} gold lines but {len(pairs)} sentence pairs in {inputs}; "
                            "a pair that was not scored still has its (empty) gold line")
        for (line, text), score in zip(pairs, gold):
            fields = text.split("\t")
            if len(fields) < 2:
                raise DataError(inputs, line, "expected two tab-separated sentences, found no tab")
            yield line, {"id": f"{genre}-{line}", "sentence1": fields[0], "sentence2": fields[1], "score": score,
                         _GROUP: genre, _FILES: {"text": inputs, "label": gold_path}}


FORMATS: dict[str, RowReader] = {
    "cs224n": partial(_read_delimited, delimiter="\t"),
    "tsv": partial(_read_delimited, delimiter="\t"),
    "csv": partial(_read_delimited, delimiter=","),
    "jsonl": _read_jsonl,
    "lines": _read_lines,
    "hf": _read_hf,
    "sick": partial(_read_delimited, delimiter="\t", quoting=csv.QUOTE_NONE),
    "mrpc": partial(_read_delimited, delimiter="\t", quoting=csv.QUOTE_NONE),
    "semeval_sts": _read_semeval_sts,
}

# The public corpora's own columns, by the kinds they can be read as (a task's `columns` still overrides).
SEMEVAL_COLUMNS = {"id": "id", "text1": "sentence1", "text2": "sentence2", "label": "score"}
FORMAT_COLUMNS: dict[str, dict[str, dict[str, str]]] = {
    "sick": {
        "pair_regression": {"id": "pair_ID", "text1": "sentence_A", "text2": "sentence_B",
                            "label": "relatedness_score"},
        "pair_classification": {"id": "pair_ID", "text1": "sentence_A", "text2": "sentence_B",
                                "label": "entailment_judgment"},
    },
    "mrpc": {"pair_classification": {"text1": "#1 String", "text2": "#2 String", "label": "Quality"}},
    "semeval_sts": {"pair_regression": SEMEVAL_COLUMNS},
}


def _detect_format(path: str) -> str:
    if path.startswith("hf:"):
        return "hf"
    if os.path.isdir(path):
        return "semeval_sts"
    name = os.path.basename(path).lower()
    if name.endswith(".txt") and name.startswith("sick"):
        return "sick"
    if name.endswith(".txt") and name.startswith("msr_paraphrase"):
        return "mrpc"
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".txt":
        return "lines"
    with _open(path) as fp:
        header = fp.readline()
    return "tsv" if "\t" in header else "csv"


def _resolve_columns(path: str, spec: KindSpec, columns: Mapping[str, str] | None, fmt: str) -> dict[str, str]:
    roles = {"id", *spec.roles, *(["label"] if spec.label else [])}
    unknown = sorted(set(columns or {}) - roles)
    if unknown:
        raise DataError(
            path, None, f"unknown role(s) {unknown} in columns for kind {spec.name!r}; roles: {sorted(roles)}"
        )
    defaults = DEFAULT_COLUMNS[spec.name]
    if fmt in FORMAT_COLUMNS:
        kinds = FORMAT_COLUMNS[fmt]
        if spec.name not in kinds:
            raise DataError(path, None, f"the {fmt} format holds sentence pairs for kind(s) {', '.join(kinds)}; "
                            f"a {spec.name} task cannot read it")
        defaults = {**defaults, **kinds[spec.name]}
    return {**defaults, **(columns or {})}


def _is_blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text(value: object, column: str) -> str:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"column {column!r} should hold text, got {type(value).__name__} {value!r}")
    text = (value or "").strip()
    if not text:
        raise ValueError(f"empty sentence in column {column!r}")
    try:  # JSON escapes can spell lone surrogates ("\ud800"), which no tokenizer can encode
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"column {column!r} holds an invalid character {text[exc.start]!r} "
                         f"(a lone UTF-16 surrogate)") from None
    return text


def _number(value: object, column: str, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"label {value!r} in column {column!r} is not {expected}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"label {value!r} in column {column!r} is not {expected}") from None
    except OverflowError:  # a JSON integer beyond float range
        raise ValueError(f"label in column {column!r} is too large (an integer of {len(str(value))} digits)") from None
    if not math.isfinite(number):
        raise ValueError(f"label {value!r} in column {column!r} is not finite")
    return number


def _int_label(value: object, column: str, label_names: Sequence[str] | None, num_labels: int | None) -> int:
    if label_names is not None and isinstance(value, str) and value.strip() in label_names:
        return list(label_names).index(value.strip())
    expected = f"a number or one of {list(label_names)}" if label_names is not None else "a number"
    number = _number(value, column, expected)
    if number != int(number):
        raise ValueError(f"label {value!r} in column {column!r} is not an integer")
    label = int(number)
    if label < 0 or (num_labels is not None and label >= num_labels):
        bounds = f"[0, {num_labels})" if num_labels is not None else ">= 0"
        raise ValueError(f"label {value!r} in column {column!r} is out of range {bounds}")
    return label


def _float_label(value: object, column: str, label_range: tuple[float, float] | None) -> float:
    number = _number(value, column, "a number")
    if label_range is not None and not label_range[0] <= number <= label_range[1]:
        raise ValueError(f"label {value!r} in column {column!r} is outside [{label_range[0]}, {label_range[1]}]")
    return number


def _not_utf8(path: str) -> DataError:
    """Locate the first bytes that are not UTF-8 by line (the decoder's offset counts from a buffer, not
    the file). Lines split at LF, CR and CRLF, as the readers count them; no UTF-8 sequence holds those."""
    with open(path, "rb") as fp:
        data = fp.read()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    for line, raw in enumerate(data.splitlines(), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = raw[exc.start:exc.end].hex(" ")
            return DataError(path, line, f"not UTF-8 text: {exc.reason} (byte(s) {bad} at column {exc.start + 1}); "
                             "save the file as UTF-8")
    return DataError(path, None, "not UTF-8 text")


def read_examples(
    path: str | os.PathLike[str],
    *,
    kind: str,
    fmt: str = "auto",
    columns: Mapping[str, str] | None = None,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    label_range: tuple[float, float] | None = None,
    labelled: bool = True,
) -> list[Example]:
    """Read every example of ``path`` (see the module docstring for formats), in file order.

    ``columns`` maps roles (the kind's text roles, ``label``, ``id``) to column names, overriding
    the CS224N defaults in :data:`DEFAULT_COLUMNS`. A default ``id`` column that is absent gives
    ids equal to the line number. Int labels may be numbers (``"3"``, ``"1.0"``) or, with
    ``label_names``, names. ``labelled=False`` reads splits without labels (label None).
    Rows with an empty label are skipped with one warning per file. Raises :class:`DataError`.
    """
    path = os.fspath(path)
    try:
        spec = get_kind(kind)
    except ValueError as exc:
        raise DataError(path, None, str(exc)) from None
    if label_names is not None:
        if num_labels is not None and num_labels != len(label_names):
            raise DataError(path, None, f"num_labels={num_labels} but {len(label_names)} label_names given")
        num_labels = len(label_names)

    try:
        if fmt == "auto":
            fmt = _detect_format(path)
        if fmt not in FORMATS:
            valid = ", ".join(["auto", *sorted(FORMATS)])
            raise DataError(path, None, f"unknown format {fmt!r}; valid formats: {valid}")
        cols = _resolve_columns(path, spec, columns, fmt)
        has_label = labelled and spec.label is not None
        required = [cols[role] for role in spec.roles]
        if has_label:
            required.append(cols["label"])
        if columns is not None and "id" in columns:
            required.append(cols["id"])
        examples: list[Example] = []
        skipped: list[str] = []
        for line, row in FORMATS[fmt](path, required):
            raw_id = row.get(cols["id"])
            example_id = str(line) if _is_blank(raw_id) else str(raw_id).strip()
            files = row.get(_FILES, {})
            if has_label and _is_blank(row[cols["label"]]):
                skipped.append(f"line {line} (id {example_id})")
                continue
            try:
                texts = tuple(_text(row[cols[role]], cols[role]) for role in spec.roles)
            except ValueError as exc:
                raise DataError(files.get("text", path), line, str(exc)) from None
            label: int | float | None = None
            try:
                if has_label and spec.label == "int":
                    label = _int_label(row[cols["label"]], cols["label"], label_names, num_labels)
                elif has_label:
                    label = _float_label(row[cols["label"]], cols["label"], label_range)
            except ValueError as exc:
                raise DataError(files.get("label", path), line, str(exc)) from None
            examples.append(Example(example_id, texts, label, row.get(_GROUP)))
    except UnicodeDecodeError:
        raise _not_utf8(path) from None

    if skipped and not examples:
        raise DataError(path, None, f"all {len(skipped)} rows have an empty label in column {cols['label']!r}")
    if not examples:
        raise DataError(path, None, "no rows: the dataset is empty")
    if skipped:
        shown = ", ".join(skipped[:_WARN_EXAMPLES]) + (", ..." if len(skipped) > _WARN_EXAMPLES else "")
        log.warning(
            "%s: skipped %d row(s) with an empty label in column %r: %s", path, len(skipped), cols["label"], shown
        )
    return examples
