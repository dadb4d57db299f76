"""training.objective and its `preference:` settings: each objective reads its own keys, and the data and task
must fit it; anything else is refused in one line naming the key."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lora_tune.recipe.schema import Recipe


def recipe(**sections) -> Recipe:
    base = {"model": {"name": "m"}, "datasets": [{"path": "pairs.jsonl"}], "output_dir": "runs/x"}
    return Recipe.model_validate({**base, **sections})


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto", "simpo"])
def test_each_objective_validates_with_its_defaults(objective: str):
    assert recipe(training={"objective": objective}).training.objective == objective


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        (
            {"training": {"objective": "orpo"}, "preference": {"loss_type": "ipo"}},
            "not read by training.objective orpo",
        ),
        ({"training": {"objective": "dpo"}, "preference": {"simpo_gamma": 1.0}}, "it reads beta, label_smoothing"),
        ({"preference": {"beta": 0.1}}, "set training.objective to use them"),
        ({"training": {"objective": "dpo", "packing": True}}, "applies to training.objective sft only"),
        (
            {"training": {"objective": "kto"}, "datasets": [{"path": "p.jsonl", "format": "preference"}]},
            "reads kto rows",
        ),
        ({"datasets": [{"path": "p.jsonl", "format": "preference"}]}, "needs a preference training.objective"),
        ({"training": {"objective": "dpo"}, "task": {"type": "classification", "labels": ["a", "b"]}}, "task.type"),
        ({"training": {"objective": "kto", "best_metric": "rewards/accuracies"}}, "kto logs loss at evaluation"),
        ({"training": {"best_metric": "rewards/margins"}}, "sft logs loss, mean_token_accuracy"),
        ({"training": {"objective": "dpo", "best_metric": "mean_token_accuracy"}}, "not mean_token_accuracy"),
    ],
)
def test_settings_that_belong_elsewhere_are_refused(sections: dict, message: str):
    with pytest.raises(ValidationError, match=message):
        recipe(**sections)


@pytest.mark.parametrize("objective", ["sft", "dpo", "kto", "simpo"])
def test_the_resolved_recipe_reads_back_as_the_same_recipe(tmp_path, objective: str):
    """recipe.yaml in a run (merge, eval and resume read it) holds only the keys its objective reads."""
    from lora_tune.recipe.load import dump_resolved, load_recipe

    original = recipe(training={"objective": objective}, preference={"beta": 0.2} if objective != "sft" else {})
    saved = tmp_path / "recipe.yaml"
    saved.write_text(dump_resolved(original))
    assert load_recipe(saved, check_paths=False) == original
    assert ("preference:" in saved.read_text()) == (objective != "sft")
