"""The recipe form, read from the recipe schema: one field per key, with its default and its help text.

Nothing here repeats the schema: the sections, keys, types, choices, defaults and descriptions are the pydantic
models' own (lora_tune.recipe.schema). A key whose type a plain widget cannot hold (a list of sources, a mapping,
a union of kinds) is edited as one line of YAML.
"""

from __future__ import annotations

import re
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from lora_tune.errors import RecipeError
from lora_tune.recipe.load import load_recipe
from lora_tune.recipe.schema import Recipe

Kind = Literal["bool", "int", "float", "choice", "text", "yaml"]
GENERAL = "general"  # the section of the top-level keys that are not sections (val_size, output_dir)


@dataclass(frozen=True)
class FormField:
    key: str  # dotted key path in the recipe: training.learning_rate
    kind: Kind
    default: Any  # the schema's default; None for a required key
    required: bool
    help: str
    choices: tuple[Any, ...] = ()


def _plain(annotation: Any) -> tuple[Any, bool]:
    """The annotation without Annotated[...] and without `| None`; and whether None was allowed."""
    optional = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(members) < len(typing.get_args(annotation))
            if len(members) == 1:
                annotation = members[0]
                continue
        return annotation, optional


def _kind(annotation: Any) -> tuple[Kind, tuple[Any, ...]]:
    plain, _ = _plain(annotation)
    if typing.get_origin(plain) is Literal:
        return "choice", typing.get_args(plain)
    if plain is bool:
        return "bool", ()
    if plain is int:
        return "int", ()
    if plain is float:
        return "float", ()
    if plain is str:
        return "text", ()
    return "yaml", ()


def _is_section(annotation: Any) -> type[BaseModel] | None:
    plain, _ = _plain(annotation)
    return plain if isinstance(plain, type) and issubclass(plain, BaseModel) else None


def _field(key: str, info: Any) -> FormField:
    kind, choices = _kind(info.annotation)
    required = info.is_required()
    default = None if required else info.get_default(call_default_factory=True)
    default = to_jsonable_python(default)  # a section's or a list's models as the YAML would spell them
    return FormField(key, kind, default, required, (info.description or "").strip(), choices)


def recipe_form() -> dict[str, list[FormField]]:
    """Section name -> its fields, in the schema's order; the top-level scalar keys under GENERAL."""
    form: dict[str, list[FormField]] = {}
    for name, info in Recipe.model_fields.items():
        section = _is_section(info.annotation)
        if section is None:
            form.setdefault(GENERAL, []).append(_field(name, info))
            continue
        form[name] = [_field(f"{name}.{key}", sub) for key, sub in section.model_fields.items()]
    return form


def all_fields() -> dict[str, FormField]:
    return {f.key: f for fields in recipe_form().values() for f in fields}


# ---- values in the recipe's YAML data, by dotted key -------------------------------------------------------------


def get_value(data: dict[str, Any], key: str) -> tuple[bool, Any]:
    """(present, value) of `key` in the recipe data."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def set_value(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


def remove_value(data: dict[str, Any], key: str) -> None:
    """Take `key` out (the schema's default applies again); an emptied section goes too."""
    *parents, last = key.split(".")
    chain = [data]
    for part in parents:
        child = chain[-1].get(part)
        if not isinstance(child, dict):
            return
        chain.append(child)
    chain[-1].pop(last, None)
    for part, parent in zip(reversed(parents), reversed(chain[:-1]), strict=True):
        if parent.get(part) == {}:
            parent.pop(part)


def to_widget(field: FormField, value: Any) -> Any:
    """A value of the recipe as its widget holds it (a `yaml` field: one line of YAML)."""
    if field.kind == "yaml":
        return "" if value is None else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return value


def from_widget(field: FormField, value: Any) -> Any:
    """A widget's value as the recipe holds it: numbers that are whole stay ints, YAML text is parsed (a YAML
    error raises yaml.YAMLError, which the page shows at the field)."""
    if field.kind == "yaml":
        return yaml.safe_load(value) if isinstance(value, str) and value.strip() else None
    if field.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if field.kind == "text" and value == "":
        return None
    return value


# ---- YAML text <-> data, and validation as `lora-tune validate` does it ------------------------------------------


def parse(text: str) -> dict[str, Any]:
    data = yaml.safe_load(text) if text.strip() else {}
    return data if isinstance(data, dict) else {}


def dump(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=119)


EXTENDS = re.compile(r"^(extends:\s*)(['\"]?)([^'\"#\n]+?)\2(\s*(#.*)?)$", re.MULTILINE)


def validate_text(text: str, source: Path | None, display: str) -> tuple[Recipe | None, RecipeError | None]:
    """Validate recipe text exactly as `lora-tune validate FILE` would the same text saved at `source` (an
    `extends:` resolves against its folder; data paths against the working directory, as on the command line).
    The error's line names `display`, not the scratch copy."""
    folder = (source.parent if source else Path.cwd()).resolve()

    def absolute(match: re.Match[str]) -> str:
        return f"{match[1]}{match[2]}{(folder / match[3]).as_posix()}{match[2]}{match[4]}"

    with tempfile.TemporaryDirectory(prefix="lora-tune-ui-") as scratch:
        path = Path(scratch) / "recipe.yaml"
        path.write_text(EXTENDS.sub(absolute, text), encoding="utf-8")
        try:
            return load_recipe(path), None
        except RecipeError as exc:
            if exc.file == str(path):
                exc.file = display
            return None, exc


def error_text(exc: RecipeError) -> str:
    return exc.render()
