"""A `.gguf` file through llama.cpp (llama-cpp-python), with the chat template stored in the file.

The conversation is rendered by llama-cpp-python's own Jinja formatter from the GGUF's `tokenizer.chat_template`
(as its `create_chat_completion` does) and generated token by token, stopping at any end-of-generation token the
vocabulary marks (EOS, end of turn). llama_cpp is imported only here, when a GGUF is served.

Several requests at once: `slots` llama.cpp contexts over the same weights (memory-mapped once by the operating
system; each context has its own key/value cache), each generating one request on its own scheduler thread; llama.cpp
releases the interpreter while it computes, so the slots run side by side. llama-cpp-python's high-level binding
has no multi-sequence batch (llama.cpp's own server batches its slots in one context); contexts are its equivalent.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from lora_tune.recipe.schema import EvalConfig
from lora_tune.serve.backend import OnToken, ServeError, decoding
from lora_tune.serve.protocol import ApiError, Sampling

INSTALL_HINT = "pip install 'lora-tune[llama-cpp]' (or `make llama-cpp` in a checkout)"


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ServeError(f"serving a .gguf file needs llama-cpp-python: {INSTALL_HINT}") from None
    return llama_cpp


class GgufBackend:
    def __init__(self, path: Path, context_length: int = 0, slots: int = 1):
        llama_cpp = import_llama_cpp()
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llama_cpp = llama_cpp
        try:
            # n_ctx 0 = the context the model was trained with, as the file says.
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=context_length, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ServeError(f"{path}: llama.cpp cannot load it: {exc}") from None
        self.description = f"{path} (GGUF, llama.cpp)"
        self.context_length: int | None = self.llm.n_ctx()
        self.defaults = EvalConfig()  # a GGUF carries no recipe: greedy, as a merged folder
        template = self.llm.metadata.get("tokenizer.chat_template")
        self.formatter = (
            Jinja2ChatFormatter(template, eos_token=self._token_text(self.llm.token_eos()), bos_token=self._bos())
            if template
            else None
        )
        # The other slots: contexts of their own; the weights are mapped once, not read again.
        self.slots: list[GgufBackend] = [self] + [GgufBackend(path, context_length) for _ in range(slots - 1)]

    def _token_text(self, token: int) -> str:
        return self.llm._model.token_get_text(token) if token != -1 else ""

    def _bos(self) -> str:
        return self._token_text(self.llm.token_bos())

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if self.formatter is None:
            raise ApiError(400, "this GGUF has no chat template; use /v1/completions", code="no_chat_template")
        try:
            rendered = self.formatter(messages=messages)
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception() (e.g. roles must alternate)
            raise ApiError(400, f"messages: the chat template refused them: {exc}", param="messages") from None
        # The template writes BOS itself (as llama-cpp-python's chat handler assumes); special=True parses the
        # template's markers as the special tokens they are.
        return self.llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)

    def text_prompt(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True)

    def decode(self, tokens: list[int]) -> str:
        # A token may hold part of a UTF-8 character: it decodes as U+FFFD until the rest arrives (see stops.py).
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))

    def generate(self, prompt: list[int], sampling: Sampling, on_token: OnToken) -> None:
        chosen = decoding(sampling, self.defaults)
        # llama.cpp seeds its sampler when generate() builds it; without a seed, a fresh one per request.
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
        self.llm.set_seed(seed % 2**32)
        tokens = self.llm.generate(
            prompt,
            temp=chosen.temperature if chosen.sample else 0.0,
            top_p=chosen.top_p,
            top_k=0,  # off, as in transformers' generate() with lora-tune's settings: temperature and top_p only
            min_p=0.0,
            repeat_penalty=1.0,
        )
        for count, token in enumerate(tokens, start=1):
            if not on_token(token) or count >= sampling.max_tokens:
                break
