"""What the server needs from a model, whatever serves it: prompt tokens, token-by-token generation, decoding.

`open_backend` picks the backend by the path: a `.gguf` file goes to llama.cpp, a run directory or a merged folder
to transformers (the adapter on its base, unmerged, as `lora-tune generate` loads it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lora_tune.errors import LoraTuneError
from lora_tune.recipe.schema import EvalConfig
from lora_tune.run.layout import RunDir
from lora_tune.serve.protocol import Sampling

# Called with each new token id; returns False to end the generation there.
OnToken = Callable[[int], bool]


class ServeError(LoraTuneError):
    """The server cannot start: a bad path or flag, a missing optional dependency."""


@dataclass(frozen=True)
class Decoding:
    """Greedy (temperature 0) or sampled with a temperature and a nucleus mass."""

    sample: bool
    temperature: float
    top_p: float


def decoding(sampling: Sampling, defaults: EvalConfig) -> Decoding:
    """The request's temperature and top_p over the model's defaults (a run's recipe `eval:` section): temperature
    0 is greedy, above 0 samples; a request without a temperature decodes as `lora-tune generate` would."""
    sample = defaults.do_sample if sampling.temperature is None else sampling.temperature > 0
    temperature = sampling.temperature or defaults.temperature
    top_p = sampling.top_p if sampling.top_p is not None else defaults.top_p
    return Decoding(sample, temperature, top_p)


class Backend(Protocol):
    description: str  # for the startup line: what is served and how
    context_length: int | None  # prompt + answer tokens the model takes; None = unknown
    defaults: EvalConfig  # decoding when a request does not say

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The conversation rendered with the model's chat template, ready for the assistant's turn, as tokens.
        Raises ApiError (400) when the template refuses the conversation."""

    def text_prompt(self, text: str) -> list[int]:
        """A raw completion prompt as tokens."""

    def generate(self, prompt: list[int], sampling: Sampling, on_token: OnToken) -> None:
        """Generate after `prompt`, calling `on_token` with each new token until it returns False, the model ends
        its turn or sampling.max_tokens tokens are made."""

    def decode(self, tokens: list[int]) -> str:
        """The text of generated tokens, special tokens left out."""

    def is_end(self, token: int) -> bool:
        """Whether the token ends the turn (EOS, end-of-turn): generation stops there, finish_reason 'stop'."""


def model_kind(path: Path) -> str:
    """'gguf', 'run' or 'folder', from the path alone (no weights are read); a one-line error otherwise."""
    if not path.exists():
        raise ServeError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ServeError(f"{path}: not a .gguf file; pass a run directory, a merged folder or a .gguf file")
        return "gguf"
    if RunDir(path).is_run():
        return "run"
    if (path / "config.json").is_file():
        return "folder"
    raise ServeError(
        f"{path}: neither a lora-tune run (recipe.yaml), a merged model folder (config.json) nor a .gguf file"
    )
