"""Recipe adapter section -> peft config. The only place that spells peft's option names."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lora_tune.config import AdapterConfig

if TYPE_CHECKING:
    from peft import PeftConfig


def _lora(cfg: AdapterConfig) -> PeftConfig:
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias=cfg.bias,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        modules_to_save=list(cfg.modules_to_save) or None,
    )


BUILDERS: dict[str, Callable[[AdapterConfig], PeftConfig]] = {"lora": _lora}


def build_peft_config(cfg: AdapterConfig) -> PeftConfig:
    return BUILDERS[cfg.method](cfg)
