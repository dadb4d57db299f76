"""The test suite's own layout: no module under tests/ imports a test module (shared code lives in tests/helpers.py,
shared fixtures in a conftest), so moving or renaming a test module never breaks another one."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every (line, dotted name) the module at `path` imports, `from a.b import c` counting as both a.b and a.b.c;
    relative imports are resolved against the module's package."""
    package = list(path.relative_to(TESTS.parent).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def test_no_module_under_tests_imports_a_test_module():
    offenders: dict[str, str] = {}  # one line per import statement
    for path in sorted(TESTS.rglob("*.py")):
        for line, name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == "tests" and any(part.startswith("test_") for part in parts[1:]):
                offenders.setdefault(f"{path.relative_to(TESTS.parent)}:{line}", f"imports {name}")
    assert offenders == {}, "move what is shared to tests/helpers.py (or a conftest fixture):\n" + "\n".join(
        f"{where} {what}" for where, what in offenders.items()
    )
