"""The pre-flight of an RL recipe calls every reward before any weight loads: a broken reward (one that raises,
returns the wrong count, a non-finite value, or the same value for everything) fails in one line naming the reward
and the row, as do prompts that leave no room for the completion; `train` refuses such a recipe before loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tune.cli import main
from tests.conftest import FRUITS
from tests.helpers import model_dir, write_check_recipe

GRPO = {"objective": "grpo", "batch_size": 4, "max_length": 64}


def prompt_rows(n: int) -> list[dict]:
    return [{"prompt": f"fruit number {i}?", "answer": FRUITS[i % len(FRUITS)]} for i in range(n)]


def recipe_with(tmp_path: Path, reward_source: str | None, **rl) -> Path:
    rewards = [{"name": "answer"}]
    if reward_source is not None:
        (tmp_path / "reward.py").write_text(reward_source)
        rewards.append({"function": f"{tmp_path / 'reward.py'}:mine"})
    model = model_dir(tmp_path / "m")  # a tokenizer and no weights: train must refuse before loading a model
    settings = {"num_generations": 4, "max_completion_length": 16, "rewards": rewards, **rl}
    return write_check_recipe(tmp_path, model, prompt_rows(12), training=GRPO, rl=settings)


def test_a_recipe_with_working_rewards_passes(tmp_path: Path, capsys):
    ok = "def mine(completions, **kw):\n    return [float(len(c[0]['content']) > 5) for c in completions]\n"
    assert main(["check", str(recipe_with(tmp_path, ok))]) == 0
    out = capsys.readouterr().out
    assert "PASS  reward:answer" in out and "PASS  reward:mine" in out and "prompt-room" in out


BROKEN = [
    ("def mine(completions, **kw):\n    raise KeyError('score')\n", "raised KeyError: 'score'"),
    ("def mine(completions, **kw):\n    return [1.0]\n", "returned 1 values for"),
    ("def mine(completions, **kw):\n    return [float('nan')] * len(completions)\n", "returned nan"),
    ("def mine(completions, **kw):\n    return [0.5] * len(completions)\n", "gave 0.5 to every sampled completion"),
]


@pytest.mark.parametrize(("source", "message"), BROKEN, ids=["raises", "count", "nan", "constant"])
def test_a_broken_reward_fails_the_check_and_train_refuses_before_loading(tmp_path: Path, capsys, source, message):
    recipe = recipe_with(tmp_path, source)
    assert main(["check", str(recipe)]) == 2
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("FAIL"))
    assert "reward:mine" in line and message in line and "train.jsonl row 1" in line, out
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "reward:mine" in err and message in err and "Traceback" not in err


def test_prompts_without_room_for_the_completion_are_counted_and_refused(tmp_path: Path, capsys):
    assert main(["check", str(recipe_with(tmp_path, None, max_completion_length=60))]) == 2
    out = capsys.readouterr().out
    assert "FAIL  prompt-room" in out and "12 of 12 prompts leave less than rl.max_completion_length (60)" in out


def test_an_answer_reward_without_references_fails(tmp_path: Path, capsys):
    model = model_dir(tmp_path / "m")
    rows = [{"prompt": f"fruit number {i}?"} for i in range(8)]
    recipe = write_check_recipe(tmp_path, model, rows, training=GRPO, rl={"num_generations": 4})
    assert main(["check", str(recipe)]) == 2
    assert "reads the column 'answer', which the rows do not have" in capsys.readouterr().out


def test_vllm_generation_is_refused_on_the_cpu_before_any_work(tmp_path: Path, capsys):
    recipe = recipe_with(tmp_path, None)
    assert main(["train", str(recipe), "rl.use_vllm=true"]) == 2
    assert "rl.use_vllm: vLLM generates on a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_data_shows_the_prompts_as_the_policy_sees_them(tmp_path: Path, capsys):
    assert main(["data", str(recipe_with(tmp_path, None)), "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "grpo: 12 training prompts, 0 validation, 0 test; 4 completions sampled per prompt" in out
    assert "no room for max_completion_length 16 within max_length 64: 0 of 12 prompts" in out
    assert "fruit number 0?" in out and 'columns for the rewards: {"answer": "apple"}' in out
