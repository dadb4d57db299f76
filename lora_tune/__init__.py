"""lora-tune: recipe-driven LoRA / QLoRA fine-tuning of causal language models.

The library API mirrors the command line: `load_recipe` parses and validates a recipe without importing torch,
`train` runs it. Heavy modules are imported only when a function that needs them is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load_recipe", "train", "__version__"]

if TYPE_CHECKING:
    from lora_tune.recipe.load import load_recipe
    from lora_tune.tasks import train


def __getattr__(name: str) -> Any:
    if name == "load_recipe":
        from lora_tune.recipe.load import load_recipe

        return load_recipe
    if name == "train":
        from lora_tune.tasks import train

        return train
    raise AttributeError(f"module 'lora_tune' has no attribute {name!r}")
