"""Export a run: merge the adapter into its base (`merge`), write a model card, upload to a hub (`push`).

Importing this package imports no torch; the functions import what they need.
"""

from __future__ import annotations

from lora_tune.export.errors import ExportError, VerificationError
from lora_tune.export.merging import merge
from lora_tune.export.push import PushResult, push
from lora_tune.export.result import MergeResult

__all__ = ["ExportError", "MergeResult", "PushResult", "VerificationError", "merge", "push"]
