"""A run (the adapter on its base, not merged) or a merged folder, through transformers' `generate()`.

Loading, the chat template, the stop tokens and the decoding settings are those of `lora-tune generate`
(`inference.load.load_for_inference`, `model.stops.stop_token_ids`, `inference.answers.generation_kwargs`). Every
call runs on the server's one generation thread, which is also why the tokenizer (not safe to share across threads)
is only used here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_tune.inference.answers import generation_kwargs
from lora_tune.inference.load import LoadedModel, load_for_inference
from lora_tune.model.chat_template import generation_prompt
from lora_tune.model.stops import stop_token_ids
from lora_tune.serve.backend import OnToken, decoding
from lora_tune.serve.protocol import ApiError, Sampling


class TransformersBackend:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model, self.tokenizer, self.defaults = loaded.model, loaded.tokenizer, loaded.settings
        self.description = loaded.description
        self.stops = stop_token_ids(self.model, self.tokenizer)
        self.end_ids = set(self.stops) if self.defaults.stop_on_eos else set()
        self.context_length: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self.device = next(self.model.parameters()).device

    @classmethod
    def open(cls, path: Path) -> TransformersBackend:
        return cls(load_for_inference(path))

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if self.tokenizer.chat_template is None:
            raise ApiError(400, "this model has no chat template; use /v1/completions", code="no_chat_template")
        try:
            prompt = generation_prompt(self.tokenizer, messages)
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception() (e.g. roles must alternate)
            raise ApiError(400, f"messages: the chat template refused them: {exc}", param="messages") from None
        # The template writes BOS itself, as in training and `lora-tune generate`.
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def is_end(self, token: int) -> bool:
        return token in self.end_ids

    def generate(self, prompt: list[int], sampling: Sampling, on_token: OnToken) -> None:
        import torch

        chosen = decoding(sampling, self.defaults)
        settings = self.defaults.model_copy(
            update={
                "do_sample": chosen.sample,
                "temperature": chosen.temperature,
                "top_p": chosen.top_p,
                "max_new_tokens": sampling.max_tokens,
            }
        )
        if sampling.seed is not None:
            # One generation at a time on this thread, so seeding the global generator makes the request
            # reproducible without any other request drawing from it in between.
            torch.manual_seed(sampling.seed % 2**64)
        relay = _Relay(on_token)
        inputs = torch.tensor([prompt], device=self.device)
        with torch.no_grad():
            self.model.generate(
                input_ids=inputs,
                attention_mask=torch.ones_like(inputs),
                max_new_tokens=sampling.max_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=relay,
                stopping_criteria=relay.criteria(),
                **generation_kwargs(settings, self.stops),
            )


class _Relay:
    """generate()'s streamer: hands each new token to `on_token`, and stops generate() when it says so."""

    def __init__(self, on_token: OnToken):
        self.on_token, self.prompt_seen, self.halt = on_token, False, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt itself
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if not self.halt and not self.on_token(int(token)):
                self.halt = True

    def end(self) -> None:
        pass

    def criteria(self) -> Any:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        relay = self

        class Halt(StoppingCriteria):
            # generate() checks its stopping criteria right after putting the token, so the halt takes effect
            # before another token is computed.
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), relay.halt, dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([Halt()])
