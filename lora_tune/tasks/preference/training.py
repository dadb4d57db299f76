"""Preference tuning (training.objective: dpo, orpo, kto, simpo), usually after SFT: what it adds to the lifecycle.

TRL's preference trainers do the loop. With an adapter the reference policy is the model with the adapter switched
off (peft), so no second copy of the weights is loaded; ORPO and SimPO need no reference at all. The starting point
is the base, or an earlier lora-tune run through `adapter.init_from` (sequential fine-tuning, with lineage).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lora_tune.check import PreflightReport
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import RunDir
from lora_tune.tasks.preference.checks import preference_report
from lora_tune.tasks.preference.data import load_preference_splits
from lora_tune.training.lifecycle import Launch, TaskData, TaskModel, TaskTraining, adapted_base, row_data
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
        splits = load_preference_splits(recipe)
        return row_data(run, splits.train, splits.validation, splits.test, f"{recipe.training.objective} rows")

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
