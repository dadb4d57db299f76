"""Recipe adapter section -> peft config. The only place that spells peft's option names."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from lora_tune.recipe.schema import AdapterConfig

if TYPE_CHECKING:
    from peft import PeftConfig

TaskType = Literal["CAUSAL_LM", "SEQ_CLS"]


def _targets(cfg: AdapterConfig) -> list[str] | str:
    return list(cfg.target_modules) if isinstance(cfg.target_modules, list) else cfg.target_modules


def _saved(cfg: AdapterConfig) -> list[str] | None:
    return list(cfg.modules_to_save) or None


def _lora(cfg: AdapterConfig, task_type: TaskType, steps: int | None, tokenizer: str) -> PeftConfig:
    from peft import LoraConfig

    # loftq through the config quantizes an unquantized base itself; lora-tune loads the base in 4-bit and lets
    # methods.runtime call replace_lora_weights_loftq instead, so the config keeps the default initialisation.
    init: bool | str = {"default": True, "loftq": True}.get(cfg.init, cfg.init)
    return LoraConfig(
        task_type=task_type,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=_targets(cfg),
        bias=cfg.bias,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        modules_to_save=_saved(cfg),
        init_lora_weights=init,
        rank_pattern=dict(cfg.rank_pattern),
        alpha_pattern=dict(cfg.alpha_pattern),
    )


def _ia3(cfg: AdapterConfig, task_type: TaskType, steps: int | None, tokenizer: str) -> PeftConfig:
    from peft import IA3Config

    return IA3Config(
        task_type=task_type,
        target_modules=_targets(cfg),
        feedforward_modules=list(cfg.feedforward_modules) or [],
        modules_to_save=_saved(cfg),
    )


def _adalora(cfg: AdapterConfig, task_type: TaskType, steps: int | None, tokenizer: str) -> PeftConfig:
    from peft import AdaLoraConfig

    return AdaLoraConfig(
        task_type=task_type,
        init_r=cfg.r,
        target_r=cfg.target_r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=_targets(cfg),
        modules_to_save=_saved(cfg),
        tinit=cfg.tinit,
        tfinal=cfg.tfinal,
        deltaT=cfg.delta_t,
        total_step=steps,
    )


def _loha(cfg: AdapterConfig, task_type: TaskType, steps: int | None, tokenizer: str) -> PeftConfig:
    from peft import LoHaConfig

    return LoHaConfig(
        task_type=task_type, r=cfg.r, alpha=cfg.alpha, target_modules=_targets(cfg), modules_to_save=_saved(cfg)
    )


def _lokr(cfg: AdapterConfig, task_type: TaskType, steps: int | None, tokenizer: str) -> PeftConfig:
    from peft import LoKrConfig

    return LoKrConfig(
        task_type=task_type, r=cfg.r, alpha=cfg.alpha, target_modules=_targets(cfg), modules_to_save=_saved(cfg)
    )


def _prompt_tuning(cfg: AdapterConfig, task_type: TaskType, steps: int | None, tokenizer: str) -> PeftConfig:
    from peft import PromptTuningConfig

    text = cfg.prompt_init_text
    return PromptTuningConfig(
        task_type=task_type,
        num_virtual_tokens=cfg.num_virtual_tokens,
        prompt_tuning_init="TEXT" if text else "RANDOM",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=tokenizer if text else None,
    )


def _prefix_tuning(cfg: AdapterConfig, task_type: TaskType, steps: int | None, tokenizer: str) -> PeftConfig:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens)


def _p_tuning(cfg: AdapterConfig, task_type: TaskType, steps: int | None, tokenizer: str) -> PeftConfig:
    from peft import PromptEncoderConfig

    return PromptEncoderConfig(
        task_type=task_type, num_virtual_tokens=cfg.num_virtual_tokens, encoder_hidden_size=cfg.encoder_hidden_size
    )


BUILDERS: dict[str, Callable[[AdapterConfig, TaskType, int | None, str], PeftConfig]] = {
    "lora": _lora,
    "ia3": _ia3,
    "adalora": _adalora,
    "loha": _loha,
    "lokr": _lokr,
    "prompt_tuning": _prompt_tuning,
    "prefix_tuning": _prefix_tuning,
    "p_tuning": _p_tuning,
}


def build_peft_config(
    cfg: AdapterConfig, *, task_type: TaskType = "CAUSAL_LM", total_steps: int | None = None, tokenizer: str = ""
) -> PeftConfig | None:
    """The peft config of the recipe's method; None for methods without an adapter (partial, full).

    total_steps: the run's optimizer steps (AdaLoRA's schedule); tokenizer: where prompt tuning's init text is
    tokenized."""
    builder = BUILDERS.get(cfg.method)
    return builder(cfg, task_type, total_steps, tokenizer) if builder is not None else None
