"""Preference tuning (training.objective: dpo, orpo, kto, simpo), usually after SFT: what it adds to the lifecycle.

TRL's preference trainers do the loop. With an adapter the reference policy is the model with the adapter switched
off (peft), so no second copy of the weights is loaded; ORPO and SimPO need no reference at all. The starting point
is the base, or an earlier lora-tune run through `adapter.init_from` (sequential fine-tuning, with lineage).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lora_tune.check import PreflightReport
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import RunDir, write_text_atomic
from lora_tune.tasks.preference.checks import preference_report
from lora_tune.tasks.preference.data import PreferenceSplits, load_preference_splits
from lora_tune.training.lifecycle import Launch, TaskData, TaskModel, TaskTraining, adapted_base
from lora_tune.training.trl_args import preference_classes, to_preference_config

log = logging.getLogger(__name__)


class PreferenceTraining(TaskTraining):
    name = "preference"

    def arguments(self, recipe: Recipe, checkpoints: Path, dtype: Any) -> Any:
        return to_preference_config(recipe, checkpoints, dtype)

    def checks(self, recipe: Recipe, tokenizer: Any) -> PreflightReport:
        return preference_report(recipe, tokenizer)

    def data(self, recipe: Recipe, tokenizer: Any, run: RunDir, launch: Launch) -> TaskData:
        """Every row checked (pairs that prefer nothing, empty answers) before the model loads."""
        from datasets import Dataset

        splits = load_preference_splits(recipe)
        _write_test_split(run, splits)
        objective = recipe.training.objective
        log.info("data: %d training, %d validation %s rows", len(splits.train), len(splits.validation), objective)
        validation = Dataset.from_list(splits.validation) if splits.validation else None
        return TaskData(Dataset.from_list(splits.train), validation)

    def model(self, recipe: Recipe, tokenizer: Any, launch: Launch) -> TaskModel:
        """The base (quantized as the recipe says) with the method applied; the reference is the adapter off."""
        return adapted_base(recipe)

    def trainer(
        self, recipe: Recipe, model: TaskModel, args: Any, data: TaskData, tokenizer: Any, callbacks: list[Any]
    ) -> Any:
        trainer_class = preference_classes(recipe.training.objective)[0]
        return trainer_class(
            model=model.model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.validation,
            processing_class=tokenizer,
            peft_config=model.peft_config,
            callbacks=callbacks,
        )

    def figures(self, recipe: Recipe, final: dict[str, float]) -> dict[str, Any]:
        return {
            "reward_accuracy": final.get("eval_rewards/accuracies"),
            "reward_margin": final.get("eval_rewards/margins"),
        }


def _write_test_split(run: RunDir, splits: PreferenceSplits) -> None:
    """The held-out pairs, one JSON row each, for `lora-tune eval` (nothing when the recipe holds none out)."""
    if splits.test:
        lines = [json.dumps(row, ensure_ascii=False) for row in splits.test]
        write_text_atomic(run.test_split, "\n".join(lines) + "\n")
