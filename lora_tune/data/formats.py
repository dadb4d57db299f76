"""Dataset formats: detect a dataset's layout and turn each row into the one canonical form, an `Example`.

Canonical form, the only thing later stages see: `Example.messages`, a list of `{"role", "content"}` turns with
roles system, user, assistant or tool and string contents (an assistant turn may carry `tool_calls`, OpenAI style:
`[{"type": "function", "function": {"name", "arguments"}}]`), whose first non-system turn is a user turn and whose
last turn is an assistant turn; `Example.tools`, the tool definitions the chat template lists; or, for the text
format only, `Example.text` (continued pretraining: the whole text is trained, no chat template). Every assistant
turn is trained on; tool results (tool turns) never are. Pure Python: importing this module loads no ML library.

Reasoning: an assistant turn's reasoning is `reasoning_content` beside its answer in `content` (the OpenAI /
DeepSeek field). A `<think>...</think>` block opening an assistant content, in any format, is moved there
(`split_reasoning`), so every later stage sees one form; an empty block is no reasoning and is dropped.

Formats: messages (OpenAI), alpaca, sharegpt ({from, value} turns, tool calls as function_call/observation turns
and a `tools` column), prompt_completion, text; `columns:` in the recipe maps the user's column names to a format's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict

from lora_tune.data.sources import Origin
from lora_tune.errors import DataError
from lora_tune.recipe.schema import DatasetConfig

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")
MESSAGE_COLUMNS = ("messages", "conversations")  # columns holding a list of {role, content} turns
ALPACA_COLUMNS = ("instruction", "output")  # required; `input` and `system` are optional
PROMPT_COLUMNS = ("prompt", "completion")
TEXT_COLUMN = "text"
FORMATS = ("messages", "alpaca", "sharegpt", "prompt_completion", "text")

# ShareGPT speaker names (lower-cased) and the canonical role each one is; function_call turns are assistant turns
# that call a tool, observation turns carry the tool's result.
SHAREGPT_ROLES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "function_call": "tool_call",
    "tool_call": "tool_call",
    "function": "tool",
    "observation": "tool",
    "tool": "tool",
    "tool_response": "tool",
    "ipython": "tool",
}


class Message(TypedDict):
    role: Role
    content: str
    tool_calls: NotRequired[list[dict[str, Any]]]
    tool_call_id: NotRequired[str]  # a tool turn: the call it answers (Mistral's template requires it)
    reasoning_content: NotRequired[str]  # an assistant turn's reasoning (non-empty), its answer in `content`


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a reply that opens with a `<think>...</think>` block, else (None, text).

    The reasoning is stripped of the newlines around it and the answer of those before it, as the Qwen3 and
    DeepSeek templates read the block; an empty block gives (None, answer).
    """
    body = text.lstrip()
    if not body.startswith(THINK_OPEN) or THINK_CLOSE not in body:
        return None, text
    reasoning, _, answer = body[len(THINK_OPEN) :].partition(THINK_CLOSE)
    reasoning = reasoning.strip("\n")
    return (reasoning if reasoning.strip() else None), answer.lstrip("\n")


def has_reasoning(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether an assistant turn of the conversation carries reasoning (`reasoning_content`)."""
    return any(m.get("role") == "assistant" and m.get("reasoning_content") for m in messages)


Conversation = list[Message]


@dataclass(frozen=True)
class Example:
    """One training example in canonical form: a conversation (with its tools), or plain text."""

    messages: Conversation
    tools: list[dict[str, Any]] | None = None
    text: str | None = None  # the text format: trained whole, no chat template


def detect_format(row: Mapping[str, Any], *, file: str) -> str:
    """The format of a dataset whose first row is `row`, from its columns; raises when none or several fit."""
    keys = set(row)
    matches = [
        name
        for name, fits in (
            ("messages", bool(keys & set(MESSAGE_COLUMNS)) and not _is_sharegpt(row)),
            ("sharegpt", _is_sharegpt(row)),
            ("alpaca", set(ALPACA_COLUMNS) <= keys),
            ("prompt_completion", set(PROMPT_COLUMNS) <= keys),
        )
        if fits
    ]
    if not matches and TEXT_COLUMN in keys:
        matches = ["text"]  # lowest priority: many chat datasets also ship a rendered `text` column
    if len(matches) == 1:
        return matches[0]
    found = ", ".join(sorted(keys)) or "none"
    if matches:
        raise DataError(
            f"ambiguous format: the columns ({found}) fit both {' and '.join(matches)}; set format: in the recipe",
            file=file,
            row=1,
        )
    raise DataError(
        f"cannot detect the format from the columns ({found}); expected 'messages' or 'conversations' "
        "(messages/sharegpt), 'instruction' and 'output' (alpaca), 'prompt' and 'completion', or 'text'; "
        "set format: or map your columns with columns:",
        file=file,
        row=1,
    )


def _is_sharegpt(row: Mapping[str, Any]) -> bool:
    turns = row.get("conversations")
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]


def resolve_format(cfg: DatasetConfig, first_row: Mapping[str, Any]) -> str:
    """The recipe's format, or the one detected from the first row (after column mapping) when auto."""
    return detect_format(first_row, file=cfg.path) if cfg.format == "auto" else cfg.format


def map_columns(row: Mapping[str, Any], columns: Mapping[str, str], origin: Origin) -> dict[str, Any]:
    """The row with the recipe's `columns: {field: your_column}` renamed to the format's field names."""
    if not columns:
        return dict(row)
    mapped = dict(row)
    for target, column in columns.items():
        if column not in row:
            raise origin.error(f"column '{column}' (columns.{target}) not found; the row has: {_keys(row)}", column)
        mapped[target] = row[column]
    for column in set(columns.values()) - set(columns):
        mapped.pop(column, None)
    return mapped


def to_example(row: Mapping[str, Any], fmt: str, origin: Origin, system_prompt: str | None = None) -> Example:
    """Convert one row of format `fmt` to the canonical form; `system_prompt` is used when the row has none."""
    if fmt not in _CONVERTERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(_CONVERTERS)}")
    example = _CONVERTERS[fmt](row, origin)
    messages = example.messages
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            _move_inline_reasoning(message, origin, i)
    if system_prompt is not None and messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return example


def to_conversation(
    row: Mapping[str, Any], fmt: str, *, file: str, row_number: int, system_prompt: str | None = None
) -> Conversation:
    """The canonical conversation of one row (not for the text format, which has none)."""
    origin = Origin(file, row_number)
    example = to_example(row, fmt, origin, system_prompt)
    if example.text is not None:
        raise origin.error("the text format has no conversation; it is trained as plain text", TEXT_COLUMN)
    return example.messages


def normalize_rows(rows: Sequence[Mapping[str, Any]], cfg: DatasetConfig) -> list[Conversation]:
    """Every row of one dataset as a canonical conversation; the format is detected from the first row when auto."""
    if not rows:
        raise DataError("has no rows", file=cfg.path)
    origins = [Origin(cfg.path, i) for i in range(1, len(rows) + 1)]
    mapped = [map_columns(row, cfg.columns, origin) for row, origin in zip(rows, origins, strict=True)]
    fmt = resolve_format(cfg, mapped[0])
    return [
        to_conversation(row, fmt, file=cfg.path, row_number=o.number, system_prompt=cfg.system_prompt)
        for row, o in zip(mapped, origins, strict=True)
    ]


def _from_messages(row: Mapping[str, Any], where: Origin) -> Example:
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
            raise where.error("uses ShareGPT keys from/value; expected role/content (or format: sharegpt)", field)
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise where.error(f"unknown role {role!r}; expected one of {', '.join(ROLES)}", f"{field}.role")
        calls = turn.get("tool_calls")
        if content is None and role == "assistant" and calls:
            content = ""
        if not isinstance(content, str):
            raise where.error(f"must be a string, got {_type_name(content)}", f"{field}.content")
        message: Message = {"role": role, "content": content}
        if calls:
            message["tool_calls"] = _tool_calls(calls, where, f"{field}.tool_calls")
        if role == "tool" and isinstance(turn.get("tool_call_id"), str):
            message["tool_call_id"] = turn["tool_call_id"]
        reasoning = turn.get("reasoning_content")
        if reasoning is not None:
            if role != "assistant":
                raise where.error(
                    f"is set on a {role} turn; only assistant turns reason", f"{field}.reasoning_content"
                )
            if not isinstance(reasoning, str):
                raise where.error(f"must be a string, got {_type_name(reasoning)}", f"{field}.reasoning_content")
            if reasoning.strip():
                message["reasoning_content"] = reasoning.strip("\n")
        conversation.append(message)
    _check_shape(conversation, where, column)
    return Example(conversation, _tools(row, where))


def _from_sharegpt(row: Mapping[str, Any], where: Origin) -> Example:
    column = "conversations"
    turns = row.get(column)
    if turns is None:
        raise where.error(f"missing; the sharegpt format needs a list of {{from, value}} turns ({_keys(row)})", column)
    if not isinstance(turns, list) or not turns:
        raise where.error("must be a non-empty list of {from, value} turns", column)
    conversation: Conversation = []
    for i, turn in enumerate(turns):
        field = f"{column}[{i}]"
        if not isinstance(turn, dict):
            raise where.error(f"must be an object with from and value, got {type(turn).__name__}", field)
        speaker, value = turn.get("from"), turn.get("value")
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            known = ", ".join(SHAREGPT_ROLES)
            raise where.error(f"unknown speaker {speaker!r}; expected one of {known}", f"{field}.from")
        if not isinstance(value, str):
            raise where.error(f"must be a string, got {_type_name(value)}", f"{field}.value")
        if role == "tool_call":
            conversation.append({"role": "assistant", "content": "", "tool_calls": _parse_call(value, where, field)})
        else:
            conversation.append({"role": role, "content": value})  # type: ignore[typeddict-item]
    if "system" in row and isinstance(row["system"], str) and row["system"].strip():
        if conversation[0]["role"] != "system":
            conversation.insert(0, {"role": "system", "content": row["system"]})
    _check_shape(conversation, where, column)
    return Example(conversation, _tools(row, where))


def _from_alpaca(row: Mapping[str, Any], where: Origin) -> Example:
    instruction = _text(row, "instruction", where, required=True)
    output = _text(row, "output", where, required=True)
    extra = _text(row, "input", where, required=False)
    system = _text(row, "system", where, required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    conversation: Conversation = [{"role": "system", "content": system}] if system else []
    conversation += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Example(conversation)


def _from_prompt_completion(row: Mapping[str, Any], where: Origin) -> Example:
    """`prompt` and `completion` as strings, or as lists of {role, content} turns (TRL's conversational form)."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        return _from_messages({"messages": [*prompt, *completion]}, where)
    prompt_text = _text(row, "prompt", where, required=True)
    completion_text = _text(row, "completion", where, required=True)
    system = _text(row, "system", where, required=False)
    conversation: Conversation = [{"role": "system", "content": system}] if system else []
    conversation += [{"role": "user", "content": prompt_text}, {"role": "assistant", "content": completion_text}]
    return Example(conversation)


def _from_text(row: Mapping[str, Any], where: Origin) -> Example:
    return Example([], text=_text(row, TEXT_COLUMN, where, required=True))


def _move_inline_reasoning(message: Message, where: Origin, index: int) -> None:
    """An assistant content's opening `<think>` block moved to `reasoning_content` (the one canonical form)."""
    reasoning, answer = split_reasoning(message["content"])
    if reasoning is None and answer == message["content"]:
        return
    if "reasoning_content" in message:
        raise where.error(
            "has reasoning twice: in reasoning_content and as a <think> block opening content; expected one of them",
            f"messages[{index}].content",
        )
    message["content"] = answer
    if reasoning is not None:
        message["reasoning_content"] = reasoning


def _parse_call(value: str, where: Origin, field: str) -> list[dict[str, Any]]:
    """A ShareGPT function_call value: JSON of one call {name, arguments} or a list of them."""
    try:
        parsed = json.loads(value)
    except ValueError as e:
        raise where.error(f"a function_call value must be JSON {{name, arguments}}: {e}", f"{field}.value") from e
    return _tool_calls(parsed if isinstance(parsed, list) else [parsed], where, f"{field}.value")


def _tool_calls(calls: Any, where: Origin, field: str) -> list[dict[str, Any]]:
    """Tool calls in OpenAI form, from either it or bare {name, arguments} objects."""
    if not isinstance(calls, list):
        raise where.error(f"must be a list of tool calls, got {_type_name(calls)}", field)
    out = []
    for call in calls:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise where.error("each tool call needs a name (and arguments)", field)
        arguments = function.get("arguments", function.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass  # keep text arguments as they are; templates print strings verbatim
        kept: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
        if isinstance(call, dict) and isinstance(call.get("id"), str):  # templates that pair results with calls
            kept["id"] = call["id"]
        out.append(kept)
    return out


def _tools(row: Mapping[str, Any], where: Origin) -> list[dict[str, Any]] | None:
    """The row's `tools` column (a list of tool definitions or its JSON text), or None."""
    tools = row.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as e:
            raise where.error(f"must be a JSON list of tool definitions: {e}", "tools") from e
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise where.error("must be a list of tool definitions (objects)", "tools")
    return tools or None


def _check_shape(conversation: Conversation, where: Origin, column: str) -> None:
    """First non-system turn is the user's, tool turns follow a call, and the conversation ends with the assistant."""
    first = next((i for i, m in enumerate(conversation) if m["role"] != "system"), None)
    if first is None or not any(m["role"] == "assistant" for m in conversation):
        raise where.error("has no assistant turn; there is nothing to train on", column)
    if conversation[first]["role"] != "user":
        raise where.error(
            f"is {conversation[first]['role']!r}; the first non-system turn must be 'user'", f"{column}[{first}].role"
        )
    for i, message in enumerate(conversation):
        if message["role"] == "tool" and conversation[i - 1]["role"] not in ("assistant", "tool"):
            raise where.error("is a tool result that follows no tool call", f"{column}[{i}].role")
    last = len(conversation) - 1
    if conversation[last]["role"] != "assistant":
        raise where.error(
            f"is {conversation[last]['role']!r}; the last turn must be 'assistant' (the reply that is trained on)",
            f"{column}[{last}].role",
        )


def _text(row: Mapping[str, Any], key: str, where: Origin, *, required: bool) -> str:
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


_CONVERTERS: dict[str, Callable[[Mapping[str, Any], Origin], Example]] = {
    "messages": _from_messages,
    "alpaca": _from_alpaca,
    "sharegpt": _from_sharegpt,
    "prompt_completion": _from_prompt_completion,
    "text": _from_text,
}
