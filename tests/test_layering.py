"""Layering: every import between our packages must be allowed by the allow-list in ``docs/architecture.md``, and
``dsf_runtime``'s modules must not import each other in a cycle.

The allow-list is parsed from the doc, so the doc and this test cannot drift. Every import counts: module level or
inside a function, absolute or relative, and ``importlib.import_module("<literal>")``.
"""

from __future__ import annotations

import ast
import re
import tomllib
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
ALLOW_LIST_HEADING = "## Import allow-list"
# Pairs (importer, imported) the allow-list forbids but the code still does; each case fails strictly once fixed.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------------------------------------- the checker
def parse_allow_list(text: str) -> dict[str, set[str]]:
    """The table under ``ALLOW_LIST_HEADING``: ``{unit: units it may import}`` (a unit always may import itself).

    Each row's first cell holds one backticked unit, its second cell the backticked units it may import (none: no
    backticks). Raises ``ValueError`` when the section or its table is missing or a unit is listed twice.
    """
    lines = text.splitlines()
    if ALLOW_LIST_HEADING not in lines:
        raise ValueError(f"no {ALLOW_LIST_HEADING!r} section")
    allow: dict[str, set[str]] = {}
    for line in lines[lines.index(ALLOW_LIST_HEADING) + 1:]:
        if line.startswith("#"):
            break
        cells = line.strip().strip("|").split("|")
        names = re.findall(r"`([\w.]+)`", cells[0]) if line.startswith("|") and len(cells) > 1 else []
        if len(names) != 1:  # prose, the header row, its separator
            continue
        if names[0] in allow:
            raise ValueError(f"{names[0]} is listed twice")
        allow[names[0]] = set(re.findall(r"`([\w.]+)`", cells[1]))
    if not allow:
        raise ValueError(f"no table under {ALLOW_LIST_HEADING!r}")
    return allow


def discover_modules(root: Path, packages: set[str]) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file under the top-level ``packages`` in ``root``."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_modules(path: Path, name: str, known: set[str]) -> set[tuple[str, int]]:
    """``(imported module, line)`` for every import anywhere in the module ``name`` at ``path``.

    Relative imports are resolved against ``name``'s package. ``from X import y`` imports ``X.y`` when that is a
    module in ``known``, otherwise ``X``. ``importlib.import_module`` calls with a literal name count too.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
            source = ".".join(part for part in (base, node.module or "") if part)
            for alias in node.names:
                child = f"{source}.{alias.name}" if source else alias.name
                found.add((child if child in known else source, node.lineno))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and ast.unparse(node.func) in
              {"importlib.import_module", "import_module"}):
            found.add((node.args[0].value, node.lineno))
    return found


def unit_of(module: str, units: set[str]) -> str | None:
    """The longest unit that is ``module`` or contains it; ``None`` for modules not ours."""
    owners = [unit for unit in units if module == unit or module.startswith(unit + ".")]
    return max(owners, key=len) if owners else None


def offending_imports(root: Path, units: set[str], importer: str, imported: str) -> list[str]:
    """``file:line imports module`` for every import by a module of unit ``importer`` of a module of ``imported``."""
    modules = discover_modules(root, {unit.split(".")[0] for unit in units})
    return [f"{path.relative_to(root)}:{line} imports {target}"
            for name, path in sorted(modules.items()) if unit_of(name, units) == importer
            for target, line in sorted(imported_modules(path, name, set(modules)), key=lambda t: (t[1], t[0]))
            if unit_of(target, units) == imported]


def import_cycles(modules: dict[str, Path]) -> list[list[str]]:
    """One shortest cycle (``[m0, m1, ..., m0]``) per strongly connected component of the import graph of
    ``modules`` (imports of a module by itself ignored), components in sorted order."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {unit_of(target, set(modules)) for target, _ in imported_modules(path, name, set(modules))}
        graph[name] = {target for target in targets if target and target != name}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = {stack.pop()}
            while node not in component:
                component.add(stack.pop())
            components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for component in sorted((c for c in components if len(c) > 1), key=min):
        start = min(component)
        paths, seen = [[start]], {start}
        while paths:  # breadth first inside the component: the first path back to start is a shortest cycle
            path = paths.pop(0)
            if start in graph[path[-1]]:
                cycles.append([*path, start])
                break
            for nxt in sorted(graph[path[-1]] & component - seen):
                seen.add(nxt)
                paths.append([*path, nxt])
    return cycles


# ---------------------------------------------------------------------------------------------- our code
@cache
def _allow() -> dict[str, set[str]]:
    return parse_allow_list(DOC.read_text(encoding="utf-8"))


def _forbidden_pairs() -> list:
    """One case per (unit, our unit it may not import), known violations marked as strict expected failures."""
    allow = _allow()
    cases = []
    for importer in sorted(allow):
        for imported in sorted(set(allow) - allow[importer] - {importer}):
            reason = KNOWN_VIOLATIONS.get((importer, imported))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(pytest.param(importer, imported, marks=marks, id=f"{importer}-must-not-import-{imported}"))
    return cases


def test_allow_list_covers_our_packages() -> None:
    """The doc lists every installed package and only real packages/modules; known violations are forbidden pairs."""
    allow = _allow()
    installed = {p.rstrip("*") for p in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"]["find"]["include"]}
    assert {unit.split(".")[0] for unit in allow} == installed
    rowless = set().union(*allow.values()) - set(allow)
    assert not rowless, f"may-import names without a row of their own: {sorted(rowless)}"
    missing = set(allow) - set(discover_modules(ROOT, installed))
    assert not missing, f"not a module of ours: {sorted(missing)}"
    assert all(importer in allow and imported in allow and imported not in allow[importer]
               for importer, imported in KNOWN_VIOLATIONS)


@pytest.mark.parametrize("importer,imported", _forbidden_pairs())
def test_unit_does_not_import_forbidden_unit(importer: str, imported: str) -> None:
    offenders = offending_imports(ROOT, set(_allow()), importer, imported)
    assert not offenders, f"{importer} may not import {imported} (docs/architecture.md):\n" + "\n".join(offenders)


def test_dsf_runtime_has_no_import_cycles() -> None:
    cycles = import_cycles(discover_modules(ROOT, {"dsf_runtime"}))
    assert not cycles, "import cycles in dsf_runtime:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


# ---------------------------------------------------------------------------------------------- the checker fails
def _write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)


def test_checker_sees_every_kind_of_import(tmp_path: Path) -> None:
    _write(tmp_path, {
        "low/__init__.py": "",
        "low/io.py": "",
        "high/__init__.py": "",
        "high/sub/__init__.py": "from . import tool\n",
        "high/sub/tool.py": "",
        "high/sub/m.py": (
            "import low.io\n"
            "from low import io, value\n"
            "from . import tool\n"
            "from .. import sub\n"
            "from ..sub.tool import thing\n"
            "def later():\n"
            "    import importlib\n"
            "    importlib.import_module('low')\n"
            "    from high import sub\n"
        ),
    })
    modules = discover_modules(tmp_path, {"low", "high"})
    assert set(modules) == {"low", "low.io", "high", "high.sub", "high.sub.tool", "high.sub.m"}
    found = imported_modules(modules["high.sub.m"], "high.sub.m", set(modules))
    assert found == {("low.io", 1), ("low.io", 2), ("low", 2), ("high.sub.tool", 3), ("high.sub", 4),
                     ("high.sub.tool", 5), ("importlib", 7), ("low", 8), ("high.sub", 9)}
    assert imported_modules(modules["high.sub"], "high.sub", set(modules)) == {("high.sub.tool", 1)}
    assert offending_imports(tmp_path, {"low", "high"}, "high", "low") == [
        "high/sub/m.py:1 imports low.io", "high/sub/m.py:2 imports low", "high/sub/m.py:2 imports low.io",
        "high/sub/m.py:8 imports low"]
    assert offending_imports(tmp_path, {"low", "high"}, "low", "high") == []


def test_checker_finds_cycles(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg import a\n",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from pkg.c import g\n",
        "pkg/c.py": "from . import a\nimport pkg.c\n",
        "pkg/d.py": "import pkg.e\n",
        "pkg/e.py": "import importlib\nimportlib.import_module('pkg.d')\n",
        "pkg/leaf.py": "import pkg\n",
    })
    assert import_cycles(discover_modules(tmp_path, {"pkg"})) == [
        ["pkg.a", "pkg.b", "pkg.c", "pkg.a"], ["pkg.d", "pkg.e", "pkg.d"]]


def test_allow_list_parser() -> None:
    text = ("# Doc\n\n| package | may import |\n|---|---|\n| `x` | `y` |\n\n"
            f"{ALLOW_LIST_HEADING}\n\nprose `z`\n\n| unit | may import | why |\n|---|---|---|\n"
            "| `a` | `b`, `b.c` | data flows down |\n| `b` | nothing | |\n| `b.c` | `b` | |\n\n"
            "## Next\n| `d` | `a` |\n")
    assert parse_allow_list(text) == {"a": {"b", "b.c"}, "b": set(), "b.c": {"b"}}
    with pytest.raises(ValueError, match="twice"):
        parse_allow_list(text.replace("| `b.c` | `b` |", "| `a` | `b` |"))
    with pytest.raises(ValueError, match="no '## Import allow-list' section"):
        parse_allow_list(text.replace(ALLOW_LIST_HEADING, "## Imports"))
