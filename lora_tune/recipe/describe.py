"""A recipe in one line: what `lora-tune validate` confirms and `lora-tune train` announces."""

from __future__ import annotations

from lora_tune.recipe.schema import Recipe


def describe(recipe: Recipe) -> str:
    """The method (QLoRA named as such, an 8-bit base, DoRA / rsLoRA), its rank, the model, the data and the output,
    e.g. "QLoRA (4-bit nf4) r=16 on Qwen/Qwen2.5-0.5B-Instruct; data: data/train.jsonl; output: runs/x"."""
    quant = recipe.quantization
    method = recipe.adapter.method
    if quant.bits == 4 and method == "lora":
        method = f"QLoRA (4-bit {quant.quant_type})"
    elif quant.bits == 8:
        method = f"{method} on an 8-bit base"
    extras = [name for name, on in (("DoRA", recipe.adapter.use_dora), ("rsLoRA", recipe.adapter.use_rslora)) if on]
    method += "".join(f" + {e}" for e in extras)
    sources = ", ".join(d.path for d in recipe.datasets)
    rank = f" r={recipe.adapter.r}" if "r" in recipe.adapter.model_dump() else ""  # only methods that have a rank
    return f"{method}{rank} on {recipe.model.name}; data: {sources}; output: {recipe.output_dir}"
