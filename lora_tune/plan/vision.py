"""What a vision-language base adds to the memory plan: the vision tower and projector (kept in the model dtype,
never 4-bit) and the image tokens each picture puts into a row, counted from the model's config.json.

Image tokens per picture, by family: LLaVA `(image_size / patch_size)^2` (the CLIP class token dropped by the
`default` feature strategy); Idefics3 / SmolVLM `(image_size / patch_size)^2 / scale_factor^2` per tile, plus the
global image and `(longest side / image_size)^2` tiles when the processor splits; Qwen2/2.5-VL varies with the picture
(`pixels / (14 * 14 * 4)`, bounded by the processor's max_pixels), so the plan names it instead of counting it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class VisionShape:
    tower_parameters: int
    projector_parameters: int
    image_tokens: int | None  # per picture (one tile); None where it varies with the picture
    how: str


def vision_shape(config: dict[str, Any]) -> VisionShape | None:
    """The tower's and projector's sizes and the image tokens per picture, or None for a text-only config."""
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        return None
    text = config.get("text_config") or {}
    hidden = int(vision.get("hidden_size") or vision.get("embed_dim") or 0)
    inner = int(vision.get("intermediate_size") or 4 * hidden)
    layers = int(vision.get("num_hidden_layers") or vision.get("depth") or 0)
    patch = int(vision.get("patch_size") or 14)
    size = int(vision.get("image_size") or 224)
    patches = (size // patch) ** 2
    tower = layers * (4 * hidden * hidden + 2 * hidden * inner) + 3 * patch * patch * hidden + patches * hidden
    text_hidden = int(text.get("hidden_size") or config.get("hidden_size") or 0)
    model_type = config.get("model_type", "")
    scale = int(config.get("scale_factor") or 1)
    if model_type in ("idefics3", "smolvlm"):
        projector = hidden * scale * scale * text_hidden
        tokens: int | None = patches // (scale * scale)
        how = f"{tokens} image tokens per {size}x{size} tile (patch {patch}, scale factor {scale}), plus markers"
    elif model_type.startswith("qwen2") and "vl" in model_type:
        projector = 4 * hidden * 4 * hidden + 4 * hidden * text_hidden
        tokens, how = None, "image tokens vary with each picture's pixels (one per 28x28 area, max_pixels bounds it)"
    else:  # LLaVA and its kin: a two-layer MLP projector, one token per patch
        projector = hidden * text_hidden + text_hidden * text_hidden
        tokens = patches
        how = f"{tokens} image tokens per picture ({size}x{size}, patch {patch})"
    return VisionShape(tower, projector, tokens, how)
