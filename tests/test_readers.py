import logging
import os
import pickle
import sys
from collections import Counter
from dataclasses import FrozenInstanceError
from pathlib import Path
from types import SimpleNamespace

import pytest

from mtkit.tasks import KINDS, DataError, Example, get_kind, read_examples

DATA = Path(os.environ.get("MTKIT_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
NLI_LABELS = ["entailment", "neutral", "contradiction"]


def write(tmp_path: Path, name: str, text: str, *, newline: str = "\n", bom: bool = False) -> Path:
    path = tmp_path / name
    data = text.replace("\n", newline).encode("utf-8")
    path.write_bytes(b"\xef\xbb\xbf" + data if bom else data)
    return path


def raises_at(path: Path | str, line: int | None, *problem: str, **kwargs) -> DataError:
    """Read ``path`` expecting a DataError located at ``line`` whose message holds every ``problem`` part."""
    with pytest.raises(DataError) as info:
        read_examples(path, **kwargs)
    err = info.value
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(err).startswith(where), str(err)
    assert err.line == line
    for part in problem:
        assert part in str(err), str(err)
    return err


SST = "\tid\tsentence\tsentiment\n0\taaa\t A fine film .\t3\n1\tbbb\t Dull .\t0\n"
QUORA = "\tid\tsentence1\tsentence2\tis_duplicate\n7\tq1\tHow?\tWhy?\t1.0\n9\tq2\tWho?\tWhat?\t0.0\n"


# --- base --------------------------------------------------------------------------------------


def test_kinds_registry():
    assert get_kind("pair_regression").roles == ("text1", "text2")
    assert get_kind("pair_regression").label == "float"
    assert get_kind("contrastive").roles == ("anchor", "positive", "negative")
    assert get_kind("sentences").label is None
    assert set(KINDS) == {"classification", "pair_classification", "pair_regression", "contrastive", "sentences"}
    with pytest.raises(ValueError, match="unknown task kind 'regression'; valid kinds: classification, contrastive"):
        get_kind("regression")


def test_example_is_frozen():
    example = Example("a", ("x",), 1)
    with pytest.raises(FrozenInstanceError):
        example.label = 2


def test_data_error_parts_and_pickle():
    err = DataError("d/f.csv", 3, "bad label")
    assert str(err) == "d/f.csv:3: bad label"
    assert (err.path, err.line, err.problem) == ("d/f.csv", 3, "bad label")
    assert str(DataError("d/f.csv", None, "no rows")) == "d/f.csv: no rows"
    assert isinstance(err, ValueError)
    assert str(pickle.loads(pickle.dumps(err))) == "d/f.csv:3: bad label"


# --- formats and kinds -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["auto", "cs224n", "tsv"])
def test_cs224n_classification(tmp_path, fmt):
    path = write(tmp_path, "sst.csv", SST)
    assert read_examples(path, kind="classification", fmt=fmt, num_labels=5) == [
        Example("aaa", ("A fine film .",), 3),
        Example("bbb", ("Dull .",), 0),
    ]


def test_pair_classification_float_labels(tmp_path):
    examples = read_examples(write(tmp_path, "quora.csv", QUORA), kind="pair_classification", num_labels=2)
    assert examples == [Example("q1", ("How?", "Why?"), 1), Example("q2", ("Who?", "What?"), 0)]
    assert all(type(e.label) is int for e in examples)


def test_pair_regression_csv_quoting_and_multiline_fields(tmp_path):
    text = 'id,sentence1,sentence2,similarity\ns1,"A, quoted ""one""","two\nlines",4.5\ns2,a,b,nan\n'
    path = write(tmp_path, "sts.csv", text)
    raises_at(path, 4, "label 'nan'", "not finite", kind="pair_regression")
    path = write(tmp_path, "sts.csv", text.replace("nan", "9"))
    # The second record starts after a quoted newline, so it is on physical line 4.
    raises_at(path, 4, "'9'", "outside [0, 5]", kind="pair_regression", label_range=(0, 5))
    path = write(tmp_path, "sts.csv", text.replace("nan", "0"))
    assert read_examples(path, kind="pair_regression", label_range=(0, 5)) == [
        Example("s1", ('A, quoted "one"', "two\nlines"), 4.5),
        Example("s2", ("a", "b"), 0.0),
    ]


def test_contrastive_csv_ids_default_to_line_numbers(tmp_path):
    path = write(tmp_path, "nli.csv", "sent0,sent1,hard_neg\np,e,c\n\"p, 2\",e2,c2\n")
    assert read_examples(path, kind="contrastive", fmt="csv") == [
        Example("2", ("p", "e", "c"), None),
        Example("3", ("p, 2", "e2", "c2"), None),
    ]


def test_jsonl(tmp_path):
    text = '{"id": 7, "sentence": " hi ", "sentiment": 2}\n\n{"sentence": "yo", "sentiment": "4"}\n'
    path = write(tmp_path, "sst.jsonl", text)
    assert read_examples(path, kind="classification", num_labels=5) == [
        Example("7", ("hi",), 2),
        Example("3", ("yo",), 4),
    ]


def test_jsonl_custom_columns(tmp_path):
    path = write(tmp_path, "t.jsonl", '{"a": "x", "b": "y", "n": "z"}\n')
    columns = {"anchor": "a", "positive": "b", "negative": "n"}
    assert read_examples(path, kind="contrastive", columns=columns) == [Example("1", ("x", "y", "z"), None)]


def test_lines(tmp_path):
    path = write(tmp_path, "wiki.txt", " first sentence\n\nsecond\n")
    expected = [Example("1", ("first sentence",), None), Example("3", ("second",), None)]
    assert read_examples(path, kind="sentences") == expected
    assert read_examples(path, kind="classification", labelled=False) == expected
    assert read_examples(write(tmp_path, "s1.dev", "a\nb\n"), kind="sentences", fmt="lines")[1].texts == ("b",)


def test_tsv_with_label_names_and_custom_columns(tmp_path):
    path = write(tmp_path, "snli.tsv", "premise\thypothesis\tlabel\nP\tH1\tneutral\nP\tH2\t2\nP\tH3\tentailment\n")
    columns = {"text1": "premise", "text2": "hypothesis", "label": "label"}
    examples = read_examples(path, kind="pair_classification", columns=columns, label_names=NLI_LABELS)
    assert [(e.id, e.label) for e in examples] == [("2", 1), ("3", 2), ("4", 0)]
    path = write(tmp_path, "snli.tsv", "premise\thypothesis\tlabel\nP\tH\tmaybe\n")
    raises_at(path, 2, "label 'maybe'", "not a number or one of ['entailment'",
              kind="pair_classification", columns=columns, label_names=NLI_LABELS)
    path = write(tmp_path, "snli.tsv", "premise\thypothesis\tlabel\nP\tH\t3\n")
    raises_at(path, 2, "label '3'", "out of range [0, 3)",
              kind="pair_classification", columns=columns, label_names=NLI_LABELS)


def test_test_split_without_labels(tmp_path):
    path = write(tmp_path, "sst-test.csv", "0\t\tid\tsentence\n1\t0.0\tx1\t Good .\n")
    assert read_examples(path, kind="classification", labelled=False) == [Example("x1", ("Good .",), None)]
    raises_at(path, 1, "missing column(s) 'sentiment'", "columns found: ['0', '', 'id', 'sentence']",
              kind="classification")


def test_explicit_id_column_is_required(tmp_path):
    path = write(tmp_path, "nli.csv", "sent0,sent1,hard_neg\np,e,c\n")
    raises_at(path, 1, "missing column(s) 'pair_id'", kind="contrastive", columns={"id": "pair_id"})


class FakeDataset(list):
    column_names = ["sentence", "label"]


def test_hf(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return FakeDataset([{"sentence": " a ", "label": 1}, {"sentence": "b", "label": 4}])

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    columns = {"label": "label"}
    examples = read_examples("hf:SetFit/sst5@train[:2]", kind="classification", columns=columns, num_labels=5)
    assert examples == [Example("0", ("a",), 1), Example("1", ("b",), 4)]
    read_examples("hf:glue:sst2@validation", kind="classification", columns=columns)
    assert calls == [("SetFit/sst5", None, "train[:2]"), ("glue", "sst2", "validation")]
    raises_at("hf:glue:sst2@test", None, "missing column(s) 'sentiment'", "columns found: ['sentence', 'label']",
              kind="classification")
    raises_at("hf:glue:sst2@validation", 1, "label 4", "out of range [0, 2)",
              kind="classification", columns=columns, num_labels=2)


def test_hf_errors(monkeypatch):
    def load_dataset(name, config, split):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    raises_at("hf:SetFit/sst5@train", None, "dataset 'SetFit/sst5'", "offline or unavailable", "no network",
              kind="classification")
    raises_at("hf:SetFit/sst5", None, "hf:NAME[:CONFIG]@SPLIT", kind="classification")


# --- encodings and line endings ----------------------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("final_newline", [True, False])
@pytest.mark.parametrize("bom", [False, True])
@pytest.mark.parametrize(
    "name, text, kind, expected",
    [
        ("a.csv", "id,sentence,sentiment\nx,hi,1\ny,\"a\nb\",0\n", "classification", ("hi", "a\nb")),
        ("a.tsv", "id\tsentence\tsentiment\nx\thi\t1\ny\tyo\t0\n", "classification", ("hi", "yo")),
        ("a.jsonl", '{"sentence": "hi", "sentiment": 1}\n{"sentence": "yo", "sentiment": 0}\n', "classification",
         ("hi", "yo")),
        ("a.txt", "hi\nyo\n", "sentences", ("hi", "yo")),
    ],
)
def test_line_endings_and_bom(tmp_path, name, text, kind, expected, newline, final_newline, bom):
    path = write(tmp_path, name, text if final_newline else text[:-1], newline=newline, bom=bom)
    examples = read_examples(path, kind=kind)
    # A quoted field keeps its own line break as written.
    assert [e.texts[0].replace("\r\n", "\n") for e in examples] == list(expected)
    if kind == "classification":
        assert [e.label for e in examples] == [1, 0]


def test_crlf_error_lines_are_physical(tmp_path):
    path = write(tmp_path, "a.csv", 'sent0,sent1,hard_neg\r\n"x\r\ny",e,c\r\np,,c\r\n')
    raises_at(path, 4, "empty sentence in column 'sent1'", kind="contrastive")


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, text, line, problem, kwargs",
    [
        ("sst.csv", SST.replace("\t3\n", "\tgood\n"), 2, ("label 'good'", "'sentiment'", "not a number"), {}),
        ("sst.csv", SST.replace("\t3\n", "\t2.5\n"), 2, ("label '2.5'", "not an integer"), {}),
        ("sst.csv", SST.replace("\t0\n", "\t5\n"), 3, ("label '5'", "out of range [0, 5)"), {"num_labels": 5}),
        ("sst.csv", SST.replace("\t0\n", "\t-1\n"), 3, ("label '-1'", "out of range >= 0"), {}),
        ("sst.csv", SST.replace(" Dull .", "  "), 3, ("empty sentence in column 'sentence'",), {}),
        ("sst.csv", SST.replace("\t3\n", "\t3\textra\n"), 2, ("row has 5 fields but the header has 4",), {}),
        ("sst.csv", SST.replace("\t0\n", "\n"), 3, ("row has 3 fields but the header has 4",), {}),
        ("sst.csv", SST.replace("sentiment", "label"), 1,
         ("missing column(s) 'sentiment'", "columns found: ['', 'id', 'sentence', 'label']"), {}),
        ("sst.csv", SST.split("\n")[0] + "\n", None, ("no rows",), {}),
        ("sst.csv", "", None, ("empty file",), {}),
        ("sst.csv", SST, None, ("unknown format 'xml'",
                                 "valid formats: auto, cs224n, csv, hf, jsonl, lines, mrpc, semeval_sts, sick, tsv"),
         {"fmt": "xml"}),
        ("sst.csv", SST, None, ("unknown task kind 'sentiment'", "valid kinds: classification"),
         {"kind": "sentiment"}),
        ("sst.csv", SST, None, ("unknown role(s) ['sentence']", "roles: ['id', 'label', 'text']"),
         {"columns": {"sentence": "text"}}),
        ("sst.csv", SST, None, ("num_labels=5 but 3 label_names given",),
         {"num_labels": 5, "label_names": NLI_LABELS}),
        ("sst.jsonl", '{"sentence": "a", "sentiment": 1}\n{"sentence": "b", "sentiment": 1\n', 2,
         ("malformed JSON",), {}),
        ("sst.jsonl", '["a", 1]\n', 1, ("expected a JSON object, got list",), {}),
        ("sst.jsonl", '{"sentence": "a"}\n{"text": "b", "sentiment": 1}\n', 2,
         ("missing column(s) 'sentence'", "columns found: ['text', 'sentiment']"), {"labelled": False}),
        ("sst.jsonl", '{"sentence": 5, "sentiment": 1}\n', 1, ("column 'sentence' should hold text, got int",), {}),
        ("sst.jsonl", '{"sentence": "a", "sentiment": true}\n', 1, ("label True", "not a number"), {}),
        ("sst.txt", "a\n", None, ("lines format holds one sentence per line", "['sentence', 'sentiment']"), {}),
        ("sts.csv", "\tid\tsentence1\tsentence2\tsimilarity\n0\ts\ta\tb\thigh\n", 2,
         ("label 'high'", "'similarity'", "not a number"), {"kind": "pair_regression"}),
        ("sts.csv", "\tid\tsentence1\tsentence2\tsimilarity\n0\ts\ta\tb\tinf\n", 2,
         ("label 'inf'", "not finite"), {"kind": "pair_regression"}),
        ("bin.csv", "id,sentence,sentiment\nx,\udcff,1\n", 2, ("not UTF-8 text", "byte(s) ff at column 3"), {}),
        ("bin.csv", "id,sentence,sentiment\r\nx,a,1\r\ny,\udce9t\udce9,2\r\n", 3,
         ("not UTF-8 text: invalid continuation byte (byte(s) e9 at column 3)",), {}),
        ("bin.jsonl", '{"sentence": "a", "sentiment": 1}\n\n{"sentence": "\udcc3", "sentiment": 1}\n', 3,
         ("not UTF-8 text",), {}),
        ("bin.txt", "\ufeffone\rtwo\r\udc80three\r", 3, ("not UTF-8 text", "byte(s) 80 at column 1"),
         {"kind": "sentences"}),
        ("quote.csv", 'id,sentence,sentiment\nx,"never closed,1\ny,b,2\nz,c,3\n', 2,
         ("a quote opened in this row is never closed (the file ends at line 4 inside it)",), {}),
        ("quote.csv", 'id,sentence,sentiment\nx,a,1\ny,"b"c,2\n', 3, ("malformed row: ',' expected after '\"'",), {}),
        ("big.csv", "id,sentence,sentiment\nx,a,1\ny," + "w" * 140_000 + ",2\n", 3,
         ("malformed row: field larger than field limit",), {}),
        ("dup.csv", "id,sentence,sentence,sentiment\nx,a,b,1\n", 1, ("column(s) 'sentence' appear more than once",),
         {}),
        ("sst.jsonl", '{"sentence": "a\\ud800b", "sentiment": 1}\n', 1,
         ("column 'sentence' holds an invalid character '\\ud800' (a lone UTF-16 surrogate)",), {}),
        ("sst.jsonl", '{"sentence": "a", "sentiment": 1' + "0" * 400 + "}\n", 1,
         ("label in column 'sentiment' is too large (an integer of 401 digits)",), {}),
        ("sst.jsonl", "[" * 100_000 + "\n", 1, ("malformed JSON: nested too deeply",), {}),
    ],
)
def test_errors(tmp_path, name, text, line, problem, kwargs):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    raises_at(path, line, *problem, **{"kind": "classification", **kwargs})


def test_missing_file_names_path_and_hint(tmp_path):
    for fmt in ["auto", "csv", "jsonl", "lines"]:
        raises_at(tmp_path / "nope" / "sst.csv", None, "file not found", "set data.root or MTKIT_DATA",
                  kind="sentences", fmt=fmt)


# --- rows with an empty label ------------------------------------------------------------------


def test_empty_labels_are_skipped_with_one_warning(tmp_path, caplog):
    text = QUORA + "3\tq3\tA?\t\t\n4\tq4\tB?\tC?\t \n5\tq5\tD?\tE?\t1.0\n"
    path = write(tmp_path, "quora.csv", text)
    with caplog.at_level(logging.WARNING, logger="mtkit.tasks"):
        examples = read_examples(path, kind="pair_classification")
    assert [e.id for e in examples] == ["q1", "q2", "q5"]
    [record] = caplog.records
    assert record.name == "mtkit.tasks"
    message = record.getMessage()
    assert "quora.csv" in message and "skipped 2 row(s)" in message and "'is_duplicate'" in message
    assert "line 4 (id q3)" in message and "line 5 (id q4)" in message


def test_all_labels_empty_is_an_error(tmp_path):
    path = write(tmp_path, "quora.csv", "id,sentence1,sentence2,is_duplicate\na,x,y,\nb,x,y,\n")
    raises_at(path, None, "all 2 rows have an empty label in column 'is_duplicate'", kind="pair_classification")


def test_unlabelled_read_ignores_empty_labels(tmp_path):
    path = write(tmp_path, "quora.csv", "id,sentence1,sentence2,is_duplicate\na,x,y,\n")
    assert read_examples(path, kind="pair_classification", labelled=False) == [Example("a", ("x", "y"), None)]


# --- the public corpora: SICK, MRPC, SemEval STS ----------------------------------------------
# Raw text with unbalanced quotes and CRLF line endings, split on tabs with no quote processing.

SICK = ("pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
        '12\tA man says "hello\tA man speaks\t4.5\tENTAILMENT\n'
        '40\t"The cat\tA dog" runs\t1.2\tNEUTRAL\n')


@pytest.mark.parametrize("fmt", ["auto", "sick"])
def test_sick_relatedness_and_entailment(tmp_path, fmt):
    path = write(tmp_path, "SICK_test_annotated.txt", SICK, newline="\r\n")
    assert read_examples(path, kind="pair_regression", fmt=fmt, label_range=(1, 5)) == [
        Example("12", ('A man says "hello', "A man speaks"), 4.5),
        Example("40", ('"The cat', 'A dog" runs'), 1.2),
    ]
    labels = ["NEUTRAL", "ENTAILMENT", "CONTRADICTION"]
    examples = read_examples(path, kind="pair_classification", fmt=fmt, label_names=labels)
    assert [(e.id, e.label) for e in examples] == [("12", 1), ("40", 0)]
    # With csv quoting the opening quote would swallow the tab after it: an error, not the corpus's text.
    with pytest.raises(DataError):
        read_examples(path, kind="pair_regression", fmt="tsv",
                      columns={"id": "pair_ID", "text1": "sentence_A", "text2": "sentence_B",
                               "label": "relatedness_score"})


@pytest.mark.parametrize(
    "text, line, problem, kwargs",
    [
        (SICK.replace("\t1.2\t", "\tsimilar\t"), 3, ("label 'similar'", "'relatedness_score'", "not a number"), {}),
        (SICK.replace("\t1.2\t", "\t0.5\t"), 3, ("label '0.5'", "outside [1.0, 5.0]"), {"label_range": (1.0, 5.0)}),
        (SICK.replace("\t4.5\tENTAILMENT", "\t4.5"), 2, ("row has 4 fields but the header has 5",), {}),
        (SICK.replace("\tA man speaks", "\t "), 2, ("empty sentence in column 'sentence_B'",), {}),
        (SICK.replace("sentence_A", "sentence_1"), 1, ("missing column(s) 'sentence_A'",), {}),
        (SICK, None, ("the sick format holds sentence pairs for kind(s) pair_regression, pair_classification",
                      "a classification task cannot read it"), {"kind": "classification"}),
    ],
)
def test_sick_errors(tmp_path, text, line, problem, kwargs):
    path = write(tmp_path, "SICK_train.txt", text, newline="\r\n")
    raises_at(path, line, *problem, **{"kind": "pair_regression", **kwargs})


MRPC = ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        '1\t101\t102\tShe said " it is over .\tIt is over , " she said .\n'
        "0\t103\t104\tPrices rose 5 % .\tPrices fell 's sharply .\n")


@pytest.mark.parametrize("fmt", ["auto", "mrpc"])
def test_mrpc_bom_crlf_and_quotes(tmp_path, fmt):
    path = write(tmp_path, "msr_paraphrase_test.txt", MRPC, newline="\r\n", bom=True)
    assert read_examples(path, kind="pair_classification", fmt=fmt, num_labels=2) == [
        Example("2", ('She said " it is over .', 'It is over , " she said .'), 1),
        Example("3", ("Prices rose 5 % .", "Prices fell 's sharply ."), 0),
    ]


@pytest.mark.parametrize(
    "text, line, problem, kwargs",
    [
        (MRPC.replace("0\t103", "2\t103"), 3, ("label '2'", "'Quality'", "out of range [0, 2)"), {"num_labels": 2}),
        (MRPC.replace("\t104\t", "\t104\t\t"), 3, ("row has 6 fields but the header has 5",), {}),
        (MRPC.replace("#1 String", "String 1"), 1, ("missing column(s) '#1 String'",), {}),
        (MRPC, None, ("the mrpc format holds sentence pairs for kind(s) pair_classification",),
         {"kind": "pair_regression"}),
    ],
)
def test_mrpc_errors(tmp_path, text, line, problem, kwargs):
    path = write(tmp_path, "msr_paraphrase_train.txt", text, newline="\r\n", bom=True)
    raises_at(path, line, *problem, **{"kind": "pair_classification", **kwargs})


def sts_year(tmp_path: Path, genres: dict[str, tuple[str, str]], newline: str = "\n") -> Path:
    """A SemEval STS year folder: genre -> (STS.input text, STS.gs text)."""
    folder = tmp_path / "STS13"
    folder.mkdir(parents=True, exist_ok=True)
    for genre, (pairs, gold) in genres.items():
        write(folder, f"STS.input.{genre}.txt", pairs, newline=newline)
        write(folder, f"STS.gs.{genre}.txt", gold, newline=newline)
        if "\xff" in gold:  # bytes that are not UTF-8
            (folder / f"STS.gs.{genre}.txt").write_bytes(gold.encode("latin-1"))
    return folder


HEADLINES = ('Bank "cuts rates\tBank lowers rates\nStorm hits coast\tA storm reached the coast\n'
             "Team wins cup\tThe team lost\n", "4.2\n\n1.0\n")
ONWN = ("a kind of tree\ta tall plant\tsource-a\tsource-b\n", "3\n")


@pytest.mark.parametrize("fmt", ["auto", "semeval_sts"])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_semeval_sts_year_folder(tmp_path, caplog, fmt, newline):
    folder = sts_year(tmp_path, {"headlines": HEADLINES, "surprise.OnWN": ONWN}, newline)
    with caplog.at_level(logging.WARNING, logger="mtkit.tasks"):
        examples = read_examples(folder, kind="pair_regression", fmt=fmt, label_range=(0, 5))
    # Genres in name order; the unscored pair (empty gold line 2) is skipped; extra columns are ignored.
    assert examples == [
        Example("headlines-1", ('Bank "cuts rates', "Bank lowers rates"), 4.2, "headlines"),
        Example("headlines-3", ("Team wins cup", "The team lost"), 1.0, "headlines"),
        Example("surprise.OnWN-1", ("a kind of tree", "a tall plant"), 3.0, "surprise.OnWN"),
    ]
    assert "skipped 1 row(s)" in caplog.text and "line 2 (id headlines-2)" in caplog.text


def test_semeval_sts_errors(tmp_path):
    def raises(genres, where, line, *problem, **kwargs):
        """Reading the year folder fails at `where` (a file of it, or the folder when None), `line`."""
        folder = sts_year(tmp_path / str(len(list(tmp_path.iterdir()))), genres)
        with pytest.raises(DataError) as info:
            read_examples(folder, kind="pair_regression", fmt="semeval_sts", **kwargs)
        assert (info.value.path, info.value.line) == (str(folder / where if where else folder), line), info.value
        for part in problem:
            assert part in str(info.value), str(info.value)

    pairs, gold = HEADLINES
    raises({"headlines": (pairs, "4.2\n\nhigh\n")}, "STS.gs.headlines.txt", 3, "label 'high'", "not a number")
    raises({"headlines": (pairs, "4.2\n\n5.5\n")}, "STS.gs.headlines.txt", 3, "label '5.5'", "outside [0, 5]",
           label_range=(0, 5))
    raises({"headlines": (pairs.replace("Team wins cup\t", "Team wins cup "), gold)}, "STS.input.headlines.txt",
           3, "expected two tab-separated sentences, found no tab")
    raises({"headlines": (pairs.replace("Team wins cup", " "), gold)}, "STS.input.headlines.txt", 3,
           "empty sentence in column 'sentence1'")
    raises({"headlines": (pairs, "4.2\n1.0\n")}, "STS.gs.headlines.txt", None,
           "2 gold lines but 3 sentence pairs in", "STS.input.headlines.txt")
    raises({"headlines": (pairs, gold), "OnWN": ("x\ty\n", "\xff\n")}, "STS.gs.OnWN.txt", 1, "not UTF-8 text",
           "byte(s) ff")
    raises({}, None, None, "no STS.input.<genre>.txt files in this folder")
    raises({"headlines": (pairs, "\n\n\n")}, None, None, "all 3 rows have an empty label")
    raises({"headlines": HEADLINES}, None, None, "missing column(s) 'sim'", columns={"label": "sim"})
    folder = sts_year(tmp_path / "x", {"headlines": HEADLINES})
    (folder / "STS.gs.headlines.txt").unlink()
    with pytest.raises(DataError) as info:
        read_examples(folder, kind="pair_regression")
    assert (info.value.path, info.value.line) == (str(folder / "STS.gs.headlines.txt"), None)
    assert "file not found: genre 'headlines' has sentence pairs" in str(info.value)
    raises_at(folder / "STS.input.headlines.txt", None, "reads a folder", kind="pair_regression", fmt="semeval_sts")
    raises_at(folder, None, "a classification task cannot read it", kind="classification", fmt="semeval_sts")


def test_generic_tsv_reads_an_eval_only_split(tmp_path):
    # Eval-only tasks read their test split with labels; the generic readers do so with labelled=True.
    path = write(tmp_path, "ood.tsv", "a\tb\tscore\nx y\tx z\t3.5\n")
    columns = {"text1": "a", "text2": "b", "label": "score"}
    assert read_examples(path, kind="pair_regression", columns=columns) == [Example("2", ("x y", "x z"), 3.5)]


# --- real data ---------------------------------------------------------------------------------


def real(relative: str) -> Path:
    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} not found: set MTKIT_DATA")
    return path


def test_real_sst_train():
    examples = read_examples(real("sst/ids-sst-train.csv"), kind="classification", num_labels=5)
    assert len(examples) == 8544
    assert Counter(e.label for e in examples) == {0: 1092, 1: 2218, 2: 1624, 3: 2322, 4: 1288}
    assert all(e.texts[0] == e.texts[0].strip() for e in examples)


def test_real_quora_dev_skips_two(caplog):
    with caplog.at_level(logging.WARNING, logger="mtkit.tasks"):
        examples = read_examples(real("quora/quora-dev.csv"), kind="pair_classification", num_labels=2)
    assert len(examples) == 20212
    assert Counter(e.label for e in examples) == {0: 12627, 1: 7585}
    [record] = caplog.records
    message = record.getMessage()
    assert "skipped 2 row(s)" in message
    assert "ad118c967d683c93883bf072d" in message and "9054345d02cd6c5642a4904dc" in message


def test_real_sts_train():
    examples = read_examples(real("sts/sts-train.csv"), kind="pair_regression", label_range=(0.0, 5.0))
    assert len(examples) == 6040
    assert min(e.label for e in examples) >= 0.0 and max(e.label for e in examples) <= 5.0


def test_real_nli_triples():
    examples = read_examples(real("nli/nli_for_simcse-dev.csv"), kind="contrastive", fmt="csv")
    assert len(examples) == 27560
    assert all(len(e.texts) == 3 and e.label is None for e in examples)


def test_real_sst_test_student():
    examples = read_examples(real("sst/ids-sst-test-student.csv"), kind="classification", labelled=False)
    assert len(examples) == 2210
    assert all(e.label is None and len(e.id) == 25 for e in examples)


@pytest.mark.parametrize("name, rows", [("SICK_train.txt", 4500), ("SICK_trial.txt", 500),
                                        ("SICK_test_annotated.txt", 4927)])
def test_real_sick(name, rows):
    examples = read_examples(real(f"ood/sick/{name}"), kind="pair_regression", label_range=(1, 5))
    assert len(examples) == rows and len({e.id for e in examples}) == rows
    labels = ["NEUTRAL", "ENTAILMENT", "CONTRADICTION"]
    assert len(read_examples(real(f"ood/sick/{name}"), kind="pair_classification", label_names=labels)) == rows
