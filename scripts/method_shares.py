"""Trainable parameters of each method's realistic recipe (recipes/methods/qwen2.5-0.5b-*.yaml) on the
Qwen2.5-0.5B architecture, built from its published dimensions on the meta device (no download, no memory).

Prints a Markdown table: method, trainable parameters, share of the model, and an estimate of the training memory
per base parameter (weights + gradients + optimizer states; activations excluded) relative to full fine-tuning.
Run: PYTHONPATH=. python scripts/method_shares.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_tune.methods import runtime
from lora_tune.recipe.load import load_recipe

ROOT = Path(__file__).resolve().parents[1]
QWEN_05B = dict(  # Qwen/Qwen2.5-0.5B config.json
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
)  # fmt: skip
BASE_BYTES = {None: 2.0, 8: 1.0, 4: 0.55}  # bf16, int8, NF4 + double-quantized constants


def build(recipe_name: str) -> tuple[object, object]:
    from peft import get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # The prompt-tuning init text needs the real tokenizer; the parameter count does not depend on it.
    offline = ["adapter.prompt_init_text=null"] if "prompt-tuning" in recipe_name else []
    recipe = load_recipe(ROOT / "recipes" / "methods" / f"{recipe_name}.yaml", offline)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN_05B))
    model, config = runtime.prepare_model(recipe, model)
    if config is not None:
        model = get_peft_model(model, config)
    return recipe, model


def main() -> None:
    names = ["full", "partial", "lora", "qlora", "lora-8bit", "dora", "rslora-loraplus", "lora-patterns", "ia3",
             "adalora", "loha", "lokr", "prompt-tuning", "prefix-tuning", "p-tuning"]  # fmt: skip
    print("| recipe | trainable | share | memory vs full |")
    print("|---|---:|---:|---:|")
    full_bytes = None
    for name in names:
        recipe, model = build(f"qwen2.5-0.5b-{name}")
        trainable, total = runtime.parameter_counts(model)
        frozen = total - trainable
        # weights in their dtype; bf16 gradients and AdamW states for trainable weights (8-bit AdamW: 2 bytes,
        # else two float32 moments for adapters, which peft keeps in float32: 4 + 4 + 4 + 4).
        optimizer = 2 if recipe.training.optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8
        adapter_like = runtime.has_adapter(recipe)
        per_trainable = (4 + 4 + optimizer) if adapter_like else (2 + 2 + optimizer)
        bytes_ = frozen * BASE_BYTES[recipe.quantization.bits] + trainable * per_trainable
        full_bytes = full_bytes or bytes_
        print(f"| {name} | {trainable:,} | {100 * trainable / total:.3f}% | {bytes_ / full_bytes:.2f} |")


if __name__ == "__main__":
    main()
