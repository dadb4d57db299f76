"""Model cards (README.md with hub YAML front matter) for a merged folder or a pushed adapter."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lora_tune.methods.runtime import lineage_chain
from lora_tune.run.secrets import redact

if TYPE_CHECKING:
    from lora_tune.export.result import MergeResult
    from lora_tune.recipe.schema import Recipe
    from lora_tune.run.layout import RunDir

SECRET_KEY = re.compile(r"token|secret|password|passwd|api[_-]?key|auth|credential", re.IGNORECASE)
HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")


def merged_card(run: RunDir, recipe: Recipe, base_dir: Path, result: MergeResult) -> str:
    """Card of a merged model: transformers library, loads with the Auto classes."""
    details = [
        f"- merge: {result.method}, {result.lora_modules} adapted weights, {result.replaced_tensors} "
        f"modules_to_save tensors, {result.shards} shard(s), dtype {result.dtype}",
    ]
    if result.untied:
        details.append(
            f"- untied from the input embeddings (the adapter changed one side): {', '.join(result.untied)}"
        )
    if result.max_abs_diff is not None:
        details.append(
            f"- verified: max |logit difference| vs base + adapter {result.max_abs_diff:.3g} "
            f"(tolerance {result.tolerance:.3g})"
        )
    if result.dequantized_vs_plain is not None:
        details.append(
            "- merged into the NF4-dequantized base (the function trained); max |logit difference| vs a merge into "
            f"the unquantized base {result.dequantized_vs_plain:.3g}"
        )
    usage = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("REPO_OR_FOLDER")
tokenizer = AutoTokenizer.from_pretrained("REPO_OR_FOLDER")
messages = [{"role": "user", "content": "Hello!"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))
```"""
    return build_card(run, recipe, base_dir, library="transformers", kind="merged", details=details, usage=usage)


def adapter_card(run: RunDir, recipe: Recipe) -> str:
    """Card of a pushed adapter: the peft library, loaded on top of the base."""
    usage = """```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("REPO_OR_FOLDER")
tokenizer = AutoTokenizer.from_pretrained("REPO_OR_FOLDER")
```"""
    base = Path(recipe.model.name)
    return build_card(run, recipe, base if base.is_dir() else None, library="peft", kind="adapter", usage=usage)


def build_card(
    run: RunDir,
    recipe: Recipe,
    base_dir: Path | None,
    *,
    library: str,
    kind: str,
    usage: str,
    details: list[str] | None = None,
) -> str:
    """The card's text. Every card goes through here, and its whole text through `redact`: recipe values,
    dataset and model names, the run's name and lineage may hold a token or a URL's password."""
    method = "qlora" if recipe.quantization.bits == 4 else "lora"
    tags = ["lora-tune", method, *(["dora"] if recipe.adapter.use_dora else []), kind, "text-generation"]
    meta: dict[str, Any] = {
        "base_model": recipe.model.name if not Path(recipe.model.name).is_dir() else Path(recipe.model.name).name,
        "library_name": library,
        "pipeline_tag": "text-generation",
        "tags": tags,
    }
    datasets = [d.path for d in (*recipe.datasets, *recipe.eval_datasets) if is_hub_dataset(d.path)]
    if datasets:
        meta["datasets"] = datasets
    license_ = base_license(base_dir) if base_dir is not None else None
    if license_:
        meta["license"] = license_
    summary = _read_json(run.summary)
    evaluation = _read_json(run.eval_json)
    adapter = recipe.adapter
    quant = recipe.quantization
    training = recipe.training
    title = f"{run.root.name} ({'merged' if kind == 'merged' else 'LoRA adapter'})"
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"Fine-tuned from `{recipe.model.name}` with lora-tune run `{run.root.name}`: "
        f"{'QLoRA (4-bit ' + quant.quant_type + ' base)' if quant.bits == 4 else 'LoRA'}"
        f"{' + DoRA' if adapter.use_dora else ''}{' + rsLoRA' if adapter.use_rslora else ''}, "
        f"{'merged into the base weights' if kind == 'merged' else 'shipped as a peft adapter'}.",
        "",
        "## Key hyper-parameters",
        "",
        "| | |",
        "|---|---|",
        f"| method | {adapter.method} |",
        f"| rank / alpha | {adapter.r} / {adapter.alpha:g} |",
        f"| target modules | {adapter.target_modules if isinstance(adapter.target_modules, str) else ', '.join(adapter.target_modules)} |",  # noqa: E501
        f"| modules_to_save | {', '.join(adapter.modules_to_save) or 'none'} |",
        f"| learning rate / scheduler | {training.learning_rate:g} / {training.lr_scheduler} |",
        f"| steps or epochs | {training.max_steps if training.max_steps else f'{training.num_epochs:g} epochs'} |",
        f"| batch size x accumulation | {training.batch_size} x {training.gradient_accumulation_steps} |",
        f"| max length | {training.max_length} |",
        f"| data | {', '.join(d.path if is_hub_dataset(d.path) else Path(d.path).name for d in recipe.datasets)} |",
        "",
    ]
    ancestry = lineage_lines(run)
    if ancestry:
        lines += ["## Lineage (sequential fine-tuning)", "", *[f"- {line}" for line in ancestry], ""]
    if details:
        lines += ["## Export", "", *details, ""]
    if summary:
        keys = ("steps", "train_loss", "eval_loss", "tokens_seen", "train_rows", "validation_rows", "wall_seconds",
                "trainable_parameters", "total_parameters", "trainable_percent")  # fmt: skip
        lines += ["## Training results", "", "| | |", "|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {_fmt(summary[k])} |" for k in keys if summary.get(k) is not None]
        lines.append("")
    if evaluation:
        lines += [
            "## Evaluation",
            "",
            f"On `{Path(str(evaluation.get('data', ''))).name}` ({evaluation.get('rows')} rows), exact match:",
            "",
        ]
        for who in ("tuned", "base"):
            score = evaluation.get(who)
            if score:
                lines.append(f"- {who}: {score['exact_match']:.1%} (normalized {score['normalized_exact_match']:.1%})")
        lines.append("")
    lines += [
        "## Usage",
        "",
        usage,
        "",
        "## Recipe (resolved)",
        "",
        "```yaml",
        recipe_yaml(recipe).rstrip(),
        "```",
        "",
    ]
    return redact("\n".join(lines))


def lineage_lines(run: RunDir) -> list[str]:
    """Earlier runs this one continues, oldest first (from lineage.json; empty for a first fine-tune)."""
    data = _read_json(run.lineage)
    if not data or not data.get("parents"):
        return []
    return [f"base: `{_first_base(data)}`", *lineage_chain(data), f"this run: `{run.root.name}`"]


def _first_base(data: dict[str, Any]) -> str:
    for parent in data.get("parents", []):
        inner = parent.get("lineage") or {}
        if inner:
            return _first_base(inner)
    return str(data.get("base_model"))


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(drop_secrets(recipe.model_dump(mode="json")), sort_keys=False, allow_unicode=True)


def drop_secrets(data: Any) -> Any:
    """Remove every key that looks like a credential and mask every value that does, at any depth. Values are masked
    before the YAML dump too, which may fold a long string over lines where a shape would no longer match."""
    if isinstance(data, dict):
        return {drop_secrets(k): drop_secrets(v) for k, v in data.items() if not SECRET_KEY.search(str(k))}
    if isinstance(data, list):
        return [drop_secrets(v) for v in data]
    if isinstance(data, str):
        return redact(data)
    return data


def is_hub_dataset(path: str) -> bool:
    return bool(HUB_NAME.match(path)) and not Path(path).exists() and not path.endswith((".json", ".jsonl"))


def base_license(base_dir: Path | None) -> str | None:
    """The `license:` of the base model's own card, when it has one."""
    card = base_dir / "README.md" if base_dir else None
    if card is None or not card.is_file():
        return None
    text = card.read_text(encoding="utf-8", errors="replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", text, re.DOTALL)
    if not match:
        return None
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)
