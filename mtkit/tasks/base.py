"""Task kinds, the example record every reader produces, and the data error type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LabelType = Literal["int", "float"]


@dataclass(frozen=True)
class KindSpec:
    """What a task kind needs: the text roles of one example and the label type (None: unlabelled)."""

    name: str
    roles: tuple[str, ...]
    label: LabelType | None


KINDS: dict[str, KindSpec] = {
    spec.name: spec
    for spec in (
        KindSpec("classification", ("text",), "int"),
        KindSpec("pair_classification", ("text1", "text2"), "int"),
        KindSpec("pair_regression", ("text1", "text2"), "float"),
        KindSpec("contrastive", ("anchor", "positive", "negative"), None),
        # Unsupervised SimCSE: each sentence is its own positive under dropout.
        KindSpec("sentences", ("text",), None),
    )
}


def get_kind(name: str) -> KindSpec:
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown task kind {name!r}; valid kinds: {', '.join(sorted(KINDS))}") from None


@dataclass(frozen=True)
class Example:
    """One example: its texts in the kind's role order, its label (None when unlabelled), and the part of
    its dataset it belongs to when that is reported on its own (a SemEval STS genre; else None)."""

    id: str
    texts: tuple[str, ...]
    label: int | float | None
    group: str | None = None


class DataError(ValueError):
    """A problem with input data, located as ``path:line: problem`` (``path: problem`` without a line)."""

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")

    # The default reduce would call __init__ with the message alone, so errors raised in
    # worker processes could not be sent back to the parent.
    def __reduce__(self):
        return type(self), (self.path, self.line, self.problem)
