"""The checks judged on each sampled example: masks, the stop token, BOS, truncation and the pad token.

Each takes the `Context` (the recipe, the tokenizer, the facts of every sampled row and the generation stop tokens)
and returns one `CheckResult` naming the first affected row and the count of the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lora_tune.check.examples import ExampleFacts
from lora_tune.check.report import CheckResult, Status
from lora_tune.model.stops import config_stops
from lora_tune.recipe.schema import Recipe
from lora_tune.recipe.templates import builtin_for

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATE_FIX = "set model.chat_template to a template that"
_SEVERITY = {"error": "an error", "warn": "a warning"}


@dataclass(frozen=True)
class Context:
    """What every per-example check reads: the recipe, the tokenizer, the sampled rows' facts, the stop tokens."""

    recipe: Recipe
    tokenizer: PreTrainedTokenizerBase
    facts: list[ExampleFacts]
    special_ids: frozenset[int]
    generation_stops: list[int] | None  # None: no generation config could be read
    generation_source: str

    def name(self, token_id: int | None) -> str:
        return "none" if token_id is None else repr(self.tokenizer.convert_ids_to_tokens(token_id))

    def closers(self) -> frozenset[int]:
        """Tokens that can end an assistant turn: special tokens, and stop tokens even when not marked special."""
        return self.special_ids | set(self.stops())

    def stops(self) -> list[int]:
        """What generation will stop on by the base's own generation config (`model.stops.config_stops`)."""
        return config_stops(self.tokenizer, self.generation_stops)


def _result(
    name: str, bad: list[ExampleFacts], message: str, ok: str, fix: str, status: Status = "fail"
) -> CheckResult:
    if not bad:
        return CheckResult(name, "pass", ok)
    first = bad[0].source
    return CheckResult(name, status, message, fix, count=len(bad), file=first.file, row=first.row)


def _assistant_mask(ctx: Context) -> CheckResult:
    bos = ctx.tokenizer.bos_token_id
    empty = [f for f in ctx.facts if f.full.num_trained == 0]
    # Everything: no untrained token (but BOS) before the last trained one; trailing whitespace is never trained.
    everything = [
        f
        for f in ctx.facts
        if f.turns
        and all(t or i == bos for t, i in zip(f.trained_flags[: f.turns[-1][1]], f.full.input_ids, strict=False))
    ]
    if empty:
        return _result(
            "assistant-mask",
            empty,
            "no token is trained: the assistant replies are not in the rendering after the generation prompt; "
            "expected each assistant turn's tokens to be trained",
            "",
            f"{TEMPLATE_FIX} writes every assistant message after its generation prompt",
        )
    if not everything:
        return _header_trained(ctx)
    return _result(
        "assistant-mask",
        everything,
        "every token is trained, prompt included: the template renders nothing for a conversation that ends "
        "before an assistant turn, so replies cannot be told from the prompt; expected only the assistant turns",
        "the assistant mask is neither empty nor everything in any row",
        f"{TEMPLATE_FIX} renders the conversation up to the generation prompt as a prefix of the whole",
    )


def _header_trained(ctx: Context) -> CheckResult:
    """A template that ignores add_generation_prompt leaves the assistant header (a special token such as
    '<|assistant|>') out of the prompt: masking then trains it as the start of every reply, and inference prompts
    end before it. [INST]-style formats write no header at all, so their replies start with a word and pass."""
    bad = [f for f in ctx.facts if f.turns and _ignores_generation_prompt(ctx, f)]
    header = ""
    if bad:
        start = bad[0].turns[0][0]
        header = ctx.tokenizer.decode(bad[0].full.input_ids[start : start + 1], skip_special_tokens=False)
    return _result(
        "assistant-mask",
        bad,
        f"the template writes nothing for add_generation_prompt, so every reply's trained tokens start with the "
        f"assistant header {header!r} and prompts at inference end before it; expected the header in the prompt, "
        "untrained",
        "the assistant mask is neither empty nor everything in any row, and starts after the assistant header",
        f"{TEMPLATE_FIX} writes the assistant header when add_generation_prompt is true{_builtin_named(ctx)}",
    )


def _ignores_generation_prompt(ctx: Context, facts: ExampleFacts) -> bool:
    """Every reply's first trained token looks like a role header, and the generation prompt renders nothing."""
    ids = facts.full.input_ids
    untrained = {token for token, trained in zip(ids, facts.trained_flags, strict=True) if not trained}

    def header(token: int) -> bool:  # a special token that also opens prompt turns, or names the assistant role
        name = str(ctx.tokenizer.convert_ids_to_tokens(token)).lower()
        return token in ctx.special_ids and (token in untrained or "assistant" in name or "model" in name)

    # Not "[TOOL_CALLS]" of an [INST] format, which writes no header and rightly ignores add_generation_prompt.
    if not all(header(ids[start]) for start, _ in facts.turns):
        return False
    messages = list(facts.source.messages)
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")

    def render(prompt: bool) -> str:
        return ctx.tokenizer.apply_chat_template(
            messages[:first], tools=facts.source.tools, tokenize=False, add_generation_prompt=prompt
        )

    return render(True) == render(False)


def _builtin_named(ctx: Context) -> str:
    builtin = builtin_for(getattr(ctx.tokenizer, "chat_template", None))
    return "" if builtin is None else f" (the built-in '{builtin.name}' does)"


def _prompt_not_trained(ctx: Context) -> CheckResult:
    bad = [f for f in ctx.facts if f.prompt_text_trained is not None]
    text = bad[0].prompt_text_trained if bad else ""
    return _result(
        "prompt-not-trained",
        bad,
        f"system or user text {_clip(text)!r} is trained; expected only assistant turns to be trained",
        "no system or user token is trained",
        f"{TEMPLATE_FIX} renders each user turn before the generation prompt of the reply that follows it",
    )


def _end_of_turn(ctx: Context) -> CheckResult:
    closers = ctx.closers()
    bad: list[ExampleFacts] = []
    found = ""
    for f in ctx.facts:
        wrong = next(((start, end) for start, end in f.turns if f.full.input_ids[end - 1] not in closers), None)
        if wrong is not None:
            bad.append(f)
            if not found:
                tail = ctx.tokenizer.decode(f.full.input_ids[wrong[0] : wrong[1]], skip_special_tokens=False)
                found = f"an assistant turn's trained tokens end with {_clip(tail, 24, tail=True)!r}"
    expected = " or ".join(ctx.name(i) for i in ctx.stops()) or "an end-of-turn token"
    return _result(
        "end-of-turn",
        bad,
        f"{found}: no end-of-turn token is trained, so the model never learns to stop; expected {expected} "
        "as the last trained token of every assistant turn",
        "every assistant turn's trained tokens end with an end-of-turn token",
        f"{TEMPLATE_FIX} writes the end-of-turn token right after each assistant message "
        "(e.g. {{ message['content'] + eos_token }})",
    )


def _generation_stops(ctx: Context) -> CheckResult:
    stops = ctx.stops()
    source = ctx.generation_source
    if ctx.generation_stops == []:
        return CheckResult(
            "generation-stops",
            "fail",
            f"{source} sets no eos_token_id, so generation never stops on a token; expected the end-of-turn token",
            "add eos_token_id to the model's generation_config.json, or point model.name at a model that has one",
        )
    bad: list[ExampleFacts] = []
    wrong: int | None = None
    for f in ctx.facts:
        closing = [f.full.input_ids[end - 1] for _, end in f.turns]
        miss = next((t for t in closing if t in ctx.special_ids and t not in stops), None)
        if miss is not None:
            bad.append(f)
            wrong = miss if wrong is None else wrong
    listed = ", ".join(f"{ctx.name(i)} ({i})" for i in stops) or "nothing"
    return _result(
        "generation-stops",
        bad,
        f"the template ends assistant turns with {ctx.name(wrong)} ({wrong}) but generation stops on {listed} "
        f"({source}), so the fine-tuned model would not stop; expected the end-of-turn token among them",
        f"the end-of-turn token is a generation stop token ({source})",
        f"{TEMPLATE_FIX} ends assistant turns with {ctx.name(stops[0]) if stops else 'EOS'}, or add {wrong} to "
        f"eos_token_id in {ctx.recipe.model.name}/generation_config.json",
    )


def _bos_once(ctx: Context) -> CheckResult:
    bos = ctx.tokenizer.bos_token_id
    stops = set(ctx.stops())
    bad = []
    for f in ctx.facts:
        closing = {end - 1 for _, end in f.turns} if bos in stops else set()  # BOS that is also a stop: not these
        if sum(t == bos and i not in closing for i, t in enumerate(f.full.input_ids)) > 1:
            bad.append(f)
    return _result(
        "bos",
        bad,
        f"BOS {ctx.name(bos)} appears more than once; expected it at most once, at the start",
        f"BOS {ctx.name(bos)} appears at most once per example" if bos is not None else "the tokenizer has no BOS",
        f"{TEMPLATE_FIX} writes bos_token once, at the start (or not at all when the tokenizer adds it)",
    )


def _truncation(ctx: Context) -> CheckResult:
    max_length = ctx.recipe.training.max_length
    if max_length is None:
        return CheckResult("truncation", "pass", "no max_length: no example is truncated")
    cut = [f for f in ctx.facts if any(start < max_length < end for start, end in f.turns)]
    dropped = [f for f in ctx.facts if f.turns and f.turns[0][0] >= max_length]
    longest = max((len(f.full.input_ids) for f in ctx.facts), default=0)
    raise_it = f"raise training.max_length to {longest} (the longest sampled row), or shorten those rows"
    if cut:
        severity = ctx.recipe.preflight.truncated_answers
        other = "error" if severity == "warn" else "warn"
        dropped_note = f"; {len(dropped)} more lose every assistant token and are dropped" if dropped else ""
        return _result(
            "truncation",
            cut,
            f"{len(cut)} of {len(ctx.facts)} rows are cut by training.max_length={max_length} inside an assistant "
            f"answer, which then trains a reply without its stop token{dropped_note}; expected whole answers",
            "",
            f"{raise_it} (or preflight.truncated_answers: {other} to make this {_SEVERITY[other]})",
            status="fail" if severity == "error" else "warn",
        )
    return _result(
        "truncation",
        dropped,
        f"{len(dropped)} of {len(ctx.facts)} rows lose every assistant token to training.max_length={max_length} "
        "and will be dropped; expected each row to keep its answers",
        f"no assistant answer is cut by training.max_length={max_length}",
        raise_it,
        status="warn",
    )


def _pad_token(ctx: Context) -> CheckResult:
    """Warn when pad is EOS or the end-of-turn token: other tools' collators mask pad ids out of the labels."""
    pad, eos = ctx.tokenizer.pad_token_id, ctx.tokenizer.eos_token_id
    ends = [f.full.input_ids[end - 1] for f in ctx.facts for _, end in f.turns]
    if pad is None or (pad != eos and pad not in ends):
        return CheckResult(
            "pad-token", "pass", f"the pad token {ctx.name(pad)} is neither EOS nor the end-of-turn token"
        )
    trained = sum(t == pad for t in ends)
    kept = f"verified: trained at the end of {trained} of {len(ends)} assistant turns" if trained else "not trained"
    return CheckResult(
        "pad-token",
        "warn",
        f"the pad token {ctx.name(pad)} is also {'EOS' if pad == eos else 'the end-of-turn token'}; lora-tune takes "
        f"labels from the assistant masks, never from pad ids ({kept}), but a collator that masks pad ids, as other "
        "tools do, would drop it from the labels and the model would not learn to stop",
        "nothing for lora-tune; to train this data elsewhere, use a tokenizer with its own pad token "
        "(model.tokenizer)",
    )


def _clip(text: str | None, limit: int = 40, *, tail: bool = False) -> str:
    text = text or ""
    if len(text) <= limit:
        return text
    return "..." + text[-limit:] if tail else text[:limit] + "..."


PER_EXAMPLE_CHECKS: tuple[Callable[[Context], CheckResult], ...] = (
    _assistant_mask,
    _prompt_not_trained,
    _end_of_turn,
    _generation_stops,
    _bos_once,
    _truncation,
    _pad_token,
)
