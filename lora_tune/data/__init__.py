"""Data pipeline for SFT: sources -> formats (canonical conversations) -> masking (tokens and labels) -> pipeline.

Importing this package loads no ML library: `datasets` and `transformers` are imported where they are used.
"""

from __future__ import annotations

from lora_tune.data.formats import Conversation, Message, detect_format, normalize_rows, to_conversation
from lora_tune.data.masking import IGNORE_INDEX, TemplateError, TokenizedExample, tokenize_conversation
from lora_tune.data.pipeline import DataStats, PreparedData, SplitStats, build_datasets
from lora_tune.data.sources import load_rows

__all__ = [
    "IGNORE_INDEX",
    "Conversation",
    "DataStats",
    "Message",
    "PreparedData",
    "SplitStats",
    "TemplateError",
    "TokenizedExample",
    "build_datasets",
    "detect_format",
    "load_rows",
    "normalize_rows",
    "to_conversation",
    "tokenize_conversation",
]
