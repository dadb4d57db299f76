"""What generation stops on: the one place that works out a run's, a model folder's or a loaded model's stop tokens.

Three sources, each read here and nowhere else:
- the chat template's end-of-turn token, the special token it writes right after an assistant's answer
  (`end_of_turn_id`);
- the generation config's eos_token_id, read as transformers reads it: generation_config.json, else config.json
  (`read_generation_stops`; a loaded model carries it as `model.generation_config`);
- the tokens training taught to close assistant turns, as the run's pre-flight report records them
  (preflight.json's `stop_tokens`: `trained_stops`).

`generation_stops` puts them together with the tokenizer's EOS: what lora-tune's generate, chat, eval and serve stop
on, what merge writes into the merged generation config, and what a GGUF export must stop on in llama.cpp.
`config_stops` is the narrower answer the pre-flight check judges: what the model's own generation config stops on,
as any other tool loading the base with the adapter would.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tune.recipe.schema import ModelConfig
from lora_tune.run.layout import RunDir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Written as the assistant's answer to find what the template writes after it.
_ANSWER_MARKER = "lora-tune-answer-marker"


def generation_stops(
    tokenizer: PreTrainedTokenizerBase, configured: int | Sequence[int] | None, trained: Sequence[str] = ()
) -> list[int]:
    """Every token id generation stops on, each once, in this order: the chat template's end-of-turn token, the
    tokenizer's EOS, the generation config's eos ids (`configured`), the tokens training taught (`trained`, as
    token texts; unknown ones are left out). The first id is thus the one that closes an answer: the end of turn,
    else EOS."""
    taught = [i for i in tokenizer.convert_tokens_to_ids(list(trained)) if _known(tokenizer, i)]
    found = [end_of_turn_id(tokenizer), tokenizer.eos_token_id, *_ids(configured), *taught]
    return list(dict.fromkeys(i for i in found if i is not None))


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What a loaded model generates until (`generation_stops` with the model's own generation config)."""
    config = getattr(model, "generation_config", None)
    return generation_stops(tokenizer, getattr(config, "eos_token_id", None))


def config_stops(tokenizer: PreTrainedTokenizerBase, configured: list[int] | None) -> list[int]:
    """What generation stops on by the model's generation config alone: its eos ids; the tokenizer's EOS when no
    config could be read (`configured` None). A config that lists none stays empty: nothing would stop it."""
    if configured is not None:
        return configured
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def read_generation_stops(model: ModelConfig | Path) -> tuple[list[int] | None, str]:
    """The generation config's eos ids of a model (a recipe's `model:`, or a local folder) and where they were
    read: generation_config.json, else config.json, as transformers reads them; None when neither can be read.
    No weights load."""
    from transformers import AutoConfig, GenerationConfig

    if isinstance(model, Path):
        model = ModelConfig(name=str(model))
    try:
        config = GenerationConfig.from_pretrained(model.name, revision=model.revision)
        return _ids(config.eos_token_id), f"{model.name}: generation_config.json"
    except (OSError, ValueError):
        pass
    try:
        config = AutoConfig.from_pretrained(
            model.name, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError, KeyError):
        return None, f"no generation_config.json or config.json found for '{model.name}'; the tokenizer's EOS"
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return _ids(getattr(text_config, "eos_token_id", None)), f"{model.name}: config.json"


def trained_stops(run: RunDir) -> list[str]:
    """The tokens that closed assistant turns in the run's training examples (preflight.json's stop tokens); none
    when the run has no pre-flight report."""
    report = run.preflight
    if not report.is_file():
        return []
    return list(json.loads(report.read_text(encoding="utf-8")).get("stop_tokens") or [])


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template writes right after an assistant's answer, or None (no template, or
    plain text follows the answer)."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _ANSWER_MARKER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - no template, or one that refuses this conversation shape: no answer from it
        return None
    if not isinstance(text, str) or _ANSWER_MARKER not in text:
        return None
    ids = tokenizer(text.split(_ANSWER_MARKER, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return ids[0] if ids and ids[0] in special else None


def _ids(value: int | Sequence[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _known(tokenizer: PreTrainedTokenizerBase, token_id: Any) -> bool:
    return isinstance(token_id, int) and token_id != tokenizer.unk_token_id
