"""Preference data: rows of prompt / chosen / rejected (dpo, orpo, simpo) or prompt / completion / label (kto), in
the conversational form TRL's preference trainers render with the run's chat template.

Accepted rows (after the recipe's `columns:` mapping):
- strings: `{"prompt": str, "chosen": str, "rejected": str}`;
- conversational, as UltraFeedback-binarized: `chosen` and `rejected` are whole message lists that share the prompt
  turns and end with one assistant turn each (`prompt` may be absent, a string, or the shared turns);
- kto: `{"prompt": str | messages, "completion": str | [assistant turn], "label": bool}`.

Every pair becomes `{"prompt": [turns...], "chosen": [assistant], "rejected": [assistant]}`: TRL renders the prompt
once with the generation prompt and each answer as the assistant turn of the full conversation, so both answers end
with the end-of-turn marker the template writes. Rows the objective cannot learn from are refused with their file
and line: chosen equal to rejected, chosen and rejected after different prompts, empty answers; and so is a KTO
training set whose labels are all true or all false. A row with more text than SFT rows may have
(`sources.RowLimit`) is refused as it is read, before anything tokenizes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lora_tune.data.cleaning import hold_out
from lora_tune.data.formats import map_columns
from lora_tune.data.sources import Origin, RowLimit, read_source, text_chars
from lora_tune.errors import DataError
from lora_tune.recipe.rules import OBJECTIVES
from lora_tune.recipe.schema import DatasetConfig, Recipe

PAIR_COLUMNS = ("chosen", "rejected")
KTO_COLUMNS = ("completion", "label")
Turns = list[dict[str, str]]
ROW_LIMIT = RowLimit(skippable=False)  # SFT rows' bound; data.on_bad_rows does not apply: every row is read


@dataclass
class PreferenceSplits:
    """The preference rows of a run: train and validation (and test), each row one TRL example."""

    train: list[dict[str, Any]]
    validation: list[dict[str, Any]] = field(default_factory=list)
    test: list[dict[str, Any]] = field(default_factory=list)


def load_preference_splits(recipe: Recipe) -> PreferenceSplits:
    """Every source of the recipe read and checked; validation from eval_datasets or a seeded val_size share."""
    kto = OBJECTIVES[recipe.training.objective].rows == "kto"
    train = [row for source in recipe.datasets for row in read_preference_rows(source, kto=kto)]
    validation = [row for source in recipe.eval_datasets for row in read_preference_rows(source, kto=kto)]
    test = [row for source in recipe.test_datasets for row in read_preference_rows(source, kto=kto)]
    if recipe.val_size > 0 and not validation:
        validation, train = hold_out(train, recipe.val_size, recipe.training.seed)
    if not train:
        raise DataError("no training rows left after the validation split", file=recipe.datasets[0].path)
    if kto and (one_kind := one_class(train)):
        files = ", ".join(dict.fromkeys(source.path for source in recipe.datasets))
        raise DataError("; ".join(one_kind), file=files, field="label")
    return PreferenceSplits(train, validation, test)


def one_class(rows: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(why, fix) when KTO rows are labelled all true or all false; None when both kinds are there.

    KTO learns from desirable and undesirable answers together: with one kind it only pushes their likelihood one
    way against the reference (SFT, or unlikelihood, without a preference), so such a set is refused like the rows
    that cannot teach a preference."""
    labels = {row["label"] for row in rows}
    if len(labels) != 1:
        return None
    kind, other = ("true (desirable)", "false") if True in labels else ("false (undesirable)", "true")
    why = (
        f"all {len(rows):,} training rows are labelled {kind}; KTO learns a preference from desirable and "
        "undesirable answers together"
    )
    return why, f"add rows labelled {other}"


def read_preference_rows(source: DatasetConfig, *, kto: bool) -> list[dict[str, Any]]:
    """One source's rows as TRL preference examples, each checked; errors name the file and line."""
    return [row for _, row in preference_rows_with_origins(source, kto=kto)]


def preference_rows_with_origins(
    source: DatasetConfig, *, kto: bool, refused: list[tuple[Origin, DataError]] | None = None
) -> list[tuple[Origin, dict[str, Any]]]:
    """(where the row is, the TRL example) for each row of one source, each checked. A row that cannot teach a
    preference raises, unless `refused` collects it (the pre-flight check counts them all)."""
    rows = read_source(source, row_limit=ROW_LIMIT).rows
    if not rows:
        raise DataError("has no rows", file=source.path)
    to_example = to_kto_example if kto else to_pair
    examples = []
    for origin, row in rows:
        try:
            example = to_example(map_columns(row, source.columns, origin), origin, source.system_prompt)
        except DataError as error:
            if refused is None:
                raise
            refused.append((origin, error))
            continue
        within_row_limit(example, origin)  # refused at once, as an SFT row is: never tokenized, never counted
        examples.append((origin, example))
    return examples


def within_row_limit(example: dict[str, Any], origin: Origin) -> None:
    """Raise when the example has more text than a row may have (`sources.RowLimit`), naming its longest column.

    Checked on the converted example, as SFT rows are, before the pre-flight or a trainer tokenizes it: a 15.6 MB
    answer cost `check` 42 s and 3.3 GB before it was bounded."""
    sizes = {column: text_chars(value) for column, value in example.items()}
    size = sum(sizes.values())
    if size > ROW_LIMIT.chars:
        raise origin.error(ROW_LIMIT.refusal(f"has {size:,} characters of text"), max(sizes, key=sizes.__getitem__))


def to_pair(row: Mapping[str, Any], origin: Origin, system_prompt: str | None = None) -> dict[str, Turns]:
    """`{"prompt": turns, "chosen": [assistant], "rejected": [assistant]}` from one row of either pair layout."""
    missing = [c for c in PAIR_COLUMNS if c not in row]
    if missing:
        needs = "a preference row needs prompt, chosen and rejected"
        raise origin.error(f"{needs}; '{missing[0]}' is missing", missing[0])
    prompt_c, chosen = _split_answer(row["chosen"], row.get("prompt"), origin, "chosen")
    prompt_r, rejected = _split_answer(row["rejected"], row.get("prompt"), origin, "rejected")
    if prompt_c != prompt_r:
        raise origin.error("chosen and rejected follow different prompts; a pair answers one prompt", "rejected")
    if chosen == rejected:
        raise origin.error("chosen equals rejected: the pair prefers nothing", "rejected")
    return {"prompt": _with_system(prompt_c, system_prompt), "chosen": chosen, "rejected": rejected}


def to_kto_example(row: Mapping[str, Any], origin: Origin, system_prompt: str | None = None) -> dict[str, Any]:
    """`{"prompt": turns, "completion": [assistant], "label": bool}` from one KTO row."""
    missing = [c for c in (*KTO_COLUMNS, "prompt") if c not in row]
    if missing:
        raise origin.error(f"a kto row needs prompt, completion and label; '{missing[0]}' is missing", missing[0])
    label = row["label"]
    if not isinstance(label, bool):
        raise origin.error(f"label must be true or false, got {label!r}", "label")
    prompt, completion = _split_answer(row["completion"], row["prompt"], origin, "completion")
    return {"prompt": _with_system(prompt, system_prompt), "completion": completion, "label": label}


def _split_answer(answer: Any, prompt: Any, origin: Origin, column: str) -> tuple[Turns, Turns]:
    """(prompt turns, [the assistant turn]) from an answer given as text or as a whole conversation."""
    if isinstance(answer, str):
        text = answer
        turns = _prompt_turns(prompt, origin)
    elif _is_turns(answer) and answer and answer[-1]["role"] == "assistant":
        text = answer[-1]["content"]
        shared = [dict(m) for m in answer[:-1]]
        turns = shared if shared else _prompt_turns(prompt, origin)
        if shared and prompt is not None and _prompt_turns(prompt, origin) != _tail(shared, prompt, origin):
            raise origin.error(f"the turns before the {column} answer are not the row's prompt", column)
    else:
        raise origin.error(f"{column} must be a string or a message list ending with an assistant turn", column)
    if not text.strip():
        raise origin.error(f"{column} is empty", column)
    if not turns or turns[-1]["role"] != "user":
        raise origin.error("the prompt must end with a user turn", "prompt")
    return turns, [{"role": "assistant", "content": text}]


def _tail(shared: Turns, prompt: Any, origin: Origin) -> Turns:
    """The shared turns compared with `prompt`: all of them, or the last as many as the prompt has."""
    wanted = _prompt_turns(prompt, origin)
    return shared[-len(wanted) :] if len(wanted) <= len(shared) else shared


def _prompt_turns(prompt: Any, origin: Origin) -> Turns:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise origin.error("prompt is empty", "prompt")
        return [{"role": "user", "content": prompt}]
    if _is_turns(prompt) and prompt:
        return [dict(m) for m in prompt]
    raise origin.error("prompt must be a string or a message list", "prompt")


def _is_turns(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def _with_system(turns: Turns, system_prompt: str | None) -> Turns:
    if system_prompt is not None and turns[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}, *turns]
    return turns


def tokenize_pair(tokenizer: Any, row: dict[str, Any]) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [answer ids, ...]) as TRL's preference trainers tokenize a conversational row."""
    prompt = _ids(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True))
    answers = [row[k] for k in ("chosen", "rejected", "completion") if k in row]
    return prompt, [split_completion(tokenizer, row["prompt"], answer)[1] for answer in answers]


def split_completion(tokenizer: Any, prompt: Turns, answer: Turns) -> tuple[list[int], list[int]]:
    """(context ids, answer ids) of the whole conversation: the answer starts where the conversation's tokens part
    from the prompt rendered with its generation prompt (not always at the prompt's end: TRL's rule)."""
    prompt_ids = _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))
    full = _ids(tokenizer.apply_chat_template(prompt + answer, tokenize=True))
    start = _common_prefix(prompt_ids, full)
    return full[:start], full[start:]


def _ids(encoded: Any) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
