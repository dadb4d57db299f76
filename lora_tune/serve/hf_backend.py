"""A run (the adapter on its base, not merged) or a merged folder, through transformers' `generate()`.

Loading, the chat template, the stop tokens and the decoding settings are those of `lora-tune generate`
(`inference.load.load_for_inference`, `model.stops.stop_token_ids`, `inference.answers.generation_kwargs`). Every
call runs on the server's one generation thread, which is also why the tokenizer (not safe to share across threads)
is only used here.

Requests that arrive together are generated together (`open_batch`): each step runs one forward pass for every
row; a new request's prompt is read in its own pass and its key/value cache joins the batch's, left-padded, between
two steps; a finished row leaves at once. Each row keeps its own positions, attention mask, sampler and seed, so a
batched answer is the answer the request gets alone (greedy: the same tokens; sampled: the same seed gives the same
text whatever else is in the batch). transformers' own continuous batching (`init_continuous_batching`) shares one
sampling configuration and random generator across the batch (no per-request seed), and on this CPU it took 61 s
for six 16-token greedy requests on a tiny Llama that this batch answers in 3 s (the same tokens). A model whose
cache is not a plain per-layer key/value cache (sliding-window or linear-attention layers) is served one request at
a time.
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
        # Any id fills a padded position (the attention mask hides it); the tokenizer's pad token where it has one.
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.batchable = _is_plain_cache(self.model)

    def open_batch(self) -> _Batch:
        """An empty batch of rows to generate together (the server's scheduler adds requests to it)."""
        return _Batch(self)

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


def _is_plain_cache(model: Any) -> bool:
    """Whether every layer of the model's cache is a plain, growing key/value cache (which batches can join)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - a config the cache does not understand: serve one at a time
        return False
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _forward_names(model: Any) -> tuple[str, bool]:
    """The forward() keyword for the cache (`cache` in transformers >= 5.24, `past_key_values` before) and whether
    forward() takes `logits_to_keep`."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(inner.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values"), "logits_to_keep" in parameters


class _Sampler:
    """One row's next-token choice: greedy, or temperature and top_p as generate() applies them, drawn from the
    row's own generator (its seed, or a fresh one)."""

    def __init__(self, sample: bool, temperature: float, top_p: float, seed: int | None):
        import random

        import torch
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.sample = sample
        self.warpers = []
        if sample:
            if temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p))
            self.generator = torch.Generator().manual_seed(
                (seed if seed is not None else random.getrandbits(63)) % 2**63
            )

    def choose(self, ids: Any, logits: Any) -> int:
        import torch

        if not self.sample:
            return int(logits.argmax())
        scores = logits.float()[None]
        for warper in self.warpers:
            scores = warper(ids, scores)
        probs = torch.softmax(scores, dim=-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))


class _Batch:
    """The rows being generated together: one cache, one attention mask, one forward pass per step."""

    def __init__(self, backend: TransformersBackend):
        self.backend = backend
        self.model = backend.model
        self.cache_name, self.keep_logits = _forward_names(self.model)
        self.rows: list[Any] = []  # worker.Row, one per batch row
        self.samplers: list[_Sampler] = []
        self.ids: list[list[int]] = []  # each row's tokens so far (the prompt, then the answer), for the warpers
        self.last: list[int] = []  # each row's newest token, fed at the next step
        self.positions: list[int] = []  # each row's next position id
        self.cache: Any = None
        self.mask: Any = None  # [rows, cached length]: 1 where a row has a token, 0 where it is padded

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[Any]) -> None:
        import torch
        from transformers import DynamicCache

        device = self.backend.device
        width = max(len(row.prompt) for row in rows)
        pad = self.backend.pad_id
        input_ids = torch.tensor([[pad] * (width - len(r.prompt)) + r.prompt for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, mask, positions, cache)
        self._join(cache, mask)
        for row in rows:
            chosen = decoding(row.sampling, self.backend.defaults)
            self.rows.append(row)
            self.samplers.append(_Sampler(chosen.sample, chosen.temperature, chosen.top_p, row.sampling.seed))
            self.ids.append(list(row.prompt))
            self.positions.append(len(row.prompt))
            self.last.append(0)
        self._choose(logits, len(self.rows) - len(rows))

    def step(self) -> None:
        import torch

        if not self.rows:
            return
        device = self.backend.device
        input_ids = torch.tensor([[token] for token in self.last], device=device)
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=device)], 1)
        positions = torch.tensor([[p] for p in self.positions], device=device)
        logits = self._forward(input_ids, self.mask, positions, self.cache)
        for i in range(len(self.rows)):
            self.positions[i] += 1
        self._choose(logits, 0)

    def _forward(self, input_ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        import torch

        kwargs = {self.cache_name: cache, "use_cache": True}
        if self.keep_logits:
            kwargs["logits_to_keep"] = 1
        with torch.no_grad():
            output = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **kwargs)
        return output.logits[:, -1, :]

    def _join(self, cache: Any, mask: Any) -> None:
        """Append the new rows' cache and mask to the batch's, left-padding the shorter of the two."""
        import torch
        import torch.nn.functional as F

        if self.cache is None or not self.rows:
            self.cache, self.mask = cache, mask
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        for held, added in zip(self.cache.layers, cache.layers, strict=True):
            for name in ("keys", "values"):
                a, b = getattr(held, name), getattr(added, name)
                a = F.pad(a, (0, 0, width - old, 0))
                b = F.pad(b, (0, 0, width - new, 0))
                setattr(held, name, torch.cat([a, b], 0))
        self.mask = torch.cat([F.pad(self.mask, (width - old, 0)), F.pad(mask, (width - new, 0))], 0)

    def _choose(self, logits: Any, first: int) -> None:
        """The next token of rows `first`.. (logits[0] is row `first`'s), handed to each Row; rows that are over (or
        whose client left) leave."""
        import torch

        for i in range(first, len(self.rows)):
            row = self.rows[i]
            if row.job.cancelled.is_set():
                row.finish()
                continue
            sampler = self.samplers[i]
            token = sampler.choose(torch.tensor([self.ids[i]]) if sampler.sample else None, logits[i - first])
            self.ids[i].append(token)
            self.last[i] = token
            if not row.take(token):
                row.finish()
        keep = [i for i, row in enumerate(self.rows) if not row.done]
        if len(keep) == len(self.rows):
            return
        for name in ("rows", "samplers", "ids", "last", "positions"):
            setattr(self, name, [getattr(self, name)[i] for i in keep])
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[index]
        # Columns no remaining row uses (the padding of rows that left) are dropped.
        start = int((self.mask.sum(0) > 0).nonzero()[0])
        self.mask = self.mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
