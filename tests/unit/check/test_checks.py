"""Pre-flight check: deliberately broken templates, tokenizers and generation configs each fail with the right line.

Model folders here hold a tokenizer and a generation config only: `check` needs no weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lora_tune.check import PreflightReport, run_checks
from lora_tune.cli import main
from lora_tune.model.load import load_tokenizer
from lora_tune.quickstart.tiny import CHAT_TEMPLATE
from lora_tune.recipe.load import load_recipe
from tests.conftest import fruit_rows
from tests.helpers import NO_END_OF_TURN, model_dir
from tests.helpers import write_check_recipe as write_recipe

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Renders nothing until the conversation ends with a reply: the reply cannot be told from the prompt.
EVERYTHING_TRAINED = (
    "{% if messages[-1]['role'] == 'assistant' %}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "<|end|>\n{% endfor %}{% endif %}"
)
# Never renders assistant messages: there is nothing to train.
NOTHING_TRAINED = (
    "{% for m in messages if m['role'] != 'assistant' %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
)
BOS_EVERY_TURN = CHAT_TEMPLATE.replace(
    "{{ '<|' +", "{% if message['role'] == 'user' %}{{ bos_token }}{% endif %}{{ '<|' +"
)
MULTI_TURN = [
    {"role": "system", "content": "Answer with one word."},
    {"role": "user", "content": "fruit number 1?"},
    {"role": "assistant", "content": "banana"},
    {"role": "user", "content": "and number 2?"},
    {"role": "assistant", "content": "cherry"},
]


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tokenizer and CHAT_TEMPLATE with a generation config stopping on its EOS: no weights, no torch."""
    return model_dir(tmp_path_factory.mktemp("tiny-tokenizer"))


def check(recipe_path: Path, *overrides: str) -> PreflightReport:
    recipe = load_recipe(recipe_path, list(overrides))
    return run_checks(recipe, load_tokenizer(recipe.model))


def status(report: PreflightReport) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def only(report: PreflightReport, name: str):
    return next(c for c in report.checks if c.name == name)


def test_tiny_chat_template_passes_every_check(tmp_path, tiny_tokenizer_dir):
    report = check(write_recipe(tmp_path, tiny_tokenizer_dir, fruit_rows(20, "alpaca")))
    assert report.passed and not report.warnings, report.format()
    assert len(report.checks) == 9 and report.rows == 20
    assert report.summary().startswith("pre-flight: 9 checks passed on 20 rows; ")
    assert report.summary().endswith("% of tokens trained; stop token <|end|> trained in every assistant turn")
    assert report.chat_template_sha256 == hashlib.sha256(CHAT_TEMPLATE.encode()).hexdigest()
    assert report.generation_stop_tokens == ["'<|end|>'"] and "generation_config.json" in report.generation_config
    assert 0 < report.trained_share < 0.5
    assert report.example is not None and report.example.row == 1
    assert report.example.text.endswith("<|assistant|>\n[[apple<|end|>]]\n")


def test_chatml_template_with_multi_turn_rows_passes(tmp_path):
    model = model_dir(tmp_path / "chatml", template=CHATML, stops=["<|im_end|>", "<|end|>"])
    report = check(write_recipe(tmp_path, model, [{"messages": MULTI_TURN}] * 3))
    assert report.passed and not report.warnings, report.format()
    assert report.stop_tokens == ["<|im_end|>"]
    assert "[[banana<|im_end|>]]" in report.example.text and "[[cherry<|im_end|>]]" in report.example.text
    assert report.example.text.count("[[") == 2  # system and user text untrained


def test_no_end_of_turn_after_the_answer_fails(tmp_path):
    report = check(write_recipe(tmp_path, model_dir(tmp_path / "m", template=NO_END_OF_TURN)))
    assert status(report)["end-of-turn"] == "fail" and not report.passed
    line = only(report, "end-of-turn").line()
    assert line.startswith(f"end-of-turn: {tmp_path / 'train.jsonl'} row 1 (and 11 more rows): ")
    assert "trained tokens end with 'apple': no end-of-turn token is trained" in line
    assert "expected '<|end|>' as the last trained token" in line
    assert "fix: set model.chat_template to a template that writes the end-of-turn token" in line
    assert report.summary() == "pre-flight: 1 check failed (end-of-turn) on 12 rows"


def test_template_that_cannot_separate_the_reply_trains_everything(tmp_path):
    report = check(write_recipe(tmp_path, model_dir(tmp_path / "m", template=EVERYTHING_TRAINED)))
    assert status(report)["assistant-mask"] == "fail" and status(report)["prompt-not-trained"] == "fail"
    assert "every token is trained, prompt included" in only(report, "assistant-mask").line()
    assert "user text 'fruit number 0?' is trained" in only(report, "prompt-not-trained").line()


def test_template_without_assistant_content_trains_nothing(tmp_path):
    report = check(write_recipe(tmp_path, model_dir(tmp_path / "m", template=NOTHING_TRAINED)))
    line = only(report, "assistant-mask").line()
    assert line.startswith(f"assistant-mask: {tmp_path / 'train.jsonl'} row 1 (and 11 more rows): no token is trained")
    assert report.tokens == 0 and report.trained_share == 0.0


def test_generation_config_stopping_on_another_token_fails(tmp_path):
    model = model_dir(tmp_path / "m", template=CHATML)  # turns end with <|im_end|>; generation stops on <|end|>
    report = check(write_recipe(tmp_path, model))
    assert [c.name for c in report.failures] == ["generation-stops"]
    line = report.failure_lines()[0]
    assert "the template ends assistant turns with '<|im_end|>'" in line and "generation stops on '<|end|>'" in line
    assert "the fine-tuned model would not stop" in line
    assert "fix: set model.chat_template to a template that ends assistant turns with '<|end|>'" in line
    assert f"eos_token_id in {model}/generation_config.json" in line


def test_generation_config_without_eos_fails(tmp_path):
    report = check(write_recipe(tmp_path, model_dir(tmp_path / "m", stops=[])))
    assert "sets no eos_token_id, so generation never stops" in only(report, "generation-stops").line()


def test_config_json_is_read_when_there_is_no_generation_config(tmp_path):
    from transformers import LlamaConfig

    model = model_dir(tmp_path / "m", template=CHATML)
    (model / "generation_config.json").unlink()
    LlamaConfig(vocab_size=330, eos_token_id=[2, 8]).save_pretrained(model)  # 8 is not <|im_end|>
    report = check(write_recipe(tmp_path, model))
    assert report.generation_config == f"{model}: config.json"
    assert status(report)["generation-stops"] == "fail"


def test_without_any_model_config_the_tokenizer_eos_is_the_stop_token(tmp_path):
    model = model_dir(tmp_path / "m")
    (model / "generation_config.json").unlink()
    report = check(write_recipe(tmp_path, model))
    assert report.passed and report.generation_stop_tokens is None
    assert "the tokenizer's EOS" in report.generation_config


def test_pad_token_equal_to_eos_warns(tmp_path):
    report = check(write_recipe(tmp_path, model_dir(tmp_path / "m", pad="<|end|>")))
    assert report.passed and [c.name for c in report.warnings] == ["pad-token"]
    line = only(report, "pad-token").line()
    assert "the pad token '<|end|>' is also EOS; lora-tune takes labels from the assistant masks" in line
    assert "(verified: trained at the end of 12 of 12 assistant turns)" in line
    assert "a collator that masks pad ids, as other tools do, would drop it from the labels" in line
    assert "1 warning (pad-token)" in report.summary()


def test_bos_twice_fails(tmp_path):
    report = check(write_recipe(tmp_path, model_dir(tmp_path / "m", template=BOS_EVERY_TURN)))
    assert [c.name for c in report.failures] == ["bos"]
    assert "BOS '<|bos|>' appears more than once; expected it at most once" in report.failure_lines()[0]


def test_answers_cut_by_max_length_warn_by_default_and_fail_on_request(tmp_path, tiny_tokenizer_dir):
    rows = [{"messages": MULTI_TURN}, *fruit_rows(3, "messages")]
    recipe = write_recipe(tmp_path, tiny_tokenizer_dir, rows)
    full = check(recipe)
    longest = full.longest_example
    report = check(recipe, f"training.max_length={longest - 3}")  # cuts the long row's last answer
    result = only(report, "truncation")
    assert result.status == "warn" and report.passed and result.count == 1
    assert f"1 of 4 rows are cut by training.max_length={longest - 3} inside an assistant answer" in result.line()
    assert f"fix: raise training.max_length to {longest}" in result.line()
    assert report.example.truncated and report.example.row == 1
    strict = check(recipe, f"training.max_length={longest - 3}", "preflight.truncated_answers=error")
    assert [c.name for c in strict.failures] == ["truncation"]
    dropped = check(recipe, "training.max_length=6")  # no assistant token left in any row
    assert only(dropped, "truncation").status == "warn"
    assert "4 of 4 rows lose every assistant token" in only(dropped, "truncation").line()


def test_template_that_reloads_differently_at_inference_fails(tmp_path, tiny_tokenizer_dir):
    crlf = CHAT_TEMPLATE.replace("\\n", "\r\n")  # saved as written, but read back with \n line endings
    report = check(write_recipe(tmp_path, tiny_tokenizer_dir, model={"chat_template": crlf}))
    assert [c.name for c in report.failures] == ["chat-template-saved"]
    line = report.failure_lines()[0]
    assert "the template saved with the adapter reloads differently" in line
    assert (
        "\\r\\n" in line
        and "in training" in line
        and "so inference would render prompts unlike the training examples" in line
    )
    assert "fix: set model.chat_template to a template that uses \\n line endings only" in line
    assert report.chat_template_sha256 == hashlib.sha256(crlf.encode()).hexdigest()


def test_large_datasets_are_sampled_with_the_seed(tmp_path, tiny_tokenizer_dir):
    recipe = write_recipe(tmp_path, tiny_tokenizer_dir, fruit_rows(30, "alpaca"), preflight={"sample_rows": 5})
    first, again = check(recipe), check(recipe)
    assert first.rows == 5 and first.sources == {str(tmp_path / "train.jsonl"): {"rows": 30, "checked": 5}}
    assert first.example.row == again.example.row and first.tokens == again.tokens
    assert check(recipe, "training.seed=7").example.row != first.example.row


def test_check_command_exit_codes_and_json(tmp_path, tiny_tokenizer_dir, capsys):
    good = write_recipe(tmp_path, tiny_tokenizer_dir)
    assert main(["check", str(good), "--json", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "PASS  end-of-turn" in out and "[[apple<|end|>]]" in out
    assert out.rstrip().splitlines()[-1].startswith("pre-flight: 9 checks passed on 12 rows")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["passed"] is True and len(saved["checks"]) == 9 and saved["chat_template_sha256"]

    bad = tmp_path / "bad"
    bad.mkdir()
    assert main(["check", str(write_recipe(bad, model_dir(bad / "m", template=NO_END_OF_TURN)))]) == 2
    out = capsys.readouterr().out
    assert "FAIL  end-of-turn" in out and "pre-flight: 1 check failed (end-of-turn)" in out


def test_check_command_overrides_and_recipe_errors(tmp_path, tiny_tokenizer_dir, capsys):
    recipe = write_recipe(tmp_path, tiny_tokenizer_dir)
    assert main(["check", str(recipe), "training.max_length=6"]) == 0  # warnings only
    assert "WARN  truncation" in capsys.readouterr().out
    assert main(["check", str(recipe), "preflight.on_failur=warn"]) == 2
    assert "did you mean 'on_failure'" in capsys.readouterr().err


ROOT = Path(__file__).resolve().parents[3]


def _recipes_with_local_data() -> list[Path]:
    """Shipped recipes whose every dataset is a local file of the repository (hub datasets need the network)."""
    found = []
    from lora_tune.plan.catalog import recipe_files  # skips recipes/data, base/ parts and accelerate/ configs

    for path in recipe_files(ROOT / "recipes"):
        recipe = load_recipe(path, check_paths=False)
        if all((ROOT / d.path).is_file() for d in recipe.datasets):
            found.append(path)
    return found


@pytest.mark.parametrize("path", _recipes_with_local_data(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipes_with_local_data_pass(path, tiny_model_dir, monkeypatch):
    # The recipe's own base (e.g. runs/quickstart-base) may not be built: check its data with the tiny tokenizer.
    monkeypatch.chdir(ROOT)
    report = check(path, f"model.name={tiny_model_dir}", "model.tokenizer=null")
    assert report.passed, report.format()  # warnings allowed: the tiny tokenizer splits words differently


def test_user_text_that_also_appears_in_the_end_of_turn_marker_is_not_mistaken_for_trained(
    tmp_path, tiny_tokenizer_dir
):
    turns = ["hi", "ok", "end", "bye"]  # "end" is also inside the trained "<|end|>" after "ok"
    roles = ["user", "assistant"] * 2
    rows = [{"messages": [{"role": r, "content": c} for r, c in zip(roles, turns, strict=True)]}]
    report = check(write_recipe(tmp_path, tiny_tokenizer_dir, rows))
    assert report.passed and not report.warnings, report.format()


def test_template_without_a_generation_prompt_fails_the_mask_check(tmp_path):
    # The assistant header '<|assistant|>' would be trained as the start of every reply, and inference prompts
    # (rendered with add_generation_prompt) would end before it.
    no_prompt = CHAT_TEMPLATE.replace("{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}", "")
    assert no_prompt != CHAT_TEMPLATE
    report = check(write_recipe(tmp_path, model_dir(tmp_path / "m", template=no_prompt)))
    assert [c.name for c in report.failures] == ["assistant-mask"]
    line = report.failure_lines()[0]
    assert "the template writes nothing for add_generation_prompt" in line
    assert "start with the assistant header '<|assistant|>'" in line
    assert "fix: set model.chat_template to a template that writes the assistant header" in line
