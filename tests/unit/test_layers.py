"""The package's layer contract: each subpackage imports only from the layers below it, and no import cycle exists.

From the top: the command line and the task registry; what a user does with a finished run (evaluate, export) and
before one (plan, quickstart); using a model; training; the pre-flight check; the fine-tuning methods; the base
model; the data; the recipe; and at the bottom the run directory, then the error types. Subpackages on one layer are
independent of each other. `make lint` runs this test.

Imports of lora_tune modules sit at the top of the module that makes them; only the modules in LAZY import inside
functions, for the reason given there. Imports under `if TYPE_CHECKING:` are annotations only: they count for the
layers (a module names only types from below it) but not as cycles, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "lora_tune"

LAYERS: list[set[str]] = [
    {"cli", "tasks", "ui", "__main__", "__init__"},
    {"evaluate", "export", "plan", "quickstart", "serve"},
    {"inference"},
    {"training"},
    {"check"},
    {"methods"},
    {"model"},
    {"data"},
    {"recipe"},
    {"run"},
    {"errors"},
]
LAZY = {
    "lora_tune": "the package exposes load_recipe and train without importing the pipeline on `import lora_tune`",
    "lora_tune.cli": "each verb imports what it needs, so `--help` and `validate` stay fast and torch-free",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str:
    """`lora_tune.a.b.name` -> the module it lives in."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(module: str) -> list[tuple[int, str, str]]:
    """(line, imported module, where: 'top' | 'function' | 'typing') for each lora_tune module `module` imports."""
    found: list[tuple[int, str, str]] = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = "function"
            elif isinstance(child, ast.If) and is_type_checking(child):
                inner = "typing"
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("lora_tune"):
                for alias in child.names:
                    found.append((child.lineno, resolve(f"{child.module}.{alias.name}"), inner))
            elif isinstance(child, ast.Import):
                found.extend(
                    (child.lineno, resolve(a.name), inner) for a in child.names if a.name.startswith("lora_tune")
                )
            visit(child, inner)

    visit(ast.parse(MODULES[module].read_text(encoding="utf-8")), "top")
    return [(line, target, where) for line, target, where in found if target != module]


def unit(module: str) -> str:
    """The layer unit a module belongs to: its subpackage, or the top-level module's own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(module: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if unit(module) in names)


def test_every_module_has_a_layer():
    assert [m for m in MODULES if not any(unit(m) in names for names in LAYERS)] == []


def test_imports_go_down_the_layers():
    wrong = []
    for module in MODULES:
        for line, target, _ in imports_of(module):
            same_unit = unit(target) == unit(module)
            if not same_unit and layer(target) <= layer(module) and layer(module) > 0:
                wrong.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: {module} imports {target}")
    assert wrong == [], "an import goes up or sideways:\n" + "\n".join(wrong)


def test_no_task_folder_imports_another():
    """A task is a folder (lora_tune/tasks/<task>/): what it needs from another task belongs in a shared stage, and
    only the registry (tasks/__init__.py) knows them all."""
    wrong = []
    for module in MODULES:
        parts = module.split(".")
        if parts[:2] != ["lora_tune", "tasks"] or len(parts) < 4:
            continue
        for line, target, _ in imports_of(module):
            other = target.split(".")
            if other[:2] == ["lora_tune", "tasks"] and len(other) > 2 and other[2] != parts[2]:
                wrong.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: {module} imports {target}")
    assert wrong == [], "a task folder imports another:\n" + "\n".join(wrong)


def test_in_function_imports_only_where_laziness_is_the_point():
    inside = [
        f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: {target}"
        for module in MODULES
        if module not in LAZY
        for line, target, where in imports_of(module)
        if where == "function"
    ]
    assert inside == [], "import at the top of the module (or add it to LAZY with the reason):\n" + "\n".join(inside)


def test_no_import_cycles():
    graph = {m: {t for _, t, where in imports_of(m) if where != "typing"} for m in MODULES}
    cycles = strongly_connected(graph)
    assert cycles == [], f"import cycles: {cycles}"


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: every group of modules that import each other, directly or around a loop."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_contract_catches_what_it_forbids():
    """The checks find a cycle and an upward import when there is one (guards against a test that cannot fail)."""
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("lora_tune.recipe.schema") > layer("lora_tune.training.lifecycle") > layer("lora_tune.cli")
    assert layer("lora_tune.run.layout") < layer("lora_tune.errors")
