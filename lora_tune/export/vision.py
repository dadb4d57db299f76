"""Merging a vision run: the adapter (and a projector trained in full) folded into the image-text-to-text base.

peft's merge_and_unload on the base loaded unquantized in the merge dtype (as peft advises for QLoRA adapters: never
merge into 4-bit layers), the processor saved beside it, then verified: the folder reloads with
`AutoModelForImageTextToText` and `AutoProcessor`, and its logits on a picture and a prompt match base + adapter's.
The output folder follows every merge's rules (new, empty, or an earlier merge with --overwrite; built aside and
renamed into place). GGUF export of vision models is refused (lora_tune.export.gguf).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lora_tune.export.errors import ExportError
from lora_tune.export.result import MergeResult
from lora_tune.model.vision import load_processor, load_vision_model
from lora_tune.recipe.schema import QuantizationConfig, Recipe
from lora_tune.run.layout import RunDir

TOLERANCE = {"fp32": 1e-3, "bf16": 0.25, "fp16": 0.05}


def merge_vision(
    run: RunDir, recipe: Recipe, build: Path, output: Path, *, dtype: str, torch_dtype: Any, verify: bool
) -> MergeResult:
    """Merge and save into the marked `build` folder, and verify (lora_tune.export.merging.merge checked the
    destination, holds its lock, and renames the build into place)."""
    from peft import PeftModel

    started = time.monotonic()
    model_cfg = recipe.model.model_copy(update={"dtype": _dtype_name(torch_dtype)})
    base = load_vision_model(model_cfg, QuantizationConfig(), gradient_checkpointing=False, inference=True)
    model = PeftModel.from_pretrained(base, run.adapter)
    adapted = sum(1 for name, _ in model.named_modules() if name.endswith("lora_A"))
    saved = sum(1 for name, _ in model.named_modules() if name.endswith("modules_to_save"))
    processor = load_processor(recipe.model.model_copy(update={"tokenizer": str(run.adapter), "chat_template": None}))
    probe = _probe(processor)
    expected = _logits(model, probe) if verify else None
    merged = model.merge_and_unload()
    merged.save_pretrained(build, safe_serialization=True)
    processor.save_pretrained(build)
    result = MergeResult(output, dtype, "peft merge_and_unload (vision)", 1, adapted, saved, [])
    if verify:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        again = AutoModelForImageTextToText.from_pretrained(build, dtype=torch_dtype, use_safetensors=True)
        again.eval()
        got = _logits(again, _probe(AutoProcessor.from_pretrained(build)))
        result.max_abs_diff = float((got - expected).abs().max())
        result.tolerance = TOLERANCE[dtype]
        if result.max_abs_diff > result.tolerance:
            raise ExportError(
                f"the merged vision model's logits differ from base + adapter by {result.max_abs_diff:.3g} "
                f"(tolerance {result.tolerance:.3g}); nothing was written to {output}"
            )
    result.seconds = round(time.monotonic() - started, 1)
    return result


def _dtype_name(torch_dtype: Any) -> str:
    return str(torch_dtype).removeprefix("torch.")


def _probe(processor: Any) -> dict[str, Any]:
    """A picture (a red square on grey) and a question, as the processor makes them into the model's inputs."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), (128, 128, 128))
    ImageDraw.Draw(image).rectangle((16, 16, 48, 48), fill=(220, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the picture?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text], images=[[image]], add_special_tokens=False, return_tensors="pt"))


def _logits(model: Any, inputs: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        return model(**inputs).logits.float()
