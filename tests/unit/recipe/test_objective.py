"""training.objective and its `preference:` settings: each objective reads its own keys, and the data and task
must fit it; anything else is refused in one line naming the key."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lora_tune.recipe.schema import Recipe


def recipe(**sections) -> Recipe:
    base = {"model": {"name": "m"}, "datasets": [{"path": "pairs.jsonl"}], "output_dir": "runs/x"}
    return Recipe.model_validate({**base, **sections})


@pytest.mark.parametrize("objective", ["dpo", "orpo", "kto", "simpo", "grpo", "rloo"])
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
        ({"preference": {"beta": 0.1}}, "set training.objective: dpo or orpo or kto or simpo"),
        ({"rl": {"num_generations": 4}}, "set training.objective: grpo or rloo"),
        (
            {"training": {"objective": "rloo", "batch_size": 4}, "rl": {"num_generations": 4, "loss_type": "grpo"}},
            "is not read by training.objective rloo; it reads beta",
        ),
        (
            {"training": {"objective": "grpo", "batch_size": 4}, "rl": {"num_generations": 3}},
            r"is not a multiple of rl.num_generations \(3\)",
        ),
        (
            {"training": {"objective": "grpo", "batch_size": 8}, "rl": {"rewards": [{"name": "length"}]}},
            "needs target",
        ),
        (
            {
                "training": {"objective": "grpo", "batch_size": 8},
                "rl": {"rewards": [{"name": "format", "column": "a"}]},
            },
            "does not apply to a format reward",
        ),
        (
            {"training": {"objective": "grpo", "batch_size": 8}, "datasets": [{"path": "p.jsonl", "format": "kto"}]},
            "grpo reads prompts rows, not format kto",
        ),
        ({"training": {"objective": "dpo", "packing": True}}, "not honoured by training.objective dpo runs"),
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


@pytest.mark.parametrize("objective", ["sft", "dpo", "kto", "simpo", "grpo", "rloo"])
def test_the_resolved_recipe_reads_back_as_the_same_recipe(tmp_path, objective: str):
    """recipe.yaml in a run (merge, eval and resume read it) holds only the keys its objective reads."""
    from lora_tune.recipe.load import dump_resolved, load_recipe

    sections = {"preference": {"beta": 0.2}} if objective in ("dpo", "kto", "simpo") else {}
    if objective in ("grpo", "rloo"):
        rewards = [{"name": "answer", "column": "solution"}, {"function": "mine.py:reward", "weight": 0.5}]
        sections = {"rl": {"beta": 0.01, "rewards": rewards}}
    original = recipe(training={"objective": objective}, **sections)
    saved = tmp_path / "recipe.yaml"
    saved.write_text(dump_resolved(original))
    assert load_recipe(saved, check_paths=False) == original
    text = saved.read_text()
    assert ("preference:" in text) == (objective in ("dpo", "kto", "simpo"))
    assert ("rl:" in text) == (objective in ("grpo", "rloo"))


CLASSIFY = {"type": "classification", "labels": ["a", "b"]}


@pytest.mark.parametrize(
    ("sections", "key", "run"),
    [
        ({"task": CLASSIFY, "training": {"packing": True}}, "training.packing", "classification"),
        ({"task": CLASSIFY, "training": {"train_on": "all"}}, "training.train_on", "classification"),
        ({"task": CLASSIFY, "training": {"liger": False}}, "training.liger", "classification"),
        (
            {"task": CLASSIFY, "training": {"activation_offloading": True}},
            "training.activation_offloading",
            "classification",
        ),
        ({"task": CLASSIFY, "distributed": {"strategy": "ddp"}}, "distributed", "classification"),
        ({"training": {"objective": "kto", "liger": True}}, "training.liger", "training.objective kto"),
        (
            {"training": {"objective": "orpo", "activation_offloading": True}},
            "training.activation_offloading",
            "training.objective orpo",
        ),
        (
            {"training": {"objective": "simpo"}, "distributed": {"strategy": "fsdp"}},
            "distributed",
            "training.objective simpo",
        ),
    ],
)
def test_a_setting_the_run_would_ignore_is_refused_naming_the_key_and_the_run(tmp_path, sections, key, run):
    """tasks/classification and the preference trainers would ignore these without a word (the table:
    recipe.rules.HONOURED_BY); each is refused in one line naming the key and the run."""
    import yaml

    from lora_tune.errors import RecipeError
    from lora_tune.recipe.load import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**recipe().model_dump(include={"model", "datasets", "output_dir"}), **sections}))
    with pytest.raises(RecipeError, match=f"{key}: is not honoured by {run}"):
        load_recipe(path, check_paths=False)


@pytest.mark.parametrize(
    ("sections", "ok"),
    [
        ({"task": CLASSIFY, "training": {"best_metric": "accuracy"}}, True),
        ({"task": CLASSIFY, "training": {"best_metric": "mean_token_accuracy"}}, False),
        ({"training": {"objective": "dpo", "best_metric": "accuracy"}}, False),
        ({"training": {"objective": "sft", "packing": False, "liger": False}}, True),
        ({"training": {"objective": "dpo", "activation_offloading": True}}, True),
    ],
)
def test_what_each_run_honours_is_accepted(sections: dict, ok: bool):
    if ok:
        recipe(**sections)
    else:
        with pytest.raises(ValidationError, match="logs loss"):
            recipe(**sections)


@pytest.mark.parametrize(
    "sections",
    [
        {"task": CLASSIFY},
        {"training": {"objective": "orpo"}},
        {"training": {"objective": "sft", "liger": False}, "distributed": {"strategy": "fsdp"}},
    ],
)
def test_every_kind_of_run_reads_its_resolved_recipe_back(tmp_path, sections: dict):
    """The resolved recipe leaves out what the run does not honour, so merge, eval and resume can read it back."""
    from lora_tune.recipe.load import dump_resolved, load_recipe

    original = recipe(**sections)
    saved = tmp_path / "recipe.yaml"
    saved.write_text(dump_resolved(original))
    assert load_recipe(saved, check_paths=False) == original
