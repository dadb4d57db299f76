"""The data every task shares: sources (files, rows, the per-row bound) -> formats (canonical conversations) ->
cleaning -> masking (tokens and labels) -> packing -> the SFT pipeline; the preview of `lora-tune data`.

Importing this package loads no ML library: `datasets` and `transformers` are imported where they are used.
"""

from __future__ import annotations

from lora_tune.data.formats import (
    Conversation,
    Example,
    Message,
    detect_format,
    normalize_rows,
    to_conversation,
    to_example,
)
from lora_tune.data.masking import IGNORE_INDEX, TemplateError, TokenizedExample, tokenize_conversation
from lora_tune.data.pipeline import DataStats, PreparedData, SplitStats, build_datasets, load_source, write_test_split
from lora_tune.data.sources import load_rows, read_source

__all__ = [
    "IGNORE_INDEX",
    "Conversation",
    "DataStats",
    "Example",
    "Message",
    "PreparedData",
    "SplitStats",
    "TemplateError",
    "TokenizedExample",
    "build_datasets",
    "detect_format",
    "load_rows",
    "load_source",
    "read_source",
    "normalize_rows",
    "to_conversation",
    "to_example",
    "tokenize_conversation",
    "write_test_split",
]
