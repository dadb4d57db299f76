"""The built-in rewards read a completion's final answer as a checker should, and a user's function is loaded from
its file; what they give is what TRL is handed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tune.recipe.schema import RewardConfig
from lora_tune.tasks.rl.rewards import (
    RewardError,
    answers_match,
    build_rewards,
    final_answer,
    load_function,
)


def turn(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("<think>\n2 + 2 is 4, not 5\n</think>\nThe answer is \\boxed{4}.", "4"),
        ("so #### 1,000", "1000"),
        ("#### 1,000.0", "1000"),
        ('"Bitra".', "bitra"),
        ("<think>it is Bitra? no, Kron</think>\n\nKron", "Kron"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ],
)
def test_the_final_answer_is_compared(completion: str, answer: str):
    assert answers_match(completion, answer)


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("<think>the answer is 4</think>\n5", "4"),  # reasoning is not the answer
        ("4.5", "4"),
        ("Bitra or Kron", "Bitra"),
        ("", ""),  # an empty reference matches nothing
        ("#### 12", "1"),
    ],
)
def test_a_wrong_final_answer_is_not_accepted(completion: str, answer: str):
    assert not answers_match(completion, answer)


def test_final_answer_takes_the_last_boxed_answer_after_the_reasoning():
    assert final_answer("<think>\\boxed{1}</think> first \\boxed{2} then \\boxed{3}") == "3"


def test_the_built_in_rewards_score_a_batch_as_trl_calls_them():
    rewards = build_rewards(
        [
            RewardConfig(name="answer", column="solution"),
            RewardConfig(name="format"),
            RewardConfig(name="length", target=2),
            RewardConfig(name="answer", column="solution", weight=0.5),
        ]
    )
    assert [r.__name__ for r in rewards] == ["answer", "format", "length", "answer_2"]  # TRL's metric names
    completions = [turn("<think>x</think> 7"), turn("7"), turn("8")]
    kwargs = {"prompts": [[]] * 3, "completions": completions, "completion_ids": [[1, 2, 3], [1], [1, 2, 3, 4]]}
    answer, fmt, length, _ = (r(**kwargs, solution=["7", "7", "7"]) for r in rewards)
    assert answer == [1.0, 1.0, 0.0]
    assert fmt == [1.0, 0.0, 0.0]
    assert length == [2 / 3, 1.0, 0.5]


def test_the_answer_reward_names_a_missing_column():
    (answer,) = build_rewards([RewardConfig(name="answer")])
    with pytest.raises(RewardError, match="reads the column 'answer'"):
        answer(prompts=[[]], completions=[turn("4")], solution=["4"])


def test_a_function_reward_is_loaded_from_its_file(tmp_path: Path):
    (tmp_path / "mine.py").write_text(
        "def shout(completions, **kw):\n    return [c[0]['content'].isupper() * 1.0 for c in completions]\n"
    )
    (reward,) = build_rewards([RewardConfig(function=f"{tmp_path / 'mine.py'}:shout")])
    assert reward.__name__ == "shout"
    assert reward(prompts=[[], []], completions=[turn("YES"), turn("no")]) == [1.0, 0.0]
    assert reward.last == [1.0, 0.0]


@pytest.mark.parametrize(
    ("source", "spec", "message"),
    [
        (None, "missing.py:f", "no file"),
        ("def g(**kw): return []\n", "r.py:f", "has no function 'f'"),
        ("import not_a_module_anywhere\n", "r.py:f", "importing"),
    ],
)
def test_a_function_that_cannot_be_loaded_is_one_line(tmp_path: Path, monkeypatch, source, spec, message):
    monkeypatch.chdir(tmp_path)
    if source is not None:
        (tmp_path / "r.py").write_text(source)
    with pytest.raises(RewardError, match=message) as caught:
        load_function(spec)
    assert "\n" not in str(caught.value)
