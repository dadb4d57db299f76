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

from lora_tune.errors import FieldError, RecipeError, shorten
from lora_tune.recipe.schema import Recipe

KeyPath = tuple[str | int, ...]
COMMAND_LINE = "command line"
# A recipe nests four levels (datasets > item > columns > value); the YAML composer recurses per level, so a
# 5,000-deep `[[[...]]]` must stop here rather than in a RecursionError.
MAX_DEPTH = 32
MAX_EXTENDS = 16  # files in one extends: chain
MAX_RECIPE_BYTES = 1 << 20  # PyYAML parses in pure Python: a 4 MB file took 17 s and 430 MB before any check

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


class RefusedYAML(yaml.YAMLError):
    """Valid YAML that a recipe may not contain: an alias, nesting past MAX_DEPTH, or a key given twice."""

    def __init__(self, kind: str, problem: str, mark: yaml.Mark, key: KeyPath, first: yaml.Mark | None = None):
        super().__init__(problem)
        self.kind, self.problem, self.mark, self.key, self.first = kind, problem, mark, key, first

    def message(self, file: str) -> str:
        if self.first is None:
            return self.problem
        if file == COMMAND_LINE:
            return f"{self.problem} in the value"
        if self.first.line == self.mark.line:
            columns = f"columns {self.first.column + 1} and {self.mark.column + 1}"
            return f"{self.problem}: line {self.mark.line + 1}, {columns}"
        return f"{self.problem}: lines {self.first.line + 1} and {self.mark.line + 1}"


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (`eval_strategy: no` stays the string 'no'), and `1e-4` is
    a float, as users expect; PyYAML's YAML 1.1 defaults read those as False and '1e-4'.

    Also refused, at the line that holds them: aliases (`*name`; ten lines, each repeating the anchor of the line
    before ten times, expand to 10^10 values, a "billion laughs"; `extends:` shares settings instead), nesting
    deeper than MAX_DEPTH, and a key given twice in one mapping (YAML would silently keep the last).
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self.key_path: list[Any] = []  # keys and indices down to the node being composed (None for mapping keys)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self.key_path.append(index.value if isinstance(index, yaml.ScalarNode) else index)
        try:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                problem = (
                    f"YAML alias '*{shorten(event.anchor)}' refused: recipes do not expand anchors and aliases; "
                    "repeat the value, or share settings with extends:"
                )
                raise RefusedYAML("alias", problem, event.start_mark, self._path())
            if len(self.key_path) > MAX_DEPTH:
                problem = f"nested more than {MAX_DEPTH} levels deep; a recipe needs a handful"
                raise RefusedYAML("depth", problem, event.start_mark, self._path()[:1])
            return super().compose_node(parent, index)
        finally:
            self.key_path.pop()

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: dict[tuple[str, str], yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            first = seen.setdefault((key_node.tag, key_node.value), key_node.start_mark)
            if first is not key_node.start_mark:
                key = (*self._path(), key_node.value)
                problem = f"key '{shorten(key_node.value)}' defined twice"
                raise RefusedYAML("duplicate", problem, key_node.start_mark, key, first)
        return node

    def _path(self) -> KeyPath:
        return tuple(part for part in self.key_path if part is not None)


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
    parent_path = _parent_recipe(path, parent, seen, file, line)
    base = read_with_extends(parent_path, (*seen, path.resolve()))
    del raw.origins[("extends",)]
    return merge(base, raw)


def _parent_recipe(path: Path, parent: Any, seen: tuple[Path, ...], file: str, line: int | None) -> Path:
    """The file an `extends:` names, resolved against the extending file's folder; a RecipeError unless it is a
    readable recipe that does not close a cycle."""

    def refuse(message: str) -> RecipeError:
        return RecipeError(message, file=file, line=line, key="extends")

    if not isinstance(parent, str) or not parent.strip():
        raise refuse("expected the path of another recipe file")
    name = shorten(parent)
    if len(seen) + 1 >= MAX_EXTENDS:
        raise refuse(f"more than {MAX_EXTENDS} files in one extends: chain")
    try:
        parent_path = (path.parent / parent).resolve()
        is_dir, is_file, is_link = parent_path.is_dir(), parent_path.is_file(), parent_path.is_symlink()
    except (OSError, RuntimeError, ValueError):  # a symlink loop (RuntimeError), a NUL byte, a name too long
        raise refuse(f"'{name}' cannot be resolved: a symbolic link loop or an invalid path") from None
    if parent_path in seen or parent_path == path.resolve():
        raise refuse(f"'{name}' extends itself in a cycle")
    if is_dir:
        raise refuse(f"'{name}' is a directory; expected a YAML recipe file")
    if not is_file:
        if is_link:
            raise refuse(f"'{name}' is a broken or looping symbolic link")
        raise refuse(f"file '{name}' not found (relative to {path.parent})")
    return parent_path


def _parse_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The node tree (for line numbers) and the data of one YAML document, composed once and refused as
    `RecipeLoader` says; raises `yaml.YAMLError` (`RefusedYAML` among them)."""
    loader = RecipeLoader(text)
    try:
        node = loader.get_single_node()
        return node, (loader.construct_document(node) if node is not None else None)
    finally:
        loader.dispose()


def read_yaml(path: Path) -> RawRecipe:
    file = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(
                f"the recipe is {size:,} bytes; a recipe is a few KB (at most {MAX_RECIPE_BYTES:,}): is this the "
                "data file?",
                file=file,
            )
        raw_bytes = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError("recipe file not found", file=file) from None
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe: {exc.strerror}", file=file) from None
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw_bytes[: exc.start].count(b"\n") + 1
        raise RecipeError(
            f"not UTF-8 text: byte 0x{raw_bytes[exc.start]:02x} cannot be decoded; save the recipe as UTF-8",
            file=file,
            line=line,
        ) from None
    try:
        node, data = _parse_yaml(text)
    except RefusedYAML as exc:
        key = ".".join(map(str, exc.key)) or None
        raise RecipeError(exc.message(file), file=file, line=exc.mark.line + 1, key=key) from None
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, text, file) from None
    if data is None:
        raise RecipeError("the recipe is empty; expected a mapping with model, datasets and output_dir", file=file)
    if not isinstance(data, dict):
        raise RecipeError("expected a mapping of sections at the top level", file=file, line=1)
    origins: dict[KeyPath, tuple[str, int | None]] = {(): (file, 1)}
    _record_lines(node, (), file, origins)
    return RawRecipe(data, origins)


def _syntax_error(exc: yaml.YAMLError, text: str, file: str) -> RecipeError:
    if isinstance(exc, yaml.reader.ReaderError):  # a control character; its str() spans two lines
        line = text[: exc.position].count("\n") + 1
        return RecipeError(f"YAML syntax error: character #x{exc.character:04x}: {exc.reason}", file=file, line=line)
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark else None
    column = f", column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc)
    return RecipeError(f"YAML syntax error{column}: {problem}", file=file, line=line)


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
    replaced = {p for p in child.origins if p and not isinstance(_get(child.data, p), dict)}
    origins = {p: o for p, o in base.origins.items() if not any(p[:end] in replaced for end in range(1, len(p) + 1))}
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
            f"expected KEY=VALUE (e.g. training.learning_rate=1e-4), got '{shorten(override)}'", file=COMMAND_LINE
        )
    path: KeyPath = tuple(int(p) if p.isdigit() else p for p in key.split("."))
    value = _override_value(text, path)
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


def _override_value(text: str, path: KeyPath) -> Any:
    """An override's value parsed as YAML; text that is not YAML (or holds an alias) stays the string it is."""
    if not text.strip():
        return None
    try:
        return _parse_yaml(text)[1]
    except RefusedYAML as exc:
        if exc.kind == "alias":  # as before aliases were refused: `*x` is not YAML without its anchor
            return text
        key = ".".join(map(str, (*path, *exc.key)))
        raise RecipeError(exc.message(COMMAND_LINE), file=COMMAND_LINE, key=key) from None
    except yaml.YAMLError:
        return text


def _list_item(items: list, index: str | int, path: KeyPath) -> Any:
    if not isinstance(index, int) or index >= len(items):
        key = ".".join(map(str, path))
        raise RecipeError(f"expected a list index below {len(items)}", file=COMMAND_LINE, key=key)
    return items[index]


def validate_raw(raw: RawRecipe) -> Recipe:
    try:
        return Recipe.model_validate(raw.data)
    except ValidationError as exc:
        raise _to_recipe_error(exc.errors(include_url=False), raw) from None


def _to_recipe_error(errors: list[dict], raw: RawRecipe) -> RecipeError:
    """The first problem, as one line; the errors of the other members of a union it hit are folded into it."""
    first, union = errors[0], _union_errors(errors, raw.data)
    pick = max(union, key=lambda e: len(e["loc"])) if union else first
    loc = _data_loc(pick, raw.data)[0]
    kind = pick["type"]
    cause = pick.get("ctx", {}).get("error")
    if isinstance(cause, FieldError):
        loc = (*loc, *(int(p) if p.isdigit() else p for p in cause.key.split(".")))
        message = str(cause)
    elif kind == "extra_forbidden":
        message = _unknown_key_message(loc)
    elif kind == "missing":
        message = "required key is missing" + _expected_hint(loc)
    else:
        # Every union member failed at the union itself ("a valid list or a valid string"), or one got further.
        alike = [e for e in union if len(e["loc"]) == len(pick["loc"])] or [pick]
        message = _describe(pick, loc, " or ".join(dict.fromkeys(_expected(e) for e in alike)))
    extra = len(errors) - len(union) if union else len(errors) - 1
    if extra:
        message += f" (and {extra} more problem{'s' if extra > 1 else ''}; fix this one first)"
    file, line = raw.origin(loc)
    return RecipeError(message, file=file, line=line, key=".".join(map(str, loc)) or None)


def _data_loc(error: dict, data: Any) -> tuple[KeyPath, int | None]:
    """The error's location as a key path of the recipe data, and where a union member's tag (`list[str]`,
    `bool`: pydantic's name of the member that failed) was dropped from it, if one was."""
    loc: KeyPath = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
    kept: list[str | int] = []
    union_at = None
    for index, part in enumerate(loc):
        is_key = isinstance(data, dict) and part in data
        is_item = isinstance(data, list) and isinstance(part, int) and part < len(data)
        if is_key or is_item:
            data = data[part]
        elif index < len(loc) - 1 or error["type"] != "missing":
            union_at = index if union_at is None else union_at
            continue
        kept.append(part)
    return tuple(kept), union_at


def _union_errors(errors: list[dict], data: Any) -> list[dict]:
    """The errors of the members of the union the first error is about (empty when it is about no union)."""
    union_at = _data_loc(errors[0], data)[1]
    if union_at is None:
        return []
    prefix = errors[0]["loc"][:union_at]
    return [e for e in errors if e["loc"][:union_at] == prefix and _data_loc(e, data)[1] == union_at]


def _expected(error: dict) -> str:
    """What the value should have been, e.g. "a valid string", "greater than 0", "'cosine', 'linear' or ...'"."""
    msg = re.sub(r"a valid dictionary or instance of \w+", "a mapping of keys", error["msg"])
    return msg.removeprefix("Input should be ")


def _describe(error: dict, loc: KeyPath, expected: str) -> str:
    msg = error["msg"]
    if msg.startswith("Value error, "):
        return msg.removeprefix("Value error, ")
    if not msg.startswith("Input should be"):
        return f"{msg.replace('Input ', 'value ')}; got {shorten(repr(error.get('input')))}"
    if error.get("input") is None:
        info = _field_info(loc)
        default = "; leave the key out to use the default" if info is not None and not info.is_required() else ""
        return f"null is not allowed here; expected {expected}{_expected_hint(loc)}{default}"
    return f"expected {expected}; got {shorten(repr(error.get('input')))}"


def _unknown_key_message(loc: KeyPath) -> str:
    key = shorten(str(loc[-1]))
    if key in FOREIGN_KEYS:
        return f"unknown key '{key}'; lora-tune spells this {FOREIGN_KEYS[key]}"
    allowed = sorted(_fields_at(loc[:-1]))
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"expected one of: {', '.join(allowed)}"
    return f"unknown key '{key}'; {hint}"


def _expected_hint(loc: KeyPath) -> str:
    info = _field_info(loc)
    return f" ({info.description})" if info is not None and info.description else ""


def _field_info(loc: KeyPath) -> Any:
    """The pydantic FieldInfo of the key at `loc`, or None when `loc` is no field (a list item, a mapping key)."""
    model = _model_at(loc[:-1]) if loc else None
    return model.model_fields.get(str(loc[-1])) if model else None


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
            if source.path.endswith(LOCAL_DATA_SUFFIXES) and not _exists(source.path):
                file, line = raw.origin((section, index, "path"))
                key = f"{section}.{index}.path"
                raise RecipeError(
                    f"file '{shorten(source.path)}' not found (paths are relative to {Path.cwd()})",
                    file=file,
                    line=line,
                    key=key,
                )


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):  # a name too long for the file system is no file either
        return False


def dump_resolved(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML: every default spelled out, so the run can be repeated exactly."""
    header = "# Resolved by lora-tune: defaults filled in, extends and overrides applied.\n"
    return header + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
