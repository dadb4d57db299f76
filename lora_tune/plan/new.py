"""`lora-tune new`: write a complete, commented starting recipe for a model, a method and a data file.

The data format is detected from the file's first row. Batch size, gradient accumulation, max_length and gradient
checkpointing are sized to the GPU memory given by a deliberately simple rule (`size_training`), from the model's
architecture: a local folder's config.json, else the config.json the catalog ships under recipes/configs/, else a
size in the name ("7B", "360M") with the shape of the shipped model closest in size. This module imports no torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from lora_tune.data.formats import detect_format
from lora_tune.data.sources import load_rows
from lora_tune.plan.catalog import CatalogError, shipped_config
from lora_tune.recipe.schema import DatasetConfig

GIB = 2**30
USABLE_SHARE = 0.85  # of the card: the rest is headroom for the allocator's fragmentation and spikes
OVERHEAD_GIB = 1.5  # CUDA context, kernels' workspaces, the caching allocator's slack
NF4_BYTES = 4.127 / 8  # 4-bit NF4 plus double-quantized block constants (QLoRA paper, section 3)
EFFECTIVE_BATCH = 16  # examples per optimizer step: the QLoRA paper's batch size for 7B-13B models
MAX_LENGTHS = (2048, 1024, 512)
LORA_RANK = 16
MIN_VALIDATION_ROWS = 100  # below this many rows the data is too small to spare 5% for validation


@dataclass(frozen=True)
class Shape:
    """The architecture numbers that decide memory, read from a config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: dict) -> Shape:
        cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's numbers
        heads = cfg["num_attention_heads"]
        return cls(
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            layers=cfg["num_hidden_layers"],
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab=cfg["vocab_size"],
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )

    @property
    def linear_params(self) -> int:
        """Weights of the attention and MLP projections: what 4-bit quantization stores in NF4."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * (2 * h * q + 2 * h * kv + 3 * h * self.intermediate)

    @property
    def other_params(self) -> int:
        """Embeddings, LM head and norms: kept in 16 bits even on a 4-bit base."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def lora_params(self, r: int = LORA_RANK) -> int:
        """LoRA factors on every linear layer: r * (in + out) for each projection."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return self.layers * r * ((h + q) * 2 + (h + kv) * 2 + (h + i) * 3)


@dataclass(frozen=True)
class Sizing:
    batch_size: int
    gradient_accumulation_steps: int
    max_length: int
    gradient_checkpointing: bool
    notes: list[str] = field(default_factory=list)


def parse_memory(text: str) -> float:
    """GPU memory in GiB from '24GiB', '24GB', '24G', '24', '81920MiB'. Cards sold as 'GB' hold that many GiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise CatalogError(f"--gpu-memory: expected a size such as 24GiB or 16GB, got '{text}'")
    value, unit = float(match.group(1)), match.group(2) or "gib"
    return value / 1024 if unit.startswith("m") else value


def params_from_name(name: str) -> int | None:
    """A parameter count written in a model name ('Qwen2.5-7B-Instruct' -> 7e9, 'SmolLM2-360M' -> 3.6e8)."""
    found = re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)([bBmM])(?![a-zA-Z])", name.rsplit("/", 1)[-1])
    if not found:
        return None
    number, unit = found[-1]
    return int(float(number) * (1e9 if unit in "bB" else 1e6))


def model_shape(model: str, catalog: Path | None) -> tuple[Shape, str]:
    """The model's Shape and where it came from (shown in the recipe's comments)."""
    local = Path(model).expanduser() / "config.json"
    if local.is_file():
        return Shape.from_config(json.loads(local.read_text(encoding="utf-8"))), f"{local}"
    shipped = shipped_config(model, catalog) if catalog else None
    if shipped is not None:
        return Shape.from_config(shipped), f"recipes/configs/{model}.json"
    wanted = params_from_name(model)
    known = _shipped_shapes(catalog)
    if wanted is None or not known:
        raise CatalogError(
            f"--model: cannot tell the size of '{model}': give a local folder with a config.json, a model of the "
            "catalog (recipes/configs/), or a name that states its size such as 'Org/Model-7B'"
        )
    name, closest = min(known, key=lambda item: abs(item[1].params - wanted))
    # Same width and vocabulary, as many layers as make up the stated size.
    per_layer = closest.linear_params / closest.layers
    layers = max(1, round((wanted - closest.other_params) / per_layer))
    return replace(closest, layers=layers), f"the {wanted / 1e9:.3g}B in its name, with {name}'s layer shape"


def _shipped_shapes(catalog: Path | None) -> list[tuple[str, Shape]]:
    if catalog is None or not (catalog / "configs").is_dir():
        return []
    root = catalog / "configs"
    return [
        (path.relative_to(root).with_suffix("").as_posix(), Shape.from_config(json.loads(path.read_text())))
        for path in sorted(root.rglob("*.json"))
    ]


def size_training(shape: Shape, method: str, gpu_gib: float) -> Sizing:
    """Batch size, accumulation, max_length and gradient checkpointing that fit `gpu_gib` GiB. The rule:

    - fixed memory = weights (NF4 for the projections with `qlora`, else 16-bit; embeddings always 16-bit)
      + the LoRA factors with their gradients and AdamW state (16 bytes each) + 1.5 GiB of CUDA overhead;
    - activation bytes per token = with checkpointing, each layer's input kept for the backward (2·h·L) plus one
      layer being recomputed (2·(16·h + 4·I)); without, every layer's (L·2·(16·h + 4·I)); plus the logits in
      fp32 with their gradient (10·V);
    - the budget is 85% of the card minus the fixed memory; max_length is the longest of 2048/1024/512 that fits
      one row with checkpointing; checkpointing is turned off when 4 rows fit without it; the batch is the largest
      power of two up to 16 that fits, and accumulation brings each step to 16 examples.

    An estimate, on the safe side of what the catalog's recipes use; `lora-tune plan` gives the planner's figure.
    """
    weight_bytes = shape.other_params * 2 + shape.linear_params * (NF4_BYTES if method == "qlora" else 2)
    adapter_bytes = shape.lora_params() * 16
    fixed = weight_bytes + adapter_bytes + OVERHEAD_GIB * GIB
    budget = gpu_gib * GIB * USABLE_SHARE - fixed
    layer = 2 * (16 * shape.hidden + 4 * shape.intermediate)
    logits = 10 * shape.vocab
    with_checkpointing = 2 * shape.hidden * shape.layers + layer + logits
    without = shape.layers * layer + logits
    max_length = next((n for n in MAX_LENGTHS if n * with_checkpointing <= budget), None)
    if max_length is None:
        need = (fixed + MAX_LENGTHS[-1] * with_checkpointing) / USABLE_SHARE / GIB
        hint = "use --method qlora, or " if method == "lora" else ""
        raise CatalogError(
            f"--gpu-memory: {gpu_gib:g} GiB is too little for this model with {method} (about {need:.1f} GiB "
            f"needed for one {MAX_LENGTHS[-1]}-token row); {hint}give a larger --gpu-memory"
        )
    checkpointing = _rows_that_fit(budget, max_length * without) < 4
    per_row = max_length * (with_checkpointing if checkpointing else without)
    batch = _rows_that_fit(budget, per_row)
    precision = "NF4 projections, 16-bit embeddings" if method == "qlora" else "16-bit"
    notes = [
        f"weights ~{weight_bytes / GIB:.1f} GiB ({precision}),"
        f" LoRA r={LORA_RANK} with gradients and AdamW state ~{adapter_bytes / GIB:.2f} GiB, CUDA overhead "
        f"{OVERHEAD_GIB} GiB",
        f"activations ~{batch * per_row / GIB:.1f} GiB for {batch} x {max_length} tokens "
        f"({'with' if checkpointing else 'without'} gradient checkpointing), of a {budget / GIB:.1f} GiB budget "
        f"({USABLE_SHARE:.0%} of {gpu_gib:g} GiB minus the above)",
    ]
    return Sizing(batch, max(1, EFFECTIVE_BATCH // batch), max_length, checkpointing, notes)


def _rows_that_fit(budget: float, per_row: float) -> int:
    rows = 1
    while rows * 2 <= EFFECTIVE_BATCH and rows * 2 * per_row <= budget:
        rows *= 2
    return rows if per_row <= budget else 0


def detect_data(path: str) -> tuple[str, int]:
    """The format of a local .jsonl/.json file (from its first row) and its row count."""
    if not Path(path).expanduser().is_file():
        raise CatalogError(f"--data: '{path}' is not a file; expected a local .jsonl or .json file")
    rows = load_rows(DatasetConfig(path=path))
    if not rows:
        raise CatalogError(f"--data: '{path}' has no rows")
    return detect_format(rows[0], file=path), len(rows)


def new_recipe(model: str, method: str, data: str, gpu_memory: str = "24GiB", catalog: Path | None = None) -> str:
    """The text of a complete recipe for `model` trained with `method` (qlora or lora) on the file `data`."""
    gpu_gib = parse_memory(gpu_memory)
    fmt, rows = detect_data(data)
    shape, shape_source = model_shape(model, catalog)
    sizing = size_training(shape, method, gpu_gib)
    slug = re.sub(r"[^a-z0-9.]+", "-", Path(model.rstrip("/")).name.lower()).strip("-") or "model"
    return _render(model, method, data, fmt, rows, shape, shape_source, sizing, gpu_gib, f"runs/{slug}-{method}")


def _render(
    model: str,
    method: str,
    data: str,
    fmt: str,
    rows: int,
    shape: Shape,
    shape_source: str,
    sizing: Sizing,
    gpu_gib: float,
    output_dir: str,
) -> str:
    q = json.dumps  # a JSON string is a YAML string: names and paths come out quoted and escaped
    qlora = method == "qlora"
    lines = [
        f"# {'QLoRA' if qlora else 'LoRA'} fine-tuning of {model} on {data}, written by `lora-tune new`.",
        f"# Sized for a {gpu_gib:g} GiB GPU from {shape_source}: {shape.params / 1e9:.2f}B parameters, "
        f"{shape.layers} layers, hidden {shape.hidden}, vocabulary {shape.vocab}.",
        *(f"# Estimate: {note}." for note in sizing.notes),
        "# Check it: lora-tune validate THIS.yaml; preview the data: lora-tune data THIS.yaml; then lora-tune train.",
        "model:",
        f"  name: {q(model)}",
        "  # dtype: auto picks bfloat16 on GPUs that support it, float16 on older ones, float32 on the CPU.",
    ]
    if qlora:
        lines += ["quantization:", "  bits: 4                        # QLoRA: NF4 base with double quantization"]
    lines += [
        "adapter:                         # LoRA on every linear layer (QLoRA paper; alignment-handbook recipes)",
        f"  r: {LORA_RANK}",
        f"  alpha: {2 * LORA_RANK}",
        "  dropout: 0.05",
        "  target_modules: all-linear",
        "datasets:",
        f"  - path: {q(data)}",
        f"    format: {fmt}                # detected from the first of its {rows} row{'s' if rows != 1 else ''}",
    ]
    validation = rows >= MIN_VALIDATION_ROWS
    if validation:
        lines.append("val_size: 0.05                   # hold 5% of the rows out to watch the eval loss")
    else:
        lines.append(f"# No validation split: {rows} row(s) are too few to spare; add eval_datasets when you can.")
    lines += [
        "training:",
        "  learning_rate: 2.0e-4          # QLoRA paper, 7B-13B models; the catalog uses 1e-3 for SmolLM2-360M",
        "  num_epochs: 1                  # raise to 2-3 for a few thousand rows",
        f"  batch_size: {sizing.batch_size}",
        f"  gradient_accumulation_steps: {sizing.gradient_accumulation_steps}"
        f"   # {sizing.batch_size * sizing.gradient_accumulation_steps} examples per optimizer step",
        f"  max_length: {sizing.max_length}               # longer rows are truncated (lora-tune data shows how many)",
        f"  gradient_checkpointing: {'true' if sizing.gradient_checkpointing else 'false'}",
        "  lr_scheduler: cosine",
        "  warmup_steps: 0.03",
        "  max_grad_norm: 0.3             # QLoRA paper",
        f"  optimizer: {'paged_adamw_8bit' if qlora else 'adamw_torch'}",
        "  logging_steps: 10",
    ]
    if validation:
        lines += ["  eval_strategy: steps", "  eval_steps: 200"]
    lines += ["  save_steps: 200", f"output_dir: {q(output_dir)}"]
    return "\n".join(lines) + "\n"
