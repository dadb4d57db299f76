"""Read a recipe: YAML with line numbers, `extends:`, dotted command-line overrides, typed validation.

Every failure becomes a `RecipeError` that names the file, the line, the key path and what was expected, so the
CLI can print one line. This module imports no torch.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from lora_tune.config import FieldError, Recipe
from lora_tune.errors import RecipeError

KeyPath = tuple[str | int, ...]
COMMAND_LINE = "command line"

# Names other tools use, mapped to ours: an unknown key that matches one gets a precise hint.
FOREIGN_KEYS = {
    "load_in_4bit": "quantization.bits: 4",
    "load_in_8bit": "quantization.bits: 8",
    "bnb_4bit_quant_type": "quantization.quant_type",
    "bnb_4bit_use_double_quant": "quantization.double_quant",
    "bnb_4bit_compute_dtype": "quantization.compute_dtype",
    "lora_r": "adapter.r",
    "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout",
    "lora_target_modules": "adapter.target_modules",
    "base_model": "model.name",
    "model_name_or_path": "model.name",
    "torch_dtype": "model.dtype",
    "max_seq_length": "training.max_length",
    "sequence_len": "training.max_length",
    "cutoff_len": "training.max_length",
    "num_train_epochs": "training.num_epochs",
    "per_device_train_batch_size": "training.batch_size",
    "micro_batch_size": "training.batch_size",
    "warmup_ratio": "training.warmup_steps (a value below 1 is a fraction of all steps)",
    "lr_scheduler_type": "training.lr_scheduler",
    "optim": "training.optimizer",
    "dataset": "datasets (a list)",
    "val_set_size": "val_size",
}
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (`eval_strategy: no` stays the string 'no'), and `1e-4` is
    a float, as users expect; PyYAML's YAML 1.1 defaults read those as False and '1e-4'."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


@dataclass
class RawRecipe:
    """Merged YAML data plus, for each key path, the file and line that set it."""

    data: dict[str, Any]
    origins: dict[KeyPath, tuple[str, int | None]] = field(default_factory=dict)

    def origin(self, path: KeyPath) -> tuple[str, int | None]:
        """File and line of the deepest known prefix of `path`."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.origins:
                return self.origins[path[:end]]
        return COMMAND_LINE, None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, check_paths: bool = True) -> Recipe:
    """Parse, merge, override and validate a recipe file; raise `RecipeError` on any problem."""
    raw = read_with_extends(Path(path))
    for override in overrides:
        apply_override(raw, override)
    recipe = validate_raw(raw)
    if check_paths:
        check_local_paths(recipe, raw)
    return recipe


def read_with_extends(path: Path, seen: tuple[Path, ...] = ()) -> RawRecipe:
    """Read one YAML file; when it `extends:` another, read that first and merge this one over it."""
    raw = read_yaml(path)
    parent = raw.data.pop("extends", None)
    if parent is None:
        return raw
    file, line = raw.origins[("extends",)]
    if not isinstance(parent, str):
        raise RecipeError("expected the path of another recipe file", file=file, line=line, key="extends")
    parent_path = (path.parent / parent).resolve()
    if parent_path in seen or parent_path == path.resolve():
        raise RecipeError(f"'{parent}' extends itself in a cycle", file=file, line=line, key="extends")
    if not parent_path.is_file():
        raise RecipeError(
            f"file '{parent}' not found (relative to {path.parent})", file=file, line=line, key="extends"
        )
    base = read_with_extends(parent_path, (*seen, path.resolve()))
    del raw.origins[("extends",)]
    return merge(base, raw)


def read_yaml(path: Path) -> RawRecipe:
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError("recipe file not found", file=file) from None
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe: {exc.strerror}", file=file) from None
    try:
        node = yaml.compose(text, Loader=RecipeLoader)
        data = yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        column = f", column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"YAML syntax error{column}: {problem}", file=file, line=line) from None
    if data is None:
        raise RecipeError("the recipe is empty; expected a mapping with model, datasets and output_dir", file=file)
    if not isinstance(data, dict):
        raise RecipeError("expected a mapping of sections at the top level", file=file, line=1)
    origins: dict[KeyPath, tuple[str, int | None]] = {(): (file, 1)}
    _record_lines(node, (), file, origins)
    return RawRecipe(data, origins)


def _record_lines(node: yaml.Node, path: KeyPath, file: str, origins: dict) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = (*path, key_node.value)
            origins[child] = (file, key_node.start_mark.line + 1)
            _record_lines(value_node, child, file, origins)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            origins[(*path, index)] = (file, item.start_mark.line + 1)
            _record_lines(item, (*path, index), file, origins)


def merge(base: RawRecipe, child: RawRecipe) -> RawRecipe:
    """Child over base: mappings merge key by key; lists and scalars replace the base's value whole."""
    data = _deep_merge(base.data, child.data)
    origins = dict(base.origins)
    replaced = [p for p in child.origins if p and not isinstance(_get(child.data, p), dict)]
    for path in replaced:
        origins = {p: o for p, o in origins.items() if p[: len(path)] != path}
    origins.update({p: o for p, o in child.origins.items() if p})
    return RawRecipe(data, origins)


def _deep_merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _get(data: Any, path: KeyPath) -> Any:
    for part in path:
        data = data[part]
    return data


def apply_override(raw: RawRecipe, override: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (`1e-4`, `true`, `[q_proj, v_proj]`)."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(
            f"expected KEY=VALUE (e.g. training.learning_rate=1e-4), got '{override}'", file=COMMAND_LINE
        )
    try:
        value = yaml.load(text, Loader=RecipeLoader) if text.strip() else None  # noqa: S506 - a SafeLoader
    except yaml.YAMLError:
        value = text
    path: KeyPath = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    target: Any = raw.data
    for depth, part in enumerate(path[:-1]):
        if isinstance(target, list):
            target = _list_item(target, part, path[: depth + 1])
        else:
            target = target.setdefault(part, {})
        if not isinstance(target, (dict, list)):
            where = ".".join(map(str, path[: depth + 1]))
            raise RecipeError(f"'{where}' holds a value, not a section", file=COMMAND_LINE, key=key)
    last = path[-1]
    if isinstance(target, list):
        _list_item(target, last, path)
    target[last] = value
    raw.origins = {p: o for p, o in raw.origins.items() if p[: len(path)] != path}
    raw.origins[path] = (COMMAND_LINE, None)


def _list_item(items: list, index: str | int, path: KeyPath) -> Any:
    if not isinstance(index, int) or index >= len(items):
        key = ".".join(map(str, path))
        raise RecipeError(f"expected a list index below {len(items)}", file=COMMAND_LINE, key=key)
    return items[index]


def validate_raw(raw: RawRecipe) -> Recipe:
    try:
        return Recipe.model_validate(raw.data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise _to_recipe_error(errors[0], raw, extra=len(errors) - 1) from None


def _to_recipe_error(error: dict, raw: RawRecipe, extra: int) -> RecipeError:
    loc: KeyPath = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
    kind = error["type"]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, FieldError):
        loc = (*loc, *(int(p) if p.isdigit() else p for p in cause.key.split(".")))
        message = str(cause)
    elif kind == "extra_forbidden":
        message = _unknown_key_message(loc)
    elif kind == "missing":
        message = "required key is missing" + _expected_hint(loc)
    else:
        message = _describe(error)
    if extra:
        message += f" (and {extra} more problem{'s' if extra > 1 else ''}; fix this one first)"
    file, line = raw.origin(loc)
    return RecipeError(message, file=file, line=line, key=".".join(map(str, loc)) or None)


def _describe(error: dict) -> str:
    msg = error["msg"]
    if msg.startswith("Value error, "):
        return msg.removeprefix("Value error, ")
    expected = msg.replace("Input should be", "expected").replace("Input ", "value ")
    return f"{expected}; got {error.get('input')!r}"


def _unknown_key_message(loc: KeyPath) -> str:
    key = str(loc[-1])
    if key in FOREIGN_KEYS:
        return f"unknown key '{key}'; lora-tune spells this {FOREIGN_KEYS[key]}"
    allowed = sorted(_fields_at(loc[:-1]))
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"expected one of: {', '.join(allowed)}"
    return f"unknown key '{key}'; {hint}"


def _expected_hint(loc: KeyPath) -> str:
    fields = _model_at(loc[:-1])
    info = fields.model_fields.get(str(loc[-1])) if fields else None
    return f" ({info.description})" if info is not None and info.description else ""


def _fields_at(loc: KeyPath) -> list[str]:
    model = _model_at(loc)
    return list(model.model_fields) if model else []


def _model_at(loc: KeyPath) -> type[BaseModel] | None:
    """The recipe section class found at a key path (list indices step into the item type)."""
    current: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        current = _section_type(current.model_fields[part].annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _section_type(annotation: Any) -> Any:
    """Unwrap `list[X]`, `X | None` to the section class X, if there is one."""
    for arg in typing.get_args(annotation) or ():
        inner = _section_type(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        return None
    return annotation


def check_local_paths(recipe: Recipe, raw: RawRecipe) -> None:
    """Dataset files that look local must exist: a typo is reported now, not after the model has loaded."""
    for section in ("datasets", "eval_datasets", "test_datasets"):
        for index, source in enumerate(getattr(recipe, section)):
            if source.path.endswith(LOCAL_DATA_SUFFIXES) and not Path(source.path).exists():
                file, line = raw.origin((section, index, "path"))
                key = f"{section}.{index}.path"
                raise RecipeError(
                    f"file '{source.path}' not found (paths are relative to {Path.cwd()})",
                    file=file,
                    line=line,
                    key=key,
                )


def dump_resolved(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML: every default spelled out, so the run can be repeated exactly."""
    header = "# Resolved by lora-tune: defaults filled in, extends and overrides applied.\n"
    return header + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
