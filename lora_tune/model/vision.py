"""Vision-language bases: the processor, the model (4-bit on the language side only), and its three parts.

A vision-language model is a vision tower (CLIP, SigLIP...), a projector that maps its features into the language
model's embeddings, and the language model. The parts are found by module name, per family:

| family (transformers class) | vision tower | projector | language model |
|---|---|---|---|
| LLaVA, LLaVA-NeXT, Mistral3, Gemma 3 | `vision_tower` | `multi_modal_projector` | `language_model` |
| Idefics3 / SmolVLM | `vision_model` | `connector` | `text_model` |
| Qwen2-VL, Qwen2.5-VL | `visual` (its `merger` is the projector) | `visual.merger` | `language_model` |

4-bit quantization covers the language model; the tower and projector stay in the model dtype
(`llm_int8_skip_modules`), as peers do: quantizing a small vision encoder costs accuracy and saves little memory.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from lora_tune.errors import ModelLoadError
from lora_tune.model.chat_template import apply_chat_template_choice, ensure_pad_token
from lora_tune.model.kbit import prepare_for_kbit_training
from lora_tune.model.load import build_bnb_config, device_map, resolve_dtype, settle_4bit_packing
from lora_tune.model.safety import check_weights_format, warn_remote_code
from lora_tune.recipe.schema import ModelConfig, QuantizationConfig, VisionConfig

log = logging.getLogger(__name__)

TOWERS = ("vision_tower", "vision_model", "visual")
PROJECTORS = ("multi_modal_projector", "connector", "merger")


@dataclass(frozen=True)
class VisionParts:
    """The module names (first component under the model) of the tower and projector, as the model spells them."""

    tower: str | None
    projector: str | None


def vision_parts(model: Any) -> VisionParts:
    names = [name for name, _ in model.named_modules()]
    return VisionParts(_first(names, TOWERS), _first(names, PROJECTORS))


def load_processor(model_cfg: ModelConfig) -> Any:
    """The model's processor (tokenizer + image processor), its tokenizer given the processor's chat template so that
    masking (lora_tune.data.masking) renders with it; a pad token is set where there is none."""
    from transformers import AutoProcessor

    source = model_cfg.tokenizer or model_cfg.name
    try:
        processor = AutoProcessor.from_pretrained(
            source, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"model.name: cannot load the processor of '{source}': {first}") from exc
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(
            f"model.name: '{source}' has no image processor; a vision run needs a vision-language base"
        )
    if model_cfg.chat_template is not None:
        apply_chat_template_choice(tokenizer, model_cfg.chat_template, source)
        processor.chat_template = tokenizer.chat_template
    elif getattr(processor, "chat_template", None):
        tokenizer.chat_template = processor.chat_template
    ensure_pad_token(tokenizer)
    return processor


def load_vision_model(
    model_cfg: ModelConfig, quant: QuantizationConfig, *, gradient_checkpointing: bool, inference: bool = False
) -> Any:
    """The image-text-to-text base; with quantization, its language model in 4-bit (or 8-bit), tower and projector
    kept in the model dtype."""
    from transformers import AutoModelForImageTextToText

    check_weights_format(model_cfg.name, "model", model_cfg.allow_pickle)
    warn_remote_code(model_cfg.name, model_cfg.trust_remote_code)
    dtype = resolve_dtype(model_cfg.dtype)
    bnb = build_bnb_config(quant, dtype)
    if bnb is not None:
        # transformers matches these from the start of a module's full name, as a regex (quantizers_utils)
        bnb.llm_int8_skip_modules = [rf"(.*\.)?{part}" for part in (*TOWERS, *PROJECTORS)] + ["lm_head"]
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            model_cfg.name,
            revision=model_cfg.revision,
            dtype=dtype,
            quantization_config=bnb,
            trust_remote_code=model_cfg.trust_remote_code,
            device_map=device_map(),
            use_safetensors=None if model_cfg.allow_pickle else True,
        )
    except (OSError, ValueError, ImportError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"model.name: cannot load '{model_cfg.name}' as an image-text-to-text model: {first}"
        ) from exc
    settle_4bit_packing(model, inference)
    if bnb is not None and not inference:
        model = prepare_for_kbit_training(model, gradient_checkpointing=gradient_checkpointing)
    return model


def lora_targets(model: Any, vision: VisionConfig) -> str:
    """The regex of the linear layers LoRA goes on: the language model's (never its lm_head), and the vision tower's
    too with vision.train_vision_tower. The projector is trained in full instead (`saved_modules`)."""
    parts = vision_parts(model)
    excluded = [p for p in (parts.projector, None if vision.train_vision_tower else parts.tower) if p]
    linear = _linear_names(model)
    keep = sorted(n for n in linear if not any(_under(n, part) for part in excluded) and not n.endswith("lm_head"))
    if not keep:
        raise ModelLoadError("model.name: no linear layer of the language model found for LoRA")
    return "^(" + "|".join(re.escape(n) for n in keep) + ")$"


def saved_modules(model: Any, vision: VisionConfig) -> list[str]:
    """Modules trained in full and saved with the adapter: the projector with vision.train_projector."""
    parts = vision_parts(model)
    if not vision.train_projector:
        return []
    if parts.projector is None:
        raise ModelLoadError("vision.train_projector: this model has no projector module by a known name")
    return [parts.projector.rsplit(".", 1)[-1]]


def describe_parts(model: Any) -> dict[str, int]:
    """Parameters per part: what `plan` and the run log show."""
    parts = vision_parts(model)
    counts = {"vision_tower": 0, "projector": 0, "language_model": 0}
    for name, p in model.named_parameters():
        key = (
            "projector"
            if parts.projector and _under(name, parts.projector)
            else "vision_tower"
            if parts.tower and _under(name, parts.tower)
            else "language_model"
        )
        counts[key] += p.numel()
    return counts


def _linear_names(model: Any) -> list[str]:
    import torch

    return [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _under(name: str, part: str) -> bool:
    return name == part or name.startswith(part + ".")


def _first(names: list[str], candidates: tuple[str, ...]) -> str | None:
    """The shortest module name whose last component is one of `candidates`, in their order of preference."""
    for candidate in candidates:
        hits = [n for n in names if n.rsplit(".", 1)[-1] == candidate]
        if hits:
            return min(hits, key=len)
    return None
