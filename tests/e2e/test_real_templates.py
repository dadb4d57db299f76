"""Every catalog family on its real tokenizer and its own real chat template, and lora-tune's built-ins on the same
tokenizers: masks, stopping, the same prompt at training and inference, and the pre-flight check.

The material comes from scripts/real_material.py (the llama-cpp-python 0.3.36 sdist, hash-checked, cached in
.cache/real-material/); without it these tests skip with the command to run. Which stand-in vocabulary each family
uses where the sdist lacks its exact one is written in that script's FAMILIES.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

from lora_tune.check import run_checks
from lora_tune.cli import main
from lora_tune.data.formats import to_conversation
from lora_tune.data.masking import IGNORE_INDEX, TemplateError, record_thinking, tokenize_conversation, tokenize_rows
from lora_tune.model.chat_template import apply_chat_template_choice, generation_prompt
from lora_tune.model.load import load_tokenizer
from lora_tune.recipe.load import load_recipe
from lora_tune.recipe.templates import BUILTIN_TEMPLATES
from tests.conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "real-material" / "tokenizers"
FETCH = "python scripts/real_material.py"


@dataclass(frozen=True)
class Family:
    name: str  # the tokenizer folder in the cache
    end_of_turn: str  # what ends an assistant turn, trained in every one
    generation_stops: tuple[int, ...]  # eos_token_id of the model's generation_config.json
    builtin: str  # the built-in template that writes the same turns
    system: bool = True  # the own template masks multi-turn conversations with a system turn
    multi_turn: bool = True  # the own template masks multi-turn conversations at all
    tools: bool = False  # the own template renders tool calls (and masks them)


FAMILIES = {
    f.name: f
    for f in (
        Family("llama-3.1", "<|eot_id|>", (128001, 128008, 128009), "llama-3", tools=True),
        Family("qwen2.5", "<|im_end|>", (151645, 151643), "qwen", tools=True),
        Family("qwen3", "<|im_end|>", (151645, 151643), "chatml", tools=True),
        Family("gemma", "<end_of_turn>", (1, 106), "gemma", system=False),
        Family("phi-3", "<|end|>", (32007, 32001, 32000), "chatml"),
        Family("mistral", "</s>", (2,), "mistral", system=False),
    )
}
SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, which is 3 doubled."},
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
]


@cache
def _load(name: str):  # noqa: ANN202 - a transformers tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(CACHE / name)


@pytest.fixture
def real() -> Iterator:
    """Loads a family's tokenizer (cached for the session); its template and special tokens are put back after."""
    touched = []

    def get(name: str):  # noqa: ANN202
        if not (CACHE / name / "tokenizer.json").is_file():
            pytest.skip(f"real tokenizer {name} not in {CACHE}; run: {FETCH}")
        tokenizer = _load(name)
        touched.append((tokenizer, tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token))
        return tokenizer

    yield get
    for tokenizer, template, eos, pad in touched:
        tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token = template, eos, pad


def trained_runs(example) -> list[list[int]]:
    """Runs of consecutive trained tokens: one per assistant turn."""
    runs: list[list[int]] = []
    for i, label in enumerate(example.labels):
        if label == IGNORE_INDEX:
            continue
        if i == 0 or example.labels[i - 1] == IGNORE_INDEX:
            runs.append([])
        runs[-1].append(label)
    return runs


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def conversations(family: Family) -> list[list[dict]]:
    """The conversations the family's own template masks."""
    turns = TURNS if family.multi_turn else TURNS[:2]
    shapes = [turns] + ([[SYSTEM, *turns]] if family.system or not family.multi_turn else [])
    return shapes


def rows_runs(rows) -> list[list[int]]:
    """The trained runs of a conversation's rows, in order: one per assistant turn however many rows it is."""
    return [run for row in rows for run in trained_runs(row)]


def assert_masked(tokenizer, messages: list[dict], end_of_turn: str, answers: list[str], tools=None) -> None:
    """Exactly each answer plus the end-of-turn marker is trained; nothing of the prompt; BOS at most once."""
    rows = tokenize_rows(messages, tokenizer, tools=tools)
    runs = rows_runs(rows)
    assert [decode(tokenizer, run).strip() for run in runs] == [a + end_of_turn for a in answers]
    stop = tokenizer.convert_tokens_to_ids(end_of_turn)
    assert all(run[-1] == stop for run in runs)  # stopping: the end-of-turn token is trained in every turn
    last = rows[-1]  # the row holding the whole conversation (the only one, or the last turn's)
    untrained = decode(tokenizer, [t for t, lab in zip(last.input_ids, last.labels, strict=True) if lab < 0])
    for message in messages:
        if message["role"] in ("system", "user") and not (message["role"] == "system" and "Paris" in untrained):
            assert message["content"] in untrained
    for example in rows:
        assert example.input_ids.count(tokenizer.bos_token_id) <= 1 or tokenizer.bos_token == tokenizer.eos_token
        if tokenizer.bos_token_id is not None and tokenizer.bos_token_id in example.input_ids:
            assert example.input_ids[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("name", list(FAMILIES))
def test_own_template_trains_exactly_the_answers_and_the_end_of_turn(real, name: str) -> None:
    family = FAMILIES[name]
    tokenizer = real(name)
    for messages in conversations(family):
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        # Qwen3 without reasoning: thinking off, the prompt closes the empty think block, the answer follows it.
        assert_masked(tokenizer, messages, family.end_of_turn, answers)


def test_end_of_sequence_counts(real) -> None:
    """(EOS in the example, EOS trained): where EOS is the end-of-turn token (the Llama 3.1 and Qwen instruct
    tokenizers, Mistral's </s>) once per turn, trained in the replies only; once at the very end for Phi-3.5
    (closing the conversation, untrained: its replies end with <|end|>); never for Gemma (<end_of_turn> ends turns).
    Qwen3 trains the two turns as two rows (its last turn is written unlike earlier ones): 2 + 4 EOS, one trained
    in each."""
    counts = {}
    for name in FAMILIES:
        tokenizer = real(name)
        rows = tokenize_rows(conversations(FAMILIES[name])[0], tokenizer)
        eos = tokenizer.eos_token_id
        pairs = [(t, lab) for example in rows for t, lab in zip(example.input_ids, example.labels, strict=True)]
        counts[name] = (sum(t == eos for t, _ in pairs), sum(t == eos and lab >= 0 for t, lab in pairs))
    assert counts == {
        "llama-3.1": (5, 2),  # the system (date header), 2 user and 2 assistant turns each end with <|eot_id|>
        "qwen2.5": (5, 2),  # the default system prompt's turn too
        "qwen3": (6, 2),
        "gemma": (0, 0),
        "phi-3": (1, 0),
        "mistral": (2, 2),
    }


@pytest.mark.parametrize(
    "name, messages, refusal",
    [
        ("gemma", [SYSTEM, *TURNS], "System role not supported"),
        ("mistral", [SYSTEM, *TURNS], "not prefix-consistent"),
    ],
)
def test_own_template_that_cannot_be_masked_is_refused_naming_the_builtin(real, name, messages, refusal) -> None:
    tokenizer = real(name)
    builtin = FAMILIES[name].builtin
    with pytest.raises(TemplateError) as caught:
        tokenize_conversation(messages, tokenizer, tools=[WEATHER] if messages is TOOL_TURNS else None)
    line = str(caught.value)
    assert refusal in line and f"(model.chat_template: {builtin})" in line and "\n" not in line
    apply_chat_template_choice(tokenizer, builtin, name)  # the named built-in masks the same conversation
    stop = BUILTIN_TEMPLATES[builtin].stop or tokenizer.eos_token
    tools = [WEATHER] if messages is TOOL_TURNS else None
    example = tokenize_conversation(messages, tokenizer, tools=tools)
    assert all(run[-1] == tokenizer.convert_tokens_to_ids(stop) for run in trained_runs(example))


# Mistral's template wants 9-character call ids, and the tool turn to name the call it answers.
MISTRAL_TOOL_TURNS = [
    TOOL_TURNS[0],
    {**TOOL_TURNS[1], "tool_calls": [{"id": "call00001", **TOOL_TURNS[1]["tool_calls"][0]}]},
    {**TOOL_TURNS[2], "tool_call_id": "call00001"},
    TOOL_TURNS[3],
]


@pytest.mark.parametrize("name", ["llama-3.1", "qwen2.5", "qwen3", "mistral"])
def test_own_template_masks_tool_calls(real, name: str) -> None:
    tokenizer = real(name)
    turns = MISTRAL_TOOL_TURNS if name == "mistral" else TOOL_TURNS
    rows = tokenize_rows(turns, tokenizer, tools=[WEATHER])  # Qwen3: a row per turn
    runs = [decode(tokenizer, run) for run in rows_runs(rows)]
    assert len(runs) == 2 and "get_weather" in runs[0] and "Paris" in runs[0]
    assert runs[0].endswith(FAMILIES[name].end_of_turn)  # the call is a whole reply: it stops too
    assert runs[1].strip() == "It is 21 degrees in Paris." + FAMILIES[name].end_of_turn
    example = rows[-1]
    untrained = decode(tokenizer, [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab < 0])
    assert '"temperature' in untrained and "Weather in Paris?" in untrained and "get_weather" in untrained


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("builtin", list(BUILTIN_TEMPLATES))
def test_builtin_templates_on_real_tokenizers(real, name: str, builtin: str) -> None:
    tokenizer = real(name)
    apply_chat_template_choice(tokenizer, builtin, name)
    stop = BUILTIN_TEMPLATES[builtin].stop
    end = stop if stop is not None else tokenizer.eos_token
    messages = [SYSTEM, *TURNS]
    example = tokenize_conversation(messages, tokenizer)
    texts = [decode(tokenizer, run).strip() for run in trained_runs(example)]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    expected = [f"{a} {end}" if builtin == "llama-2" else a + end for a in answers]
    vocab = tokenizer.get_vocab()
    if all(marker in vocab for marker in BUILTIN_TEMPLATES[builtin].markers):
        assert texts == expected
    else:  # markers split into pieces may merge with the next turn's first characters: those are trained too
        assert all(text.startswith(e) for text, e in zip(texts, expected, strict=True)), texts
    if stop is not None and stop in vocab:  # the marker is one token: made EOS, trained each turn
        assert tokenizer.eos_token == stop
        assert all(run[-1] == tokenizer.eos_token_id for run in trained_runs(example))
    untrained = decode(tokenizer, [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab < 0])
    assert all(m["content"] in untrained for m in messages if m["role"] != "assistant")
    bos_per = 2 if builtin == "llama-2" else 1  # Llama 2's format opens every [INST] turn with BOS
    assert example.input_ids.count(tokenizer.bos_token_id) <= bos_per or tokenizer.bos_token == tokenizer.eos_token


def prompts_match(
    tokenizer, messages: list[dict], tools=None, history=None, thinking="auto", **kwargs
) -> list[tuple[list[int], list[int]]]:
    """For each reply: (the tokens training puts before its first trained token, the inference prompt's tokens, as
    the template itself renders `history` (the messages as a client sends them back; default `messages`))."""
    rows = tokenize_rows(messages, tokenizer, tools=tools, thinking=thinking)
    befores = [
        example.input_ids[:i]
        for example in rows
        for i, lab in enumerate(example.labels)
        if lab >= 0 and (i == 0 or example.labels[i - 1] < 0)
    ]
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    pairs = []
    for before, reply in zip(befores, replies, strict=True):
        prompt = tokenizer.apply_chat_template(
            (history or messages)[:reply],
            tools=tools,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **kwargs,
        )
        pairs.append((before, list(prompt["input_ids"])))
    return pairs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_same_prompt_at_training_and_inference(real, name: str) -> None:
    tokenizer = real(name)
    for messages in conversations(FAMILIES[name]):  # no reasoning: data.thinking auto renders Qwen3's thinking off
        for trained, inference in prompts_match(tokenizer, messages, enable_thinking=False):
            assert trained == inference
    if name == "llama-3.1":  # the date header the template writes is in both
        assert "Today Date: 26 Jul 2024" in decode(tokenizer, prompts_match(tokenizer, TURNS)[0][1])
    if name == "qwen2.5":  # and the default system prompt Qwen2.5 writes when the conversation has none
        assert "You are Qwen, created by Alibaba Cloud." in decode(tokenizer, prompts_match(tokenizer, TURNS)[0][1])


@pytest.mark.parametrize("name", ["llama-3.1", "qwen2.5", "qwen3", "mistral"])
def test_same_prompt_with_tools(real, name: str) -> None:
    tokenizer = real(name)
    turns = MISTRAL_TOOL_TURNS if name == "mistral" else TOOL_TURNS
    for trained, inference in prompts_match(tokenizer, turns, tools=[WEATHER], enable_thinking=False):
        assert trained == inference


def test_qwen3_thinking_tags_at_training_and_inference(real) -> None:
    """Qwen3's own template, one turn without reasoning (data.thinking auto: off): the prompt is the template's with
    enable_thinking=false, its closed empty think block included and untrained; the answer and <|im_end|> are
    trained. data.thinking: on trains the empty block as the reply's start instead, after the thinking prompt. The
    chatml built-in (no thinking tags) gives its training prompt both ways."""
    tokenizer = real("qwen3")
    conversation = TURNS[:2]
    [(trained, not_thinking)] = prompts_match(tokenizer, conversation, enable_thinking=False)
    assert trained == not_thinking and decode(tokenizer, trained).endswith("<think>\n\n</think>\n\n")
    assert rows_runs(tokenize_rows(conversation, tokenizer)) == [
        tokenizer(TURNS[1]["content"] + "<|im_end|>")["input_ids"]
    ]
    [(trained, thinking)] = prompts_match(tokenizer, conversation, thinking="on", enable_thinking=True)
    assert trained == thinking
    [run] = rows_runs(tokenize_rows(conversation, tokenizer, thinking="on"))
    assert decode(tokenizer, run) == "<think>\n\n</think>\n\n" + TURNS[1]["content"] + "<|im_end|>"
    apply_chat_template_choice(tokenizer, "chatml", "qwen3")
    for enable in (True, False):
        for trained, inference in prompts_match(tokenizer, TURNS, enable_thinking=enable):
            assert trained == inference and "<think>" not in decode(tokenizer, inference)


# lora-tune check: a model folder is the family's tokenizer plus the generation config the real model ships.


def model_folder(root: Path, name: str, *, template: str | None = None, pad: str | None = None) -> Path:
    from transformers import GenerationConfig

    folder = root / name
    folder.mkdir(parents=True)
    for path in (CACHE / name).iterdir():
        (folder / path.name).symlink_to(path)
    if template is not None or pad is not None:
        tokenizer = _load(name)
        kept = tokenizer.chat_template, tokenizer.pad_token
        (folder / "tokenizer_config.json").unlink()
        (folder / "chat_template.jinja").unlink()
        tokenizer.chat_template = template if template is not None else kept[0]
        tokenizer.pad_token = pad if pad is not None else kept[1]
        tokenizer.save_pretrained(folder / "tmp")
        for file in ("tokenizer_config.json", "chat_template.jinja"):
            (folder / "tmp" / file).rename(folder / file)
        tokenizer.chat_template, tokenizer.pad_token = kept
    GenerationConfig(eos_token_id=list(FAMILIES[name].generation_stops)).save_pretrained(folder)
    return folder


def check_recipe(root: Path, model_dir: Path, rows: list[dict], **sections) -> Path:
    data = write_jsonl(root / "train.jsonl", rows)
    recipe = {"model": {"name": str(model_dir)}, "datasets": [{"path": str(data)}], "output_dir": str(root / "run")}
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def check(path: Path):  # noqa: ANN201 - a PreflightReport
    recipe = load_recipe(path)
    return run_checks(recipe, load_tokenizer(recipe.model))


def good_rows(name: str) -> list[dict]:
    family = FAMILIES[name]
    rows = [{"messages": TURNS}] * 3
    if family.system:
        rows += [{"messages": [SYSTEM, *TURNS]}] * 3
    if family.tools:
        rows += [{"messages": TOOL_TURNS, "tools": [WEATHER]}] * 2
    return rows


@pytest.mark.parametrize("name", list(FAMILIES))
def test_check_passes_on_each_family(tmp_path, real, name: str) -> None:
    real(name)  # skips without the material
    model = model_folder(tmp_path, name)
    report = check(check_recipe(tmp_path, model, good_rows(name)))
    assert report.passed, report.format()
    expected = FAMILIES[name].end_of_turn
    assert report.stop_tokens == [expected], report.format()
    warned = [c.name for c in report.warnings]
    assert warned == (["pad-token"] if name == "phi-3" else []), report.format()  # Phi-3.5: pad = EOS, as shipped


def test_check_refuses_the_own_template_it_cannot_mask_naming_the_builtin(tmp_path, real) -> None:
    real("mistral")  # skips without the material
    rows = [{"messages": [SYSTEM, *TURNS]}] * 2  # Mistral's template writes the system prompt into the last user turn
    report = check(check_recipe(tmp_path, model_folder(tmp_path, "mistral"), rows))
    [failed] = report.failures
    assert failed.name == "template" and "(model.chat_template: mistral)" in failed.line()


def test_check_fails_on_a_template_without_a_generation_prompt(tmp_path, real) -> None:
    tokenizer = real("llama-3.1")
    own = tokenizer.chat_template
    marker = "{%- if add_generation_prompt %}"
    assert marker in own
    planted = own[: own.index(marker)]  # the template less its generation prompt
    report = check(
        check_recipe(tmp_path, model_folder(tmp_path, "llama-3.1", template=planted), good_rows("llama-3.1"))
    )
    assert [c.name for c in report.failures] == ["assistant-mask"]
    line = report.failure_lines()[0]
    assert "the template writes nothing for add_generation_prompt" in line and "'<|start_header_id|>'" in line
    assert "(the built-in 'llama-3' does)" in line and "\n" not in line


def test_check_passes_on_replies_that_start_with_a_special_token_in_a_format_without_headers(tmp_path, real) -> None:
    real("mistral")  # [INST] formats ignore add_generation_prompt; a tool call reply starts with [TOOL_CALLS]
    rows = [{"messages": MISTRAL_TOOL_TURNS[:2], "tools": [WEATHER]}] * 3
    report = check(check_recipe(tmp_path, model_folder(tmp_path, "mistral"), rows))
    assert report.passed, report.format()


def test_check_warns_when_the_pad_token_is_the_end_of_turn_token(tmp_path, real) -> None:
    """Labels come from the masks (TRL pads labels with -100 and never masks by pad id), so the end-of-turn token
    stays trained: a warning naming the risk for other tools, not a failure."""
    real("qwen2.5")
    model = model_folder(tmp_path, "qwen2.5", pad="<|im_end|>")
    report = check(check_recipe(tmp_path, model, good_rows("qwen2.5")))
    assert report.passed and [c.name for c in report.warnings] == ["pad-token"]
    line = next(c for c in report.checks if c.name == "pad-token").line()
    assert "the pad token '<|im_end|>' is also EOS" in line  # EOS is the end-of-turn token here
    assert "trained at the end of" in line


def test_check_on_answers_cut_by_max_length(tmp_path, real, capsys) -> None:
    tokenizer = real("mistral")
    model = model_folder(tmp_path, "mistral")
    rows = [{"messages": TURNS}] * 4
    labels = tokenize_conversation(TURNS, tokenizer).labels
    cut = [i for i, lab in enumerate(labels) if lab >= 0][-1] - 2  # inside the second answer
    report = check(check_recipe(tmp_path, model, rows, training={"max_length": cut}))
    assert [c.name for c in report.warnings] == ["truncation"]  # a warning by default
    path = check_recipe(tmp_path, model, rows, training={"max_length": cut}, preflight={"truncated_answers": "error"})
    assert main(["check", str(path)]) == 2
    out = capsys.readouterr()
    line = next(x for x in out.out.splitlines() if x.startswith("FAIL  truncation"))
    assert f"cut by training.max_length={cut} inside an assistant answer" in line
    assert "raise training.max_length" in line


def test_family_table_is_recorded() -> None:
    """docs/data.md carries the family table these tests back."""
    text = (ROOT / "docs" / "data.md").read_text(encoding="utf-8")
    for name in ("Llama 3.1", "Qwen2.5", "Qwen3", "Gemma 2", "Phi-3", "Mistral", "SmolLM2"):
        assert f"| {name}" in text


# One tiny QLoRA run per family: a random 1-layer Llama sized to the real vocabulary, trained with the real template.

TRAIN_RECIPE = """\
model:
  name: {model}
  dtype: float32
quantization:
  bits: 4
adapter:
  r: 4
  alpha: 8
  dropout: 0.0
datasets:
  - path: {data}
training:
  learning_rate: 1.0e-3
  max_steps: 2
  batch_size: 2
  max_length: 128
  warmup_steps: 0
  logging_steps: 1
  eval_strategy: "no"
  save_strategy: "no"
  gradient_checkpointing: false
output_dir: {out}
"""


@pytest.mark.slow  # about 10 s a family (tokenizer loads dominate: 128k-262k tokens, several per run)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_qlora_run_merges_with_the_template_and_stop_token(tmp_path, real, name: str) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    from lora_tune.quickstart.tiny import build_tiny_llama

    family = FAMILIES[name]
    tokenizer = real(name)
    model = model_folder(tmp_path, name)
    build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2).save_pretrained(model)
    GenerationConfig(eos_token_id=list(family.generation_stops)).save_pretrained(model)  # the real model's stops
    data = write_jsonl(tmp_path / "train.jsonl", good_rows(name) * 2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TRAIN_RECIPE.format(model=model, data=data, out=tmp_path / "run"))
    template = [] if family.multi_turn else ["model.chat_template=chatml"]
    assert main(["train", str(recipe), *template]) == 0
    assert main(["merge", str(tmp_path / "run"), "--output", str(tmp_path / "merged")]) == 0

    merged = AutoTokenizer.from_pretrained(tmp_path / "merged")
    trained = AutoTokenizer.from_pretrained(tmp_path / "run" / "adapter") if not family.multi_turn else tokenizer
    assert merged.chat_template == trained.chat_template
    stops = GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id
    assert merged.convert_tokens_to_ids(family.end_of_turn) in (stops if isinstance(stops, list) else [stops])
    prompt = TURNS[:1]
    assert merged.apply_chat_template(prompt, add_generation_prompt=True) == trained.apply_chat_template(
        prompt, add_generation_prompt=True
    )


# Reasoning models on their real templates (docs/data.md, "Reasoning data and thinking templates"): the reply's
# reasoning, answer and end-of-turn token are trained after the very prompt inference renders for it.


@dataclass(frozen=True)
class Reasoner:
    name: str  # the tokenizer folder in the cache
    end_of_turn: str
    generation_stops: tuple[int, ...]
    opens: bool  # the thinking generation prompt opens the think block (the reply starts inside it)
    drops_history: bool  # earlier replies' reasoning is left out of the prompt of later turns


REASONERS = {
    r.name: r
    for r in (
        Reasoner("qwq", "<|im_end|>", (151645, 151643), opens=True, drops_history=True),
        Reasoner("r1-distill-qwen", "<｜end▁of▁sentence｜>", (151643,), opens=True, drops_history=True),
        Reasoner("r1-distill-llama", "<｜end▁of▁sentence｜>", (128001,), opens=True, drops_history=True),
        Reasoner("qwen3", "<|im_end|>", (151645, 151643), opens=False, drops_history=True),
        Reasoner("qwen3.5", "<|im_end|>", (151645, 151643), opens=True, drops_history=True),
        Reasoner("smollm3", "<|im_end|>", (128012,), opens=False, drops_history=False),
    )
}
THOUGHTS = ["2+2: two and two make four.", "3+3 is 3 doubled: six."]
REASONED = [
    TURNS[0],
    {**TURNS[1], "reasoning_content": THOUGHTS[0]},
    TURNS[2],
    {**TURNS[3], "reasoning_content": THOUGHTS[1]},
]


def inline(messages: list[dict]) -> list[dict]:
    """The same conversation with each reply's reasoning as a <think> block opening its content."""
    out = []
    for m in messages:
        m = dict(m)
        if "reasoning_content" in m:
            m["content"] = f"<think>\n{m.pop('reasoning_content')}\n</think>\n\n{m['content']}"
        out.append(m)
    return out


def expected_reply(reasoner: Reasoner, thought: str, answer: str) -> str:
    """What the model writes after the thinking prompt: the block (less what the prompt opened), the answer, the
    end of turn."""
    block = f"<think>\n{thought}\n</think>\n\n"
    return (block.removeprefix("<think>\n") if reasoner.opens else block) + answer + reasoner.end_of_turn


@pytest.fixture
def reasoner(real, request) -> Iterator:
    yield REASONERS[request.param], real(request.param)


ALL_REASONERS = pytest.mark.parametrize("reasoner", list(REASONERS), indirect=True)


@ALL_REASONERS
def test_reasoning_reply_trains_reasoning_answer_and_end_of_turn(reasoner) -> None:
    family, tokenizer = reasoner
    conversation = REASONED[:2]
    [row] = tokenize_rows(conversation, tokenizer)
    [run] = trained_runs(row)
    assert decode(tokenizer, run) == expected_reply(family, THOUGHTS[0], TURNS[1]["content"])
    assert run[-1] == tokenizer.convert_tokens_to_ids(family.end_of_turn)  # the model learns to stop
    assert row.input_ids.count(tokenizer.convert_tokens_to_ids(family.end_of_turn)) >= 1
    read = to_conversation({"messages": inline(conversation)}, "messages", file="train.jsonl", row_number=1)
    assert tokenize_rows(read, tokenizer) == [row]  # a <think> block opening content, as the data reader reads it


@ALL_REASONERS
def test_same_prompt_at_training_and_inference_with_reasoning(reasoner) -> None:
    """Each trained reply follows exactly the tokens of the template's own thinking prompt for its history (earlier
    replies sent back as the model wrote them), and of generation_prompt with the thinking recorded for the run."""
    family, tokenizer = reasoner
    for trained, inference in prompts_match(tokenizer, REASONED, history=inline(REASONED), enable_thinking=True):
        assert trained == inference
    rows = tokenize_rows(REASONED, tokenizer)
    replies = [i for i, m in enumerate(REASONED) if m["role"] == "assistant"]
    runs = rows_runs(rows)
    assert [decode(tokenizer, run) for run in runs] == [
        expected_reply(family, thought, REASONED[i]["content"]) for thought, i in zip(THOUGHTS, replies, strict=True)
    ]
    record_thinking(tokenizer, True)
    try:
        prompt = generation_prompt(tokenizer, REASONED[:3])  # the run's setting, as eval, chat and serve ask
    finally:
        tokenizer.init_kwargs.pop("lora_tune_enable_thinking", None)
    last = rows[-1]
    start = max(i for i, lab in enumerate(last.labels) if lab >= 0 and last.labels[i - 1] < 0)  # the last reply's
    assert last.input_ids[:start] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert (THOUGHTS[0] in prompt) is not family.drops_history  # earlier reasoning as the template renders it
    assert len(rows) == (2 if family.drops_history else 1)


@ALL_REASONERS
def test_reply_without_reasoning_renders_with_thinking_off(reasoner) -> None:
    """data.thinking auto, a row without reasoning: the prompt is the template's with enable_thinking=false (a
    closed empty block where the template writes one); the answer and the end of turn are trained, no reasoning."""
    family, tokenizer = reasoner
    [(trained, inference)] = prompts_match(tokenizer, TURNS[:2], enable_thinking=False)
    assert trained == inference
    [run] = rows_runs(tokenize_rows(TURNS[:2], tokenizer))
    reply = decode(tokenizer, run)
    assert reply.endswith(TURNS[1]["content"] + family.end_of_turn) and "<think>\n\n" not in reply.removesuffix("")
    assert "</think>" in decode(tokenizer, trained) + reply  # the block is closed, in the prompt or the reply


@ALL_REASONERS
def test_check_passes_on_reasoning_rows(tmp_path, reasoner) -> None:
    family, _ = reasoner
    folder = tmp_path / family.name
    folder.mkdir()
    for path in (CACHE / family.name).iterdir():
        (folder / path.name).symlink_to(path)
    from transformers import GenerationConfig

    GenerationConfig(eos_token_id=list(family.generation_stops)).save_pretrained(folder)
    rows = [{"messages": REASONED}, {"messages": inline(REASONED[:2])}, {"messages": TURNS}] * 2
    report = check(check_recipe(tmp_path, folder, rows))
    assert report.passed, report.format()
    assert report.stop_tokens == [family.end_of_turn], report.format()


@ALL_REASONERS
def test_reasoning_with_thinking_off_is_refused_in_one_line(reasoner) -> None:
    _, tokenizer = reasoner
    with pytest.raises(TemplateError) as caught:
        tokenize_rows(REASONED[:2], tokenizer, thinking="off")
    line = str(caught.value)
    assert "data.thinking is off" in line and "data.thinking: auto" in line and "\n" not in line
