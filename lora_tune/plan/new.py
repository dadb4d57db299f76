"""`lora-tune new`: write a complete, commented starting recipe for a model, a method and a data file.

The data format is detected from the file's first row. Batch size, gradient accumulation, max_length and gradient
checkpointing are sized to the GPU memory given with the planner's memory model (`lora_tune.plan.memory.estimate`,
the one `lora-tune plan` reports), from the model's architecture: a local folder's config.json, else the config.json
the catalog ships under recipes/configs/, else a size in the name ("7B", "360M") with the shape of the shipped model
closest in size. This module imports no torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from lora_tune.data.formats import detect_format
from lora_tune.data.sources import load_rows
from lora_tune.errors import OptionError
from lora_tune.plan.catalog import CatalogError, shipped_config
from lora_tune.plan.memory import GIB, estimate
from lora_tune.plan.shape import ModelShape, shape_from_config
from lora_tune.recipe.rules import OBJECTIVES
from lora_tune.recipe.schema import DatasetConfig, Recipe
from lora_tune.training.trl_args import DEFAULT_BETA

EFFECTIVE_BATCH = 16  # examples per optimizer step: the QLoRA paper's batch size for 7B-13B models
MAX_LENGTHS = (2048, 1024, 512)
LORA_RANK = 16
MIN_VALIDATION_ROWS = 100  # below this many rows the data is too small to spare 5% for validation


class NewOptionError(OptionError, CatalogError):
    """An argument of `new_recipe` is refused; `option` names the parameter (model, data, gpu_memory)."""


@dataclass(frozen=True)
class Sizing:
    batch_size: int
    gradient_accumulation_steps: int
    max_length: int
    gradient_checkpointing: bool
    notes: list[str] = field(default_factory=list)
    levers: dict[str, bool] = field(default_factory=dict)  # training keys turned on because it fits only with them


# What `new` turns on when a row does not fit otherwise (lora_tune.plan.levers prices them): time for memory.
LEVERS = {"tiled_mlp": True, "activation_offloading": True}


def parse_memory(text: str) -> float:
    """GPU memory in GiB from '24GiB', '24GB', '24G', '24', '81920MiB'. Cards sold as 'GB' hold that many GiB."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gib|gb|g|mib|mb|m)?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise NewOptionError("gpu_memory", f"expected a size such as 24GiB or 16GB, got '{text}'")
    value, unit = float(match.group(1)), match.group(2) or "gib"
    return value / 1024 if unit.startswith("m") else value


def params_from_name(name: str) -> int | None:
    """A parameter count written in a model name ('Qwen2.5-7B-Instruct' -> 7e9, 'SmolLM2-360M' -> 3.6e8)."""
    found = re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)([bBmM])(?![a-zA-Z])", name.rsplit("/", 1)[-1])
    if not found:
        return None
    number, unit = found[-1]
    return int(float(number) * (1e9 if unit in "bB" else 1e6))


def model_shape(model: str, catalog: Path | None) -> tuple[ModelShape, str]:
    """The model's shape and where it came from (shown in the recipe's comments)."""
    local = Path(model).expanduser() / "config.json"
    if local.is_file():
        return shape_from_config(json.loads(local.read_text(encoding="utf-8"))), f"{local}"
    shipped = shipped_config(model, catalog) if catalog else None
    if shipped is not None:
        return shape_from_config(shipped), f"recipes/configs/{model}.json"
    wanted = params_from_name(model)
    known = _shipped_shapes(catalog)
    if wanted is None or not known:
        raise NewOptionError(
            "model",
            f"cannot tell the size of '{model}': give a local folder with a config.json, a model of the "
            "catalog (recipes/configs/), or a name that states its size such as 'Org/Model-7B'",
        )
    name, closest = min(known, key=lambda item: abs(item[1].parameter_count() - wanted))
    # Same width and vocabulary, as many layers as make up the stated size.
    per_layer = sum(m.weight_numel for m in closest.decoder_linears()) / closest.num_layers
    outside_layers = closest.parameter_count() - per_layer * closest.num_layers
    layers = max(1, round((wanted - outside_layers) / per_layer))
    return replace(closest, num_layers=layers), f"the {wanted / 1e9:.3g}B in its name, with {name}'s layer shape"


def _shipped_shapes(catalog: Path | None) -> list[tuple[str, ModelShape]]:
    if catalog is None or not (catalog / "configs").is_dir():
        return []
    root = catalog / "configs"
    return [
        (path.relative_to(root).with_suffix("").as_posix(), shape_from_config(json.loads(path.read_text())))
        for path in sorted(root.rglob("*.json"))
    ]


def size_training(shape: ModelShape, method: str, gpu_gib: float, objective: str = "sft") -> Sizing:
    """Batch size, accumulation, max_length and gradient checkpointing whose planned peak (the planner's estimate of
    the recipe `new` writes) fits `gpu_gib` GiB: the longest of 2048/1024/512 tokens that fits one row with
    checkpointing; checkpointing off when 4 rows fit without it; the batch the largest power of two up to 16 that
    fits, and accumulation bringing each step to 16 examples (pairs, for the preference objectives). A length that
    fits one row only with the long-context levers (tiled MLP, offloaded checkpoints) is taken with them, before a
    shorter one without: they cost time, truncation costs data."""
    budget = gpu_gib * GIB
    levers: dict[str, bool] = {}

    def peak(batch: int, max_length: int, checkpointing: bool) -> int:
        candidate = _candidate(method, batch, max_length, checkpointing, objective, levers)
        return sum(estimate(candidate, shape)[0].values())

    max_length = next((n for n in MAX_LENGTHS if peak(1, n, True) <= budget), None)
    if max_length is None or max_length < MAX_LENGTHS[0]:
        levers = dict(LEVERS)
        with_levers = next((n for n in MAX_LENGTHS if peak(1, n, True) <= budget), None)
        if with_levers is None or (max_length is not None and with_levers <= max_length):
            levers = {}
        else:
            max_length = with_levers
    if max_length is None:
        levers = dict(LEVERS)
        need = peak(1, MAX_LENGTHS[-1], True) / GIB
        hint = "use --method qlora, or " if method == "lora" else ""
        raise NewOptionError(
            "gpu_memory",
            f"{gpu_gib:g} GiB is too little for this model with {method} (about {need:.1f} GiB "
            f"needed for one {MAX_LENGTHS[-1]}-token row, even with a tiled MLP and offloaded checkpoints); "
            f"{hint}give a larger --gpu-memory",
        )
    checkpointing = bool(levers) or peak(4, max_length, False) > budget
    batch = 1
    while batch * 2 <= EFFECTIVE_BATCH and peak(batch * 2, max_length, checkpointing) <= budget:
        batch *= 2
    parts = estimate(_candidate(method, batch, max_length, checkpointing, objective, levers), shape)[0]
    precision = "NF4 projections, 16-bit embeddings" if method == "qlora" else "16-bit"
    trained = parts["adapter"] + parts["gradients"] + parts["optimizer"]
    notes = [
        f"planned peak ~{sum(parts.values()) / GIB:.1f} of {gpu_gib:g} GiB (lora-tune plan shows the breakdown): "
        f"weights ~{parts['weights'] / GIB:.1f} GiB ({precision}), LoRA r={LORA_RANK} with gradients and "
        f"optimizer state ~{trained / GIB:.2f} GiB",
        f"activations ~{(parts['activations'] + parts['backward working set']) / GIB:.1f} GiB for {batch} x "
        f"{max_length} tokens ({'with' if checkpointing else 'without'} gradient checkpointing)",
    ]
    if levers:
        notes.append(
            f"{max_length} tokens fit only with a tiled MLP and offloaded checkpoints (about a quarter more step "
            "time; lora-tune plan prices each lever)"
        )
    return Sizing(batch, max(1, EFFECTIVE_BATCH // batch), max_length, checkpointing, notes, levers)


def _candidate(
    method: str,
    batch: int,
    max_length: int,
    checkpointing: bool,
    objective: str = "sft",
    levers: dict[str, bool] | None = None,
) -> Recipe:
    """The memory-relevant part of the recipe `_render` writes, as the planner reads it."""
    return Recipe.model_validate(
        {
            "model": {"name": "candidate"},
            **({"quantization": {"bits": 4}} if method == "qlora" else {}),
            "adapter": {"r": LORA_RANK, "alpha": 2 * LORA_RANK, "dropout": 0.05, "target_modules": "all-linear"},
            "datasets": [{"path": "candidate.jsonl"}],
            "training": {
                "batch_size": batch,
                "gradient_accumulation_steps": max(1, EFFECTIVE_BATCH // batch),
                "max_length": max_length,
                "gradient_checkpointing": checkpointing,
                "optimizer": _optimizer(method),
                "objective": objective,
                **(levers or {}),
            },
            "output_dir": "runs/candidate",
        }
    )


def _optimizer(method: str) -> str:
    return "paged_adamw_8bit" if method == "qlora" else "adamw_torch"


def detect_data(path: str, objective: str = "sft") -> tuple[str, int]:
    """The format of a local .jsonl/.json file (from its first row) and its row count; a preference objective's
    rows must carry its columns (prompt/chosen/rejected, or prompt/completion/label for kto)."""
    if not Path(path).expanduser().is_file():
        raise NewOptionError("data", f"'{path}' is not a file; expected a local .jsonl or .json file")
    rows = load_rows(DatasetConfig(path=path))
    if not rows:
        raise NewOptionError("data", f"'{path}' has no rows")
    if objective == "sft":
        return detect_format(rows[0], file=path), len(rows)
    if OBJECTIVES[objective].task == "rl":
        if "prompt" not in rows[0]:  # else a chat format, whose last answer is the reference
            detect_format(rows[0], file=path)
        return "auto", len(rows)
    wanted = OBJECTIVES[objective].answers
    if not all(column in rows[0] for column in wanted):
        raise NewOptionError(
            "data", f"'{path}': {objective} reads rows with {' and '.join(wanted)}; the first row has none"
        )
    return "auto", len(rows)


def new_recipe(
    model: str,
    method: str,
    data: str,
    gpu_memory: str = "24GiB",
    catalog: Path | None = None,
    objective: str = "sft",
) -> str:
    """The text of a complete recipe for `model` trained with `method` (qlora or lora) and `objective` (sft, a
    preference objective or an online RL one) on the file `data`."""
    gpu_gib = parse_memory(gpu_memory)
    fmt, rows = detect_data(data, objective)
    shape, shape_source = model_shape(model, catalog)
    sizing = size_training(shape, method, gpu_gib, objective)
    slug = re.sub(r"[^a-z0-9.]+", "-", Path(model.rstrip("/")).name.lower()).strip("-") or "model"
    suffix = method if objective == "sft" else f"{method}-{objective}"
    text = _render(model, method, data, fmt, rows, shape, shape_source, sizing, gpu_gib, f"runs/{slug}-{suffix}")
    if OBJECTIVES[objective].task == "rl":
        return _with_rl(text, objective)
    return text if objective == "sft" else _with_objective(text, objective)


def _with_objective(text: str, objective: str) -> str:
    """The SFT recipe turned into a preference stage: the objective, its learning rate, its `preference:` section,
    and where to continue an SFT run from."""
    lines = []
    for line in text.splitlines():
        if line.startswith("  learning_rate:"):
            line = "  learning_rate: 5.0e-5         # a preference stage takes far smaller steps than SFT"
        if line == "datasets:":
            lines.append("# adapter: {init_from: runs/YOUR-SFT-RUN}   # continue an SFT run's adapter (lineage kept)")
        if line.startswith("output_dir:"):
            lines += ["preference:", f"  beta: {DEFAULT_BETA[objective]}"]
        lines.append(line)
        if line == "training:":
            lines.append(f"  objective: {objective}              # docs/preference.md")
    return "\n".join(lines) + "\n"


RL_GENERATIONS = 4  # completions per prompt in a written recipe: TRL's examples use 8-16 on large GPUs


def _with_rl(text: str, objective: str) -> str:
    """The SFT recipe turned into an online RL stage (grpo, rloo): the objective, a small learning rate, batches that
    hold whole groups of completions, and an `rl:` section with the answer reward."""
    lines = []
    for line in text.splitlines():
        if line.startswith("  learning_rate:"):
            line = "  learning_rate: 1.0e-5         # RL takes far smaller steps than SFT"
        if line.startswith("  gradient_accumulation_steps:"):
            line = f"  gradient_accumulation_steps: {RL_GENERATIONS}   # batch_size counts completions: whole groups"
        if line == "datasets:":
            lines.append(
                "# adapter: {init_from: runs/YOUR-SFT-RUN}   # start from an SFT run's adapter (lineage kept)"
            )
        if line.startswith("output_dir:"):
            lines += [
                "rl:                               # docs/rl.md",
                f"  num_generations: {RL_GENERATIONS}             # completions sampled per prompt",
                "  max_completion_length: 256",
                "  rewards:",
                "    - name: answer                # 1 when the final answer equals the row's reference answer",
            ]
        lines.append(line)
        if line == "training:":
            lines.append(f"  objective: {objective}             # docs/rl.md")
        if line.startswith("  eval_strategy:"):
            lines.append(f"  eval_batch_size: {RL_GENERATIONS}            # evaluation samples whole groups too")
    return "\n".join(lines) + "\n"


def _render(
    model: str,
    method: str,
    data: str,
    fmt: str,
    rows: int,
    shape: ModelShape,
    shape_source: str,
    sizing: Sizing,
    gpu_gib: float,
    output_dir: str,
) -> str:
    q = json.dumps  # a JSON string is a YAML string: names and paths come out quoted and escaped
    qlora = method == "qlora"
    lines = [
        f"# {'QLoRA' if qlora else 'LoRA'} fine-tuning of {model} on {data}, written by `lora-tune new`.",
        f"# Sized for a {gpu_gib:g} GiB GPU from {shape_source}: {shape.parameter_count() / 1e9:.2f}B parameters, "
        f"{shape.num_layers} layers, hidden {shape.hidden_size}, vocabulary {shape.vocab_size}.",
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
        f"  optimizer: {_optimizer(method)}",
        "  logging_steps: 10",
    ]
    if sizing.levers.get("tiled_mlp"):
        lines.append("  tiled_mlp: true                # MLP in sequence tiles: one more MLP forward per layer")
    if sizing.levers.get("activation_offloading"):
        lines.append("  activation_offloading: true    # checkpointed layer inputs wait in CPU RAM")
    if validation:
        lines += ["  eval_strategy: steps", "  eval_steps: 200"]
    lines += ["  save_steps: 200", f"output_dir: {q(output_dir)}"]
    return "\n".join(lines) + "\n"
