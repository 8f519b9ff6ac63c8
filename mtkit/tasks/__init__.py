"""Task kinds and data readers."""

from .base import KINDS, DataError, Example, KindSpec, get_kind
from .readers import DEFAULT_COLUMNS, FORMATS, read_examples

__all__ = ["DEFAULT_COLUMNS", "FORMATS", "KINDS", "DataError", "Example", "KindSpec", "get_kind", "read_examples"]
