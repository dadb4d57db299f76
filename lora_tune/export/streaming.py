"""Streaming LoRA merge: the base's safetensors shards are read one at a time, updated, and written back out.

Peak memory is about one shard plus the adapter, whatever the model size. The arithmetic follows peft 0.21
(`peft/tuners/lora/layer.py` and `lora/dora.py`): for each adapted weight `W` (shape [out, in]),

    LoRA:  W' = W + s * B @ A                              s = alpha / r   (alpha / sqrt(r) with rsLoRA)
    DoRA:  W' = m / ||W + s * B @ A||_row * (W + s * B @ A)  the norm is taken over `in` for each output row
    Embedding LoRA (lora_embedding_A [r, vocab], lora_embedding_B [dim, r]): W' = W + s * (B @ A).T

computed in float32, then cast to the output dtype. Tensors in the adapter that are not LoRA factors are
`modules_to_save` copies: they replace the base tensor of the same name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_tune.export.errors import ExportError
from lora_tune.model.weights import ShardReader, read_json, safetensors_header

if TYPE_CHECKING:
    import torch

ADAPTER_PREFIX = "base_model.model."
_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.default)?(?P<param>\.weight|\.bias)?$"
)
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save(?:\.default)?(?=\.)")
# LoRA options this module merges itself; any other non-default option goes through peft's merge_and_unload().
_UNSUPPORTED_OPTIONS = (
    "layer_replication",
    "trainable_token_indices",
    "target_parameters",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "megatron_config",
)


@dataclass
class LoraUpdate:
    """Everything the adapter changes in one base weight."""

    module: str  # the module's name as peft saw it, e.g. model.layers.0.self_attn.q_proj
    scale: float
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # lora_B.bias (lora_bias=True): added to the base bias, scaled
    magnitude: torch.Tensor | None = None  # DoRA
    embedding: bool = False

    def delta(self, fan_in_fan_out: bool) -> torch.Tensor:
        A, B = self.A.float(), self.B.float()
        update = (B @ A).T if self.embedding else B @ A
        if fan_in_fan_out and not self.embedding:
            update = update.T
        return update * self.scale


@dataclass
class AdapterPlan:
    """The adapter, parsed: LoRA updates keyed by base tensor name once matched, and full replacements."""

    updates: dict[str, LoraUpdate]  # module name -> update
    replacements: dict[str, torch.Tensor]  # tensor name (as peft saved it) -> tensor
    fan_in_fan_out: bool = False
    dora: bool = False
    unsupported: list[str] = field(default_factory=list)  # reasons to use peft's merge instead


def read_adapter(adapter_dir: Path) -> AdapterPlan:
    """Parse `adapter_model.safetensors` and `adapter_config.json` of a LoRA adapter."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_json(adapter_dir / "adapter_config.json")
    weights_file = adapter_dir / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise ExportError(f"{adapter_dir}: no adapter_model.safetensors (only safetensors adapters are read)")
    safetensors_header(weights_file)  # an empty or cut-short file is named, before safetensors' own message
    try:
        tensors = load_file(weights_file)
    except SafetensorError as exc:  # what the header check does not see (an unknown dtype, ...)
        raise ExportError(f"{weights_file}: cannot be read as safetensors: {exc}") from None
    unsupported = [f"adapter option '{key}'" for key in _UNSUPPORTED_OPTIONS if config.get(key)]
    updates: dict[str, LoraUpdate] = {}
    replacements: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(ADAPTER_PREFIX)
        match = _FACTOR.match(name)
        if match is None:
            if ".original_module." in name:  # the base's copy, saved with resized embedding layers: not used
                continue
            # A resized embedding layer that LoRA also targets is saved as its `base_layer`: the resized base
            # weight, which the LoRA update is then applied to, like any other base weight.
            trained_copy = _MODULES_TO_SAVE.search(name) is not None
            base_name = _MODULES_TO_SAVE.sub("", name).replace(".base_layer.", ".")
            # A modules_to_save copy (the trained one) wins over a saved embedding layer of the same name.
            if base_name not in replacements or trained_copy:
                replacements[base_name] = tensor
            continue
        module, kind, param = match["module"], match["kind"], match["param"]
        update = updates.setdefault(module, LoraUpdate(module=module, scale=0.0))
        if kind in ("lora_A", "lora_embedding_A"):
            update.A = tensor
            update.embedding = kind == "lora_embedding_A"
        elif kind in ("lora_B", "lora_embedding_B"):
            if param == ".bias":
                update.bias = tensor
            else:
                update.B = tensor
        else:
            update.magnitude = tensor
    for update in updates.values():
        if update.A is None or update.B is None:
            raise ExportError(f"adapter: module '{update.module}' has only half of its LoRA pair (A and B)")
        if update.A.ndim != 2:
            unsupported.append(f"LoRA on a convolution ({update.module})")
        if update.magnitude is not None and (update.embedding or config.get("fan_in_fan_out")):
            unsupported.append(f"DoRA on {update.module}")
        update.scale = lora_scale(config, update.module, rank=update.A.shape[0])
    return AdapterPlan(
        updates=updates,
        replacements=replacements,
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        dora=any(u.magnitude is not None for u in updates.values()),
        unsupported=unsupported,
    )


def lora_scale(config: dict[str, Any], module: str, *, rank: int) -> float:
    """alpha / r (or alpha / sqrt(r) with rsLoRA), honouring `rank_pattern` and `alpha_pattern` as peft does."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config["lora_alpha"])
    if r != rank:
        raise ExportError(f"adapter: module '{module}' has rank {rank} but adapter_config.json implies {r}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def get_pattern_key(pattern_keys: Any, key_to_match: str) -> str:
    """peft.utils.other.get_pattern_key (0.21), copied so a merge does not import peft and transformers."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def estimate_bytes(base_dir: Path, layout: dict[str, list[str]], element_size: int) -> int:
    """Size of the merged weights: every floating tensor at the output dtype's element size (headers only)."""
    total = 0
    for shard, names in layout.items():
        reader = ShardReader(base_dir / shard)
        total += sum(math.prod(reader.shape(name)) * element_size for name in names)
    return total


Transform = Callable[[str, "torch.Tensor"], "torch.Tensor"]


def output_specs(
    reader: ShardReader,
    names: list[str],
    replacements: dict[str, torch.Tensor],
    dtype: torch.dtype,
    aliases: dict[str, str],
) -> dict[str, tuple[torch.dtype, list[int]]]:
    """Dtype and shape of every output tensor of a shard, known before any tensor is read."""
    specs = {}
    for name in names:
        if name in replacements:
            source_dtype, shape = replacements[name].dtype, list(replacements[name].shape)
        else:
            stored = aliases.get(name, name)
            source_dtype, shape = reader.dtype(stored), reader.shape(stored)
        specs[name] = (dtype if source_dtype.is_floating_point else source_dtype, shape)
    return specs


def merged_tensors(
    reader: ShardReader,
    names: list[str],
    plan: AdapterPlan,
    targets: dict[str, LoraUpdate],
    bias_targets: dict[str, LoraUpdate],
    replacements: dict[str, torch.Tensor],
    dtype: torch.dtype,
    prepare: Transform | None = None,
    aliases: dict[str, str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, merged tensor) for every tensor of one shard, cast to `dtype` (floating tensors only).

    `targets` maps base weight names to their LoRA update, `bias_targets` base bias names to the update whose
    lora_B.bias they receive; `prepare` (the NF4 round trip) is applied to a base weight before its update;
    `aliases` names the stored tensor a tied weight that is being untied starts from. One tensor is read at a time.
    """
    for name in names:
        stored = (aliases or {}).get(name, name)
        tensor = replacements[name] if name in replacements else reader.read(stored)
        if not tensor.is_floating_point():
            yield name, tensor
            continue
        if prepare is not None and name not in replacements:
            tensor = prepare(stored, tensor)
        update = targets.get(name)
        if update is not None:
            tensor = apply_update(tensor, update, plan.fan_in_fan_out)
        bias_update = bias_targets.get(name)
        if bias_update is not None:
            tensor = tensor.float() + bias_update.bias.float() * bias_update.scale
        yield name, tensor.to(dtype).contiguous()


def apply_update(weight: torch.Tensor, update: LoraUpdate, fan_in_fan_out: bool) -> torch.Tensor:
    """W + s*BA (float32), rescaled row by row to DoRA's magnitude when the adapter has one."""
    # float() copies unless the weight is already float32; then it is updated in place (the caller owns it).
    merged = weight.float()
    delta = update.delta(fan_in_fan_out)
    if delta.shape != merged.shape:
        raise ExportError(
            f"adapter: update of '{update.module}' has shape {tuple(delta.shape)}, base weight {tuple(weight.shape)}"
        )
    merged += delta
    del delta
    if update.magnitude is not None:
        # peft DoraLinearLayer.get_weight_norm: torch.linalg.norm(W + s*BA, dim=1), one norm per output row.
        import torch

        norm = torch.linalg.norm(merged, dim=1)
        merged = merged * (update.magnitude.float() / norm).view(-1, 1)
    return merged
