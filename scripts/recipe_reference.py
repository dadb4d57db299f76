"""Print the recipe reference table (Markdown) from the typed config's field descriptions.

docs/recipes.md embeds this output between markers; tests/unit/test_readme.py checks that it is up to date.
Run `python scripts/recipe_reference.py --write` to refresh docs/recipes.md.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from lora_tune.recipe.schema import Recipe

START, END = "<!-- recipe-reference:start -->", "<!-- recipe-reference:end -->"
TARGET = Path(__file__).resolve().parent.parent / "docs" / "recipes.md"  # the page that holds the table


def _type_name(annotation: typing.Any) -> str:
    """`Literal['a', 'b'] | None` reads as `a, b or null`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " / ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: typing.Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else repr(value).replace("'", "")


def reference() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    expanded: dict[type[BaseModel], str] = {}
    for name, field in Recipe.model_fields.items():
        section = _section(field.annotation)
        if section is None:
            rows.append(_row(name, field))
            continue
        if section in expanded:
            rows.append(f"| `{name}` | list | `[]` | {field.description} Same keys as `{expanded[section]}`. |")
            continue
        expanded[section] = f"{name}[]"
        prefix = f"{name}[]." if typing.get_origin(field.annotation) is list else f"{name}."
        for sub_name, sub_field in section.model_fields.items():
            rows.append(_row(prefix + sub_name, sub_field))
    return "\n".join(rows)


def _section(annotation: typing.Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _row(key: str, field: typing.Any) -> str:
    kind = _type_name(field.annotation)
    return f"| `{key}` | {kind} | `{_default(field)}` | {field.description or ''} |"


def embed(page: str) -> str:
    """`page` (the text of TARGET) with the table between the markers regenerated."""
    head, _, rest = page.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{reference()}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="refresh the table in docs/recipes.md")
    args = parser.parse_args()
    if args.write:
        TARGET.write_text(embed(TARGET.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
