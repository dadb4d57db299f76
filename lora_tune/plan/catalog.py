"""The recipe catalog: the recipes under `recipes/`, listed and shown by `lora-tune recipes`.

One source of truth: a catalog entry is a recipe file and nothing else. Its name is its path under the catalog
folder without `.yaml` (`qwen/qwen3-8b-qlora-chat`), its description is the first line of its leading comment
block, and the base model, method and data are read from the recipe itself. Folders that hold no recipes
(`base/` parts that recipes `extends:`, `data/`, `configs/` with the models' config.json, `accelerate/` launcher
configs) are skipped. This module imports no torch: listing the catalog is as cheap as `lora-tune validate`.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lora_tune.plan.catalog_location import CATALOG_ENV, CatalogError, catalog_dir  # noqa: F401 - re-exported
from lora_tune.plan.memory import planned_peak_memory as plan
from lora_tune.recipe.load import load_recipe

if TYPE_CHECKING:
    from lora_tune.recipe.schema import Recipe

NOT_RECIPES = frozenset({"base", "data", "configs", "accelerate"})


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    path: Path
    description: str
    recipe: Recipe

    @property
    def model(self) -> str:
        return self.recipe.model.name

    @property
    def method(self) -> str:
        return method_of(self.recipe)

    @property
    def dataset(self) -> str:
        return ", ".join(d.path + (f" [{d.split}]" if d.split != "train" else "") for d in self.recipe.datasets)


def recipe_files(root: Path) -> list[Path]:
    """Every recipe YAML under `root`, skipping the folders that hold parts, data or configs."""
    return sorted(path for path in root.rglob("*.yaml") if not NOT_RECIPES & set(path.relative_to(root).parts[:-1]))


def list_catalog(root: Path) -> list[CatalogEntry]:
    """Every catalog recipe, loaded and validated (data paths are not checked: they are relative to the run)."""
    return [_entry(root, path) for path in recipe_files(root)]


def _entry(root: Path, path: Path) -> CatalogEntry:
    name = path.relative_to(root).with_suffix("").as_posix()
    return CatalogEntry(name, path, description_of(path), load_recipe(path, check_paths=False))


def description_of(path: Path) -> str:
    """The first line of the recipe's leading comment block, or '' when it has none."""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            return ""
        text = stripped.lstrip("#").strip()
        if text:
            return text
    return ""


def find_entry(root: Path, name: str) -> CatalogEntry:
    """The recipe called `name`: its catalog name (`qwen/qwen3-8b-qlora-chat`) or a unique file stem."""
    files = recipe_files(root)
    names = {path.relative_to(root).with_suffix("").as_posix(): path for path in files}
    wanted = name.removesuffix(".yaml")
    if wanted in names:
        return _entry(root, names[wanted])
    by_stem = [full for full in names if full.rsplit("/", 1)[-1] == wanted]
    if len(by_stem) == 1:
        return _entry(root, names[by_stem[0]])
    if by_stem:
        raise CatalogError(f"recipe '{name}' is ambiguous: {', '.join(by_stem)}")
    close = difflib.get_close_matches(wanted, [*names, *(n.rsplit("/", 1)[-1] for n in names)], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `lora-tune recipes` lists them"
    raise CatalogError(f"no recipe '{name}' in {root}{hint}")


def method_of(recipe: Recipe) -> str:
    """A short method name derived from the recipe: qlora for LoRA on a 4-bit base, else the adapter method with
    its base's precision when quantized (e.g. `lora (8-bit base)`)."""
    method = recipe.adapter.method
    bits = recipe.quantization.bits
    if getattr(recipe.adapter, "use_dora", False):
        method = "dora"
    if bits == 4 and method in ("lora", "dora"):
        return "q" + method
    return f"{method} ({bits}-bit base)" if bits else method


def planned_peak_memory(recipe: Recipe) -> str | None:
    """The planned peak GPU memory of `recipe` as text (e.g. '17.3 GiB', from `lora-tune plan` on a 24 GiB GPU), or
    None when the model's config.json is not at hand offline (shipped ones live under recipes/configs/)."""
    return plan(recipe)


def shipped_config(model: str, root: Path) -> dict | None:
    """The config.json shipped for hub model `model` under `root`/configs (None when the catalog has none)."""
    path = root / "configs" / f"{model}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def format_table(entries: list[CatalogEntry]) -> str:
    """The catalog as an aligned text table, one recipe a row."""
    header = ("recipe", "base model", "method", "dataset", "peak memory", "description")
    rows = [
        (e.name, e.model, e.method, e.dataset, planned_peak_memory(e.recipe) or "-", e.description) for e in entries
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    return "\n".join(line.rstrip() for line in lines)


def format_entry(entry: CatalogEntry) -> str:
    """One recipe: its facts, then the file as written (comments citing its sources included)."""
    facts = [
        f"recipe:      {entry.name}  ({entry.path})",
        f"base model:  {entry.model}",
        f"method:      {entry.method}",
        f"dataset:     {entry.dataset}",
        f"peak memory: {planned_peak_memory(entry.recipe) or '- (no config.json offline)'}",
        f"output:      {entry.recipe.output_dir}",
        f"resolved:    lora-tune validate {entry.path} --print",
        f"start from it: a file with `extends: {entry.path}` and your own datasets and output_dir",
        "",
        entry.path.read_text(encoding="utf-8").rstrip(),
    ]
    return "\n".join(facts)
