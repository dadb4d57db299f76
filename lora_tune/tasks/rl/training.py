"""Online RL with rewards (training.objective: grpo, rloo), usually after SFT: what it adds to the lifecycle.

TRL's GRPOTrainer and RLOOTrainer do the loop: for each prompt the policy samples rl.num_generations completions
(transformers' generate on the CPU, vLLM where the recipe asks), the rewards score them, and each completion is
pushed up or down by how it did against its group. With an adapter and a KL penalty (rl.beta > 0), the reference
policy is the model with the adapter switched off (peft): no second copy of the weights. The starting point is the
base, or an earlier lora-tune run (`adapter.init_from`, e.g. the SFT stage) with its lineage.

What the run adds to the lifecycle's record: completions.jsonl (a few sampled completions with each reward's score,
at each log step and evaluation) and reward.png (the mean total reward, and each reward's, against step).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from lora_tune.check import PreflightReport
from lora_tune.recipe.schema import Recipe
from lora_tune.run.layout import RunDir
from lora_tune.tasks.rl.checks import rl_report
from lora_tune.tasks.rl.data import load_prompt_splits
from lora_tune.tasks.rl.rewards import Scored, build_rewards, completion_text
from lora_tune.training.lifecycle import Launch, TaskData, TaskModel, TaskTraining, adapted_base, row_data
from lora_tune.training.log import last_value as _last
from lora_tune.training.log import plot_series, read_metrics
from lora_tune.training.trl_args import rl_classes, to_rl_config

log = logging.getLogger(__name__)


class RLTraining(TaskTraining):
    name = "rl"

    def arguments(self, recipe: Recipe, checkpoints: Path, dtype: Any) -> Any:
        return to_rl_config(recipe, checkpoints, dtype)

    def checks(self, recipe: Recipe, tokenizer: Any) -> PreflightReport:
        return rl_report(recipe, tokenizer)

    def data(self, recipe: Recipe, tokenizer: Any, run: RunDir, launch: Launch) -> TaskData:
        splits = load_prompt_splits(recipe)
        return row_data(run, splits.train, splits.validation, splits.test, "prompts")

    def model(self, recipe: Recipe, tokenizer: Any, launch: Launch) -> TaskModel:
        return adapted_base(recipe)

    def trainer(
        self, recipe: Recipe, model: TaskModel, args: Any, data: TaskData, tokenizer: Any, callbacks: list[Any]
    ) -> Any:
        completions = CompletionLog(recipe.run_dir.completions, recipe.rl.log_completions, args.logging_steps)
        rewards = build_rewards(recipe.rl.rewards, on_scored=completions.scored)
        completions.rewards = rewards
        trainer = rl_classes(recipe.training.objective)[0](
            model=model.model,
            reward_funcs=rewards,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.validation,
            processing_class=tokenizer,
            peft_config=model.peft_config,
            callbacks=callbacks,
        )
        completions.trainer = trainer
        return trainer

    def figures(self, recipe: Recipe, final: dict[str, float]) -> dict[str, Any]:
        return {"eval_reward": final.get("eval_reward"), "train_reward": last_value(recipe.run_dir, "reward")}

    def plots(self, run: RunDir) -> Path | None:
        records = read_metrics(run.metrics)
        labels = sorted(
            {k.split("/")[1] for r in records for k in r if k.startswith("rewards/") and k.endswith("/mean")}
        )
        series = [("reward", "train reward"), ("eval_reward", "eval reward")]
        if len(labels) > 1:  # one reward is the total: its own line would hide under it
            series += [(f"rewards/{label}/mean", f"train {label}") for label in labels]
        return plot_series(records, run.reward_plot, f"{run.root.name}: reward", "mean reward", series)


class CompletionLog:
    """Writes a few sampled completions with each reward's score to completions.jsonl: at each log step of training
    (the first batch of the step) and at each evaluation (its first batch). Called by the last reward of the list,
    once every reward has scored the batch."""

    def __init__(self, path: Path, per_log: int, logging_steps: int):
        self.path, self.per_log, self.logging_steps = path, per_log, logging_steps
        self.rewards: list[Scored] = []
        self.trainer: Any = None
        self._written: set[tuple[str, int]] = set()

    def scored(self, reward: Scored, batch: dict[str, Any]) -> None:
        if not self.per_log or self.trainer is None or reward is not self.rewards[-1]:
            return
        if not self.trainer.is_world_process_zero():
            return
        state = self.trainer.state
        split = "train" if self.trainer.model.training else "eval"
        step = state.global_step + 1 if split == "train" else state.global_step  # the step this batch trains
        due = split == "eval" or step == 1 or step % self.logging_steps == 0
        if not due or (split, step) in self._written:
            return
        self._written.add((split, step))
        weights = self.trainer.reward_weights.tolist()
        with self.path.open("a", encoding="utf-8") as handle:
            for i in range(min(self.per_log, len(batch["completions"]))):
                scores = {r.__name__: None if math.isnan(r.last[i]) else r.last[i] for r in self.rewards}
                total = sum(w * (s or 0.0) for w, s in zip(weights, scores.values(), strict=True))
                prompt = batch["prompts"][i]
                record = {
                    "step": step,
                    "split": split,
                    "prompt": prompt[-1]["content"] if isinstance(prompt, list) else prompt,
                    "completion": completion_text(batch["completions"][i]),
                    "rewards": scores,
                    "total": total,
                }
                handle.write(json.dumps(record, ensure_ascii=False, allow_nan=False, default=str) + "\n")


def last_value(run: RunDir, key: str) -> float | None:
    return _last(read_metrics(run.metrics), key)
