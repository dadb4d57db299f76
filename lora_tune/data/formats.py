"""Dataset formats: detect a dataset's layout and turn each row into the one canonical conversation form.

Canonical form, the only thing later stages see: a list of `{"role", "content"}` turns with roles system, user or
assistant and string contents, whose first non-system turn is a user turn and whose last turn is an assistant turn
(every assistant turn is trained on). Pure Python: importing this module loads no ML library.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict

from lora_tune.config import DatasetConfig
from lora_tune.errors import DataError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")
MESSAGE_COLUMNS = ("messages", "conversations")  # columns holding a list of {role, content} turns
ALPACA_COLUMNS = ("instruction", "output")  # required; `input` and `system` are optional


class Message(TypedDict):
    role: Role
    content: str


Conversation = list[Message]


@dataclass(frozen=True)
class _Where:
    """Where a row came from, to build errors that name the file, the row and the field."""

    file: str
    row: int

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, file=self.file, row=self.row, field=field)


def detect_format(row: Mapping[str, Any], *, file: str) -> str:
    """The format of a dataset whose first row is `row`: 'messages' or 'alpaca'."""
    keys = set(row)
    matches = [
        name
        for name, fits in (
            ("messages", bool(keys & set(MESSAGE_COLUMNS))),
            ("alpaca", set(ALPACA_COLUMNS) <= keys),
        )
        if fits
    ]
    if len(matches) == 1:
        return matches[0]
    found = ", ".join(sorted(keys)) or "none"
    if matches:
        raise DataError(
            f"ambiguous format: the columns ({found}) fit both messages and alpaca; set format: in the recipe",
            file=file,
            row=1,
        )
    raise DataError(
        f"cannot detect the format from the columns ({found}); expected 'messages' or 'conversations' "
        "(messages format) or 'instruction' and 'output' (alpaca format)",
        file=file,
        row=1,
    )


def to_conversation(
    row: Mapping[str, Any], fmt: str, *, file: str, row_number: int, system_prompt: str | None = None
) -> Conversation:
    """Convert one row of format `fmt` to the canonical form; `system_prompt` is used when the row has none."""
    if fmt not in _CONVERTERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(_CONVERTERS)}")
    conversation = _CONVERTERS[fmt](row, _Where(file, row_number))
    if system_prompt is not None and conversation[0]["role"] != "system":
        conversation.insert(0, {"role": "system", "content": system_prompt})
    return conversation


def normalize_rows(rows: Sequence[Mapping[str, Any]], cfg: DatasetConfig) -> list[Conversation]:
    """Every row of one dataset as a canonical conversation; the format is detected from the first row when auto."""
    if not rows:
        raise DataError("has no rows", file=cfg.path)
    fmt = detect_format(rows[0], file=cfg.path) if cfg.format == "auto" else cfg.format
    return [
        to_conversation(row, fmt, file=cfg.path, row_number=i, system_prompt=cfg.system_prompt)
        for i, row in enumerate(rows, start=1)
    ]


def _from_messages(row: Mapping[str, Any], where: _Where) -> Conversation:
    column = next((c for c in MESSAGE_COLUMNS if c in row), None)
    if column is None:
        raise where.error(f"missing; the messages format needs a list of turns (found: {_keys(row)})", "messages")
    turns = row[column]
    if not isinstance(turns, list) or not turns:
        raise where.error("must be a non-empty list of {role, content} turns", column)
    conversation: Conversation = []
    for i, turn in enumerate(turns):
        field = f"{column}[{i}]"
        if not isinstance(turn, dict):
            raise where.error(f"must be an object with role and content, got {type(turn).__name__}", field)
        if "role" not in turn and {"from", "value"} <= set(turn):
            raise where.error("uses ShareGPT keys from/value; expected role/content", field)
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise where.error(f"unknown role {role!r}; expected one of {', '.join(ROLES)}", f"{field}.role")
        if not isinstance(content, str):
            raise where.error(f"must be a string, got {_type_name(content)}", f"{field}.content")
        conversation.append({"role": role, "content": content})
    _check_shape(conversation, where, column)
    return conversation


def _from_alpaca(row: Mapping[str, Any], where: _Where) -> Conversation:
    instruction = _text(row, "instruction", where, required=True)
    output = _text(row, "output", where, required=True)
    extra = _text(row, "input", where, required=False)
    system = _text(row, "system", where, required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    conversation: Conversation = [{"role": "system", "content": system}] if system else []
    conversation += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return conversation


def _check_shape(conversation: Conversation, where: _Where, column: str) -> None:
    """First non-system turn is the user's, at least one assistant turn, and the conversation ends with one."""
    first = next((i for i, m in enumerate(conversation) if m["role"] != "system"), None)
    if first is None or not any(m["role"] == "assistant" for m in conversation):
        raise where.error("has no assistant turn; there is nothing to train on", column)
    if conversation[first]["role"] != "user":
        raise where.error(
            f"is {conversation[first]['role']!r}; the first non-system turn must be 'user'", f"{column}[{first}].role"
        )
    last = len(conversation) - 1
    if conversation[last]["role"] != "assistant":
        raise where.error(
            f"is {conversation[last]['role']!r}; the last turn must be 'assistant' (the reply that is trained on)",
            f"{column}[{last}].role",
        )


def _text(row: Mapping[str, Any], key: str, where: _Where, *, required: bool) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise where.error(f"missing (found: {_keys(row)})", key)
        return ""
    if not isinstance(value, str):
        raise where.error(f"must be a string, got {_type_name(value)}", key)
    return value


def _keys(row: Mapping[str, Any]) -> str:
    return ", ".join(sorted(row)) or "no columns"


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


_CONVERTERS: dict[str, Callable[[Mapping[str, Any], _Where], Conversation]] = {
    "messages": _from_messages,
    "alpaca": _from_alpaca,
}
