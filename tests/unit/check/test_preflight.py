"""`train` runs the pre-flight check first: it refuses a failing recipe before loading any weights, trains anyway
when the recipe says so, and the template saved with the adapter is the one the check hashed."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

from lora_tune.cli import main
from lora_tune.quickstart.tiny import CHAT_TEMPLATE
from tests.helpers import NO_END_OF_TURN, model_dir
from tests.helpers import write_check_recipe as write_recipe


def test_train_refuses_a_failing_check_before_loading_the_model(tmp_path, capsys):
    model = model_dir(tmp_path / "m", template=NO_END_OF_TURN)  # no weights: loading the model would fail
    recipe = write_recipe(tmp_path, model)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error: pre-flight check failed on the recipe's data (1 check; full report: ")
    assert err[0].endswith("set preflight.on_failure: warn to train anyway")
    assert err[1].startswith(f"  end-of-turn: {tmp_path / 'train.jsonl'} row 1 (and 11 more rows): ")
    assert "fix: set model.chat_template" in err[1] and len(err) == 2
    report = json.loads((tmp_path / "run" / "preflight.json").read_text())
    assert report["passed"] is False and report["checks"][3]["name"] == "end-of-turn"
    assert (tmp_path / "run" / "recipe.yaml").is_file() and not (tmp_path / "run" / "adapter").exists()


@pytest.mark.slow  # trains one step: imports trl and builds the tiny model (~10 s)
def test_train_warns_when_told_and_saves_the_checked_template(tmp_path, tiny_model_dir, capsys):
    template = CHAT_TEMPLATE.replace("'\\n'", "'\\n\\n'")  # a recipe override, unlike the tokenizer's own
    recipe = write_recipe(
        tmp_path,
        tiny_model_dir,
        model={"chat_template": template, "dtype": "float32"},
        # 19 tokens cut 4 of the 12 rows inside "<fruit><|end|>" (and leave the other 8 no assistant token).
        training={"max_steps": 1, "max_length": 19, "save_strategy": "no", "gradient_checkpointing": False},
        preflight={"on_failure": "warn", "truncated_answers": "error"},
    )
    assert main(["train", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "pre-flight FAILED (training anyway: preflight.on_failure is warn): truncation: " in out
    assert "4 of 12 rows are cut by training.max_length=19 inside an assistant answer" in out
    assert "pre-flight: 1 check failed (truncation) on 12 rows" in out
    run = tmp_path / "run"
    report = json.loads((run / "preflight.json").read_text())
    sha = hashlib.sha256(template.encode()).hexdigest()
    assert report["chat_template_sha256"] == sha and report["passed"] is False
    saved = (run / "adapter" / "chat_template.jinja").read_bytes()
    assert hashlib.sha256(saved).hexdigest() == sha
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(run / "adapter").chat_template == template


def test_preflight_logs_the_one_line_summary_and_writes_the_report(tmp_path, tiny_model_dir, caplog):
    from lora_tune.check import preflight
    from lora_tune.model.load import load_tokenizer
    from lora_tune.recipe.load import load_recipe

    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir))
    logger = logging.getLogger("lora_tune.check")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lora_tune.check"):
            report = preflight(recipe, load_tokenizer(recipe.model), tmp_path / "preflight.json")
    finally:
        logger.removeHandler(caplog.handler)
    assert report.passed
    assert set(caplog.messages) == {report.summary()}
    assert caplog.messages[0].startswith("pre-flight: 9 checks passed on 12 rows; ")
    assert json.loads((tmp_path / "preflight.json").read_text())["summary"] == report.summary()
