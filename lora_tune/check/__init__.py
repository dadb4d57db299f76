"""Pre-flight check: the silent fine-tuning failures, caught on the recipe's own data before training starts.

Runs with the tokenizer and the model's generation config only (no weights), on a seeded sample of each training
dataset (`preflight.sample_rows`), and checks that:

- the chat template renders every row and its assistant turns can be located (`template`);
- the assistant mask is neither empty nor everything (`assistant-mask`), and no system or user text is trained
  (`prompt-not-trained`);
- every assistant turn's trained tokens end with an end-of-turn token (`end-of-turn`) that the generation config
  stops on (`generation-stops`): otherwise the fine-tuned model never stops generating;
- BOS appears at most once (`bos`);
- no row is cut by `training.max_length` inside an answer (`truncation`: a warning by default, per
  `preflight.truncated_answers`);
- the pad token is not a stop token (`pad-token`: a warning; other tools' collators would mask it out);
- the chat template saved with the adapter reloads byte-identical to the one the examples were built with
  (`chat-template-saved`; its sha256 is in the report).

`lora-tune check RECIPE` prints the report; `train` runs `preflight` first, writes `preflight.json` into the run
directory, and refuses to start when a check fails unless `preflight.on_failure: warn`.
"""

from __future__ import annotations

from lora_tune.check.checks import chat_template_text, preflight, read_generation_stops, run_checks, sha256
from lora_tune.check.report import CheckResult, MarkedExample, PreflightError, PreflightReport
from lora_tune.run.layout import PREFLIGHT_FILE

__all__ = [
    "PREFLIGHT_FILE",
    "CheckResult",
    "MarkedExample",
    "PreflightError",
    "PreflightReport",
    "chat_template_text",
    "preflight",
    "read_generation_stops",
    "run_checks",
    "sha256",
]
