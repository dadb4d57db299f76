"""Load the tokenizer and the base model the recipe names, quantized when it asks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from lora_tune.model.attention import NAME, resolve_attention
from lora_tune.model.chat_template import apply_chat_template_choice, ensure_pad_token
from lora_tune.model.kbit import prepare_for_kbit_training
from lora_tune.model.packed_4bit import allow_packing, inference_note
from lora_tune.model.safety import check_weights_format, warn_remote_code
from lora_tune.model.tiling import apply_tiled_mlp, describe, resolve_tiled_mlp
from lora_tune.recipe.schema import Dtype, ModelConfig, QuantizationConfig, TrainingConfig
from lora_tune.recipe.strategy import SHARDED

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

from typing import TYPE_CHECKING, Any

from lora_tune.errors import ModelLoadError
from lora_tune.recipe.schema import Recipe

log = logging.getLogger(__name__)


def resolve_dtype(name: Dtype) -> torch.dtype:
    """`auto` means bfloat16 on a GPU that supports it, float16 on other GPUs and float32 on the CPU."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(model_cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer, with the recipe's chat template (when given) and a pad token."""
    from transformers import AutoTokenizer

    source = model_cfg.tokenizer or model_cfg.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_load_failure("tokenizer", source, exc)) from exc

    apply_chat_template_choice(tokenizer, model_cfg.chat_template, source)
    ensure_pad_token(tokenizer)
    return tokenizer


def build_bnb_config(
    quant: QuantizationConfig, model_dtype: torch.dtype, *, sharded: bool = False
) -> BitsAndBytesConfig | None:
    """The only place that spells bitsandbytes' options. `sharded` (FSDP, ZeRO-3): the packed 4-bit weights are
    stored in the compute dtype, a float dtype FSDP and DeepSpeed can shard like every other weight."""
    from transformers import BitsAndBytesConfig

    if quant.bits is None:
        return None
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = model_dtype if quant.compute_dtype == "auto" else resolve_dtype(quant.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        **({"bnb_4bit_quant_storage": compute} if sharded else {}),
    )


def device_map(strategy: str = "ddp") -> dict[str, int] | str | None:
    """Each process loads its own copy onto its own GPU (DDP-ready); the CPU when there is none. Sharded strategies
    get none: FSDP / DeepSpeed place the shards themselves."""
    import torch

    if strategy in SHARDED:
        return None
    if not torch.cuda.is_available():
        return "cpu"
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def load_model(
    model_cfg: ModelConfig,
    quant: QuantizationConfig,
    training: TrainingConfig,
    strategy: str = "ddp",
    *,
    inference: bool = False,
) -> PreTrainedModel:
    """The base model, quantized per the recipe and prepared for k-bit training when quantized.

    4-bit layers keep bitsandbytes' standard layout unless `inference` (see lora_tune.model.packed_4bit): a model that
    trains or whose float32 function is compared must never be repacked by an eval forward on an AVX512-BF16 CPU.
    """
    from transformers import AutoModelForCausalLM

    check_weights_format(model_cfg.name, "model", model_cfg.allow_pickle)
    warn_remote_code(model_cfg.name, model_cfg.trust_remote_code)
    dtype = resolve_dtype(model_cfg.dtype)
    sharded = strategy in SHARDED
    bnb_config = build_bnb_config(quant, dtype, sharded=sharded)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_cfg.name,
            revision=model_cfg.revision,
            dtype=dtype,
            quantization_config=bnb_config,
            attn_implementation=_loading_attention(resolve_attention(model_cfg.attn_implementation, dtype).value),
            trust_remote_code=model_cfg.trust_remote_code,
            device_map=device_map(strategy),
            use_safetensors=None if model_cfg.allow_pickle else True,
        )
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(_load_failure("model", model_cfg.name, exc)) from exc
    settle_4bit_packing(model, inference)
    # Sharded strategies skip the preparation: FSDP needs every weight of a wrapped layer in one dtype (the 4-bit
    # storage dtype); Trainer still enables checkpointing and input grads. The preparation keeps frozen bfloat16
    # weights in bfloat16 (lora_tune.model.kbit), where peft's would cast them to float32.
    if bnb_config is not None and not sharded:
        model = prepare_for_kbit_training(model, gradient_checkpointing=training.gradient_checkpointing)
    if not inference:
        tile_mlp(model, training)
    return model


def tile_mlp(model: PreTrainedModel, training: TrainingConfig) -> None:
    """Tile the decoder MLPs over the sequence when training.tiled_mlp resolves on (lora_tune.model.tiling); the
    tiled forward is the original one whenever gradients are off."""
    choice = resolve_tiled_mlp(training, getattr(model.config, "model_type", None))
    if choice.value == "on":
        apply_tiled_mlp(model)
    log.info("memory: %s", describe(model, choice))


def settle_4bit_packing(model: PreTrainedModel, inference: bool) -> None:
    """Forbid bitsandbytes' packed CPU layout for training; allow it for inference and say so in the log."""
    allow_packing(model, inference)
    note = inference_note(model) if inference else None
    if note:
        log.info(note)


def _loading_attention(name: str) -> str:
    """sdpa_varlen is switched on after loading (speed.use_varlen_attention), where the model's config is known."""
    return "sdpa" if name == NAME else name


def _load_failure(what: str, source: str, exc: BaseException) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not Path(source).exists() and source.startswith((".", "/", "~", "runs/")):
        return f"model.name: {what} folder '{source}' not found"
    return f"model.name: cannot load the {what} '{source}': {first_line}"


def load_classifier(recipe: Recipe, tokenizer: Any, *, inference: bool = False) -> Any:
    """The base with a fresh classification head, quantized as the recipe says (4-bit packing: see load_model)."""
    from transformers import AutoModelForSequenceClassification

    labels = list(recipe.task.labels)
    dtype = resolve_dtype(recipe.model.dtype)
    bnb_config = build_bnb_config(recipe.quantization, dtype)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            recipe.model.name,
            revision=recipe.model.revision,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
            dtype=dtype,
            quantization_config=bnb_config,
            trust_remote_code=recipe.model.trust_remote_code,
            device_map=device_map(),
            use_safetensors=True,
        )
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"model.name: cannot load '{recipe.model.name}' for classification: {exc}") from exc
    settle_4bit_packing(model, inference)
    # The head reads the last non-padding token, which it finds through the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    if bnb_config is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.training.gradient_checkpointing
        )
    if not inference:
        tile_mlp(model, recipe.training)
    return model


def count_quantized_layers(model: Any) -> int:
    """bitsandbytes 4-bit and 8-bit linear layers in the model: evidence that the base really is quantized."""
    import bitsandbytes as bnb

    return sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
