"""Trying a model: one answer (`lora-tune generate`) or a multi-turn chat (`lora-tune chat`), streamed token by token.

Either a run directory (the base loaded as in training, 4-bit when the recipe quantizes, with the adapter on it) or a
merged model folder (as `lora-tune merge` writes it: a plain transformers model with its tokenizer). The prompt is
rendered with the tokenizer's chat template, the one the adapter was trained with.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

from lora_tune.errors import OptionError
from lora_tune.inference.answers import generation_kwargs
from lora_tune.inference.load import LoadedModel, ModelFolderError
from lora_tune.model.chat_template import generation_prompt
from lora_tune.model.stops import stop_token_ids
from lora_tune.recipe.schema import EvalConfig

if TYPE_CHECKING:
    from lora_tune.recipe.schema import EvalConfig

EXIT_COMMANDS = {"/exit", "/quit"}
RESET_COMMAND = "/reset"


def reply(
    loaded: LoadedModel,
    messages: list[dict[str, str]],
    *,
    stream: IO[str] | None = None,
    settings: EvalConfig | None = None,
) -> str:
    """The model's answer to `messages`; with `stream`, its text is also written there token by token."""
    import torch

    settings = settings or loaded.settings
    tokenizer, model = loaded.tokenizer, loaded.model
    if tokenizer.chat_template is None:
        raise ModelFolderError("the tokenizer has no chat template; set model.chat_template in the recipe and retrain")
    prompt = generation_prompt(tokenizer, messages)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(next(model.parameters()).device)
    streamer = _streamer(tokenizer, stream) if stream is not None else None
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            **generation_kwargs(settings, stop_token_ids(model, tokenizer)),
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def _streamer(tokenizer: Any, stream: IO[str]) -> Any:
    """transformers' TextStreamer, writing each finished piece of text to `stream` rather than to print()."""
    from transformers import TextStreamer

    class StreamTo(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return StreamTo(tokenizer, skip_prompt=True, skip_special_tokens=True)


@dataclass
class ChatSession:
    """A multi-turn conversation: the history grows with each exchange; /reset empties it (keeping the system)."""

    loaded: LoadedModel
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def __post_init__(self) -> None:
        self.reset()

    def ask(self, text: str, stream: IO[str] | None = None) -> str:
        self.history.append({"role": "user", "content": text})
        answer = reply(self.loaded, self.history, stream=stream)
        self.history.append({"role": "assistant", "content": answer})
        return answer


def chat_loop(
    loaded: LoadedModel, *, system: str | None = None, stdin: IO[str] | None = None, stdout: IO[str] | None = None
) -> ChatSession:
    """Read user turns line by line from `stdin` until /exit or end of input; stream each answer to `stdout`."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    session = ChatSession(loaded, system=system)
    interactive = stdin.isatty()
    stdout.write(f"Chatting with {loaded.description}. /reset starts over, /exit quits.\n")
    while True:
        if interactive:
            stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input (Ctrl-D, or the end of a piped file)
            break
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            break
        if text == RESET_COMMAND:
            session.reset()
            stdout.write("(history cleared)\n")
            continue
        stdout.write("model> ")
        session.ask(text, stream=stdout)
    return session


def with_settings(loaded: LoadedModel, update: dict[str, Any]) -> LoadedModel:
    """`loaded` with some generation settings replaced, validated as the recipe's `eval:` section is; a bad value
    is an OptionError naming its setting (max_new_tokens, temperature, top_p)."""
    from pydantic import ValidationError

    if not update:
        return loaded
    try:
        settings = EvalConfig.model_validate({**loaded.settings.model_dump(exclude_unset=True), **update})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise OptionError(str(error["loc"][0]), error["msg"]) from None
    return LoadedModel(loaded.model, loaded.tokenizer, settings, loaded.description)


def with_generation(
    loaded: LoadedModel,
    *,
    max_new_tokens: int | None = None,
    sample: bool | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
) -> LoadedModel:
    """`loaded` with the settings given (not None) overriding its `eval:` ones for one call; a temperature or top_p
    implies sampling, since greedy decoding would ignore them."""
    update = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    update = {key: value for key, value in update.items() if value is not None}
    if sample or "temperature" in update or "top_p" in update:
        update["do_sample"] = True
    return with_settings(loaded, update)
