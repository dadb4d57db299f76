"""A causal LM's shape from its config.json alone: its linear layers, parameter counts and LoRA's trainable count.

The memory planner (`lora_tune.plan.memory`) builds on this. Reading a config is JSON only: no torch, no weights. The
layer list follows the decoder layout transformers uses for Llama-style models (Llama, Mistral, Qwen2/3, Gemma...):
per layer q/k/v/o projections and a gated MLP (gate/up/down), RMSNorms, token embeddings and an LM head.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_tune.errors import LoraTuneError, OptionError
from lora_tune.plan.catalog_location import CatalogError, catalog_dir
from lora_tune.recipe.schema import AdapterConfig, ModelConfig

# Families whose decoder matches the layout below; others are estimated with the same layout, with a note.
KNOWN_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "granite"}
QKV_BIAS_TYPES = {"qwen2"}  # Qwen2 always has q/k/v biases; its config has no attention_bias key
QK_NORM_TYPES = {"qwen3", "gemma3_text", "olmo2"}  # per-head RMSNorm on queries and keys


class PlanError(LoraTuneError):
    """The planner cannot read the model's config (not local, not cached, offline) or does not know its layout."""


class PlanOptionError(OptionError, PlanError):
    """An argument of `plan` is refused; `option` names the parameter (config, gpu_memory)."""


@dataclass(frozen=True)
class Linear:
    name: str  # full module name, as peft matches target_modules against it
    in_features: int
    out_features: int
    bias: bool

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    max_position_embeddings: int | None

    @property
    def known_layout(self) -> bool:
        return self.model_type in KNOWN_TYPES

    def decoder_linears(self) -> list[Linear]:
        """Every nn.Linear of the decoder layers, named as transformers names them."""
        h, q, kv, i = (
            self.hidden_size,
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.intermediate_size,
        )
        out: list[Linear] = []
        for n in range(self.num_layers):
            attn, mlp = f"model.layers.{n}.self_attn", f"model.layers.{n}.mlp"
            out += [
                Linear(f"{attn}.q_proj", h, q, self.qkv_bias),
                Linear(f"{attn}.k_proj", h, kv, self.qkv_bias),
                Linear(f"{attn}.v_proj", h, kv, self.qkv_bias),
                Linear(f"{attn}.o_proj", q, h, self.o_bias),
                Linear(f"{mlp}.gate_proj", h, i, self.mlp_bias),
                Linear(f"{mlp}.up_proj", h, i, self.mlp_bias),
                Linear(f"{mlp}.down_proj", i, h, self.mlp_bias),
            ]
        return out

    @property
    def lm_head(self) -> Linear:
        return Linear("lm_head", self.hidden_size, self.vocab_size, False)

    @property
    def embedding_numel(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def norm_numel(self) -> int:
        per_layer = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return self.num_layers * per_layer + self.hidden_size

    def parameter_count(self) -> int:
        """All parameters, as `model.num_parameters()` counts them (a tied LM head counts once)."""
        linear = sum(m.weight_numel + (m.out_features if m.bias else 0) for m in self.decoder_linears())
        head = 0 if self.tied_embeddings else self.lm_head.weight_numel
        return linear + self.embedding_numel + head + self.norm_numel


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """The shape from a config.json dict (the text part of a multimodal config)."""
    cfg = config.get("text_config") or config
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return ModelShape(
            model_type=str(cfg.get("model_type", config.get("model_type", "unknown"))),
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            tied_embeddings=bool(
                cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", _tied_default(cfg)))
            ),
            qkv_bias=bool(cfg.get("attention_bias", False)) or cfg.get("model_type") in QKV_BIAS_TYPES,
            o_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=cfg.get("model_type") in QK_NORM_TYPES,
            max_position_embeddings=cfg.get("max_position_embeddings"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"config.json lacks a usable {exc} for a decoder-only language model") from exc


def _tied_default(cfg: dict[str, Any]) -> bool:
    """transformers' default when config.json omits tie_word_embeddings: tied for Gemma, untied for the others."""
    return str(cfg.get("model_type", "")).startswith("gemma")


def read_model_config(
    model: ModelConfig, override: str | Path | None = None, *, offline: bool = False
) -> tuple[dict[str, Any], str]:
    """config.json of the recipe's model and where it came from; never reads weights.

    In order: `override` (`plan`'s `config`, the name its refusal gives: a config.json file or a folder with one);
    model.name as a local folder; a config shipped with the recipe catalog (recipes/configs/ORG/MODEL.json); the hub
    cache; the hub itself (config.json only) unless HF_HUB_OFFLINE is set or `offline` is true.
    """
    if override is not None:
        path = Path(override)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise PlanOptionError("config", f"no config.json at '{override}'")
        return _read_json(path), str(path)
    local = Path(model.name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise PlanError(f"model.name: folder '{model.name}' has no config.json")
        return _read_json(local / "config.json"), str(local / "config.json")
    if model.name.startswith((".", "/", "~", "runs/")):
        raise PlanError(f"model.name: folder '{model.name}' not found (build it first, or pass --config PATH)")
    shipped = _catalog_config(model.name)
    if shipped is not None and model.revision is None:
        return _read_json(shipped), f"lora-tune's copy of {model.name}'s config.json ({shipped})"
    return _config_from_hub(model, offline=offline)


def _config_from_hub(model: ModelConfig, *, offline: bool) -> tuple[dict[str, Any], str]:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(model.name, "config.json", revision=model.revision)
    if isinstance(cached, str):
        return _read_json(Path(cached)), f"hub cache ({cached})"
    if offline or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise PlanError(f"model.name: no config.json for '{model.name}' offline; pass --config PATH")
    try:
        path = hf_hub_download(model.name, "config.json", revision=model.revision)
    except Exception as exc:  # noqa: BLE001 - any hub failure is one line to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(f"model.name: cannot fetch config.json of '{model.name}': {first}") from exc
    return _read_json(Path(path)), f"hub ({model.name})"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlanError(f"{path}: not a readable JSON config: {exc}") from exc
    if not isinstance(data, dict):
        raise PlanError(f"{path}: expected a JSON object")
    return data


def lora_targets(shape: ModelShape, adapter: AdapterConfig) -> list[Linear]:
    """The layers peft puts an adapter on, by peft's own matching rules.

    'all-linear' = every linear layer but the output layer; a string is a regex that must match the whole module
    name; a list matches a module when an entry equals its name or is its last dotted parts.
    """
    candidates = shape.decoder_linears()
    target = adapter.target_modules
    if target == "all-linear":
        return candidates
    candidates = [*candidates, shape.lm_head]
    if isinstance(target, str):
        return [m for m in candidates if re.fullmatch(target, m.name)]
    return [m for m in candidates if any(m.name == t or m.name.endswith("." + t) for t in target)]


def trainable_parameters(shape: ModelShape, adapter: AdapterConfig) -> list[tuple[str, int]]:
    """(name, numel) of every trainable tensor peft creates: LoRA A and B, DoRA magnitudes, biases, saved modules."""
    tensors: list[tuple[str, int]] = []
    targets = lora_targets(shape, adapter)
    for m in targets:
        tensors += [(f"{m.name}.lora_A", adapter.r * m.in_features), (f"{m.name}.lora_B", m.out_features * adapter.r)]
        if adapter.use_dora:
            tensors.append((f"{m.name}.lora_magnitude", m.out_features))
    biased = targets if adapter.bias == "lora_only" else shape.decoder_linears() if adapter.bias == "all" else []
    tensors += [(f"{m.name}.bias", m.out_features) for m in biased if m.bias]
    for name in adapter.modules_to_save:
        numel = {"lm_head": shape.lm_head.weight_numel, "embed_tokens": shape.embedding_numel}.get(name)
        if numel is None:
            raise PlanError(f"adapter.modules_to_save: the planner knows lm_head and embed_tokens, not '{name}'")
        tensors.append((f"{name} (trainable copy)", numel))
    return tensors


def _catalog_config(name: str) -> Path | None:
    """The config.json the recipe catalog ships for hub model `name` (recipes/configs/ORG/MODEL.json), if any."""
    try:
        path = catalog_dir() / "configs" / f"{name}.json"
    except CatalogError:
        return None
    return path if path.is_file() else None
