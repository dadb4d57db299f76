"""Recipe checks and trainer arguments for validation-driven training: keep_best, early stopping, plateau, eval:."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_tune.recipe.schema import EvalConfig, Recipe


def recipe(**training) -> Recipe:
    base = {"eval_strategy": "steps", "eval_steps": 5, "save_steps": 10}
    return Recipe(
        model={"name": "m"},
        datasets=[{"path": "d.jsonl"}],
        val_size=0.1,
        output_dir="o",
        training={**base, **training},
    )


def error(**training) -> str:
    with pytest.raises(ValueError) as info:
        recipe(**training)
    return str(info.value)


def test_best_checkpoint_control_needs_evaluations_and_aligned_checkpoints() -> None:
    assert recipe(early_stopping_patience=2).training.keeps_best
    assert not recipe().training.keeps_best
    assert "eval_strategy is 'no'" in error(eval_strategy="no", eval_steps=None, keep_best=True)
    assert "eval_strategy is 'no'" in error(eval_strategy="no", eval_steps=None, lr_scheduler="reduce_lr_on_plateau")
    assert "12 is not a multiple of eval_steps 5" in error(save_steps=12, early_stopping_patience=2)
    assert "set save_strategy: epoch" in error(eval_strategy="epoch", eval_steps=None, keep_best=True)
    # eval_steps unset: transformers evaluates every logging_steps.
    assert "not a multiple of eval_steps 10" in error(eval_steps=None, logging_steps=10, save_steps=25, keep_best=True)
    assert "applies to lr_scheduler: reduce_lr_on_plateau only" in error(plateau_factor=0.1)
    assert "set early_stopping_patience" in error(early_stopping_threshold=0.1)
    assert recipe(save_steps=12).training.save_steps == 12  # no best checkpoint kept: nothing to align


def test_eval_section_checks() -> None:
    assert EvalConfig().do_sample is False
    with pytest.raises(ValueError, match="applies to sampling only"):
        EvalConfig(temperature=0.7)
    assert EvalConfig(do_sample=True, temperature=0.7, top_p=0.9).top_p == 0.9
    with pytest.raises(ValueError, match="labels"):
        EvalConfig(task="text", labels=["a", "b"])


def test_trainer_arguments(tmp_path: Path) -> None:
    import torch

    from lora_tune.training.trl_args import early_stopping_callbacks, to_sft_config

    r = recipe(early_stopping_patience=3, early_stopping_threshold=0.01, lr_scheduler="reduce_lr_on_plateau")
    config = to_sft_config(r, tmp_path, torch.float32)
    assert config.load_best_model_at_end and config.metric_for_best_model == "loss"
    assert config.greater_is_better is False
    assert config.lr_scheduler_type == "reduce_lr_on_plateau"
    assert config.lr_scheduler_kwargs == {"mode": "min", "patience": 1, "factor": 0.5}
    (callback,) = early_stopping_callbacks(r)
    assert (callback.early_stopping_patience, callback.early_stopping_threshold) == (3, 0.01)

    accuracy = to_sft_config(recipe(keep_best=True, best_metric="mean_token_accuracy"), tmp_path, torch.float32)
    assert accuracy.metric_for_best_model == "mean_token_accuracy" and accuracy.greater_is_better is True
    assert accuracy.load_best_model_at_end and early_stopping_callbacks(recipe(keep_best=True)) == []
    plain = to_sft_config(recipe(), tmp_path, torch.float32)
    assert plain.load_best_model_at_end is False and plain.metric_for_best_model is None


@pytest.mark.parametrize("trackers", [["tensorboard"], ["wandb"], ["tensorboard", "wandb"], []])
def test_report_to_is_passed_through(tmp_path: Path, trackers: list[str]) -> None:
    import torch

    from lora_tune.training.trl_args import to_sft_config

    assert to_sft_config(recipe(report_to=trackers), tmp_path, torch.float32).report_to == trackers
