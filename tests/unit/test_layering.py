"""What each part of the package may import, read from the source (ast), not from a running
import: an import inside a function counts as much as one at the top.

``fsnotifyd/app/`` is the composition root: it wires the parts together, so nothing below it
may import it (the parts would then depend on one way of wiring them). The entry points
``fsnotifyd/cli.py`` and ``fsnotifyd/__main__.py`` sit above it. ``replay/`` reads recorded
kernel text with the parsers the sources use, from their own home, not from a source. Every
other folder imports only what its row of the table in ``docs/architecture.md`` allows, and
that table is the one held here.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fsnotifyd"
ENTRY_POINTS = {"fsnotifyd.cli", "fsnotifyd.__main__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts)


def _imports(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, module) for every module the file of module ``name`` imports; ``from X import y``
    yields X and X.y (y may be a submodule)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            out += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return out


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# (what is checked, the importing modules it applies to, the package they must not import)
RULES = {
    "nothing below app/ imports app/": (
        lambda m: not _inside(m, "fsnotifyd.app") and m not in ENTRY_POINTS, "fsnotifyd.app"),
    "replay/ does not import sources/": (lambda m: _inside(m, "fsnotifyd.replay"), "fsnotifyd.sources"),
}


def _violations(applies: Callable[[str], bool], forbidden: str) -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module_name(path)
        if not applies(importer):
            continue
        for line, module in _imports(path, importer):
            if _inside(module, forbidden):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {module}")
    return sorted(set(found))


@pytest.mark.parametrize("rule", sorted(RULES))
def test_layering(rule: str) -> None:
    applies, forbidden = RULES[rule]
    assert _violations(applies, forbidden) == []


def test_the_walk_sees_imports_in_functions_and_relative_ones(tmp_path: Path) -> None:
    """The checker itself, on a made-up module ``fsnotifyd.image.example``."""
    src = tmp_path / "example.py"
    src.write_text("import os\nfrom . import stack\n\n\ndef f():\n    from ..app.logging import configure_logging\n"
                   "    from .. import app\n")
    assert sorted(_imports(src, "fsnotifyd.image.example")) == [
        (1, "os"), (2, "fsnotifyd.image"), (2, "fsnotifyd.image.stack"),
        (6, "fsnotifyd.app.logging"), (6, "fsnotifyd.app.logging.configure_logging"),
        (7, "fsnotifyd"), (7, "fsnotifyd.app")]


# -- the folder table of docs/architecture.md ---------------------------------------------------

ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"
# What each folder may import besides the core (the top-level modules); app/ may import all.
ALLOWED: dict[str, set[str]] = {
    "kernel": set(),
    "sources": {"kernel", "image"},
    "correlator": set(),
    "rules": set(),
    "replay": {"kernel", "correlator"},
    "actions": {"rules", "image", "ve"},
    "sinks": set(),
    "timeline": {"rules"},
    "ve": {"image"},
    "image": set(),
}


def _folders() -> set[str]:
    return {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}


def _folder_of(module: str) -> str | None:
    """The folder of ``fsnotifyd.X.y`` (None for a core module or anything outside)."""
    parts = module.split(".")
    if parts[0] != "fsnotifyd" or len(parts) < 2 or parts[1] not in _folders():
        return None
    return parts[1]


def test_every_folder_has_a_row() -> None:
    assert _folders() - {"app"} == set(ALLOWED)


def test_each_folder_imports_only_what_its_row_allows() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _module_name(path)
        mine = _folder_of(importer)
        if importer in ENTRY_POINTS or mine == "app":
            continue
        allowed = ALLOWED.get(mine, set()) if mine else set()  # the core imports no folder
        for line, module in _imports(path, importer):
            theirs = _folder_of(module)
            if theirs and theirs != mine and theirs not in allowed:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {module}")
    assert sorted(set(found)) == []


def test_the_architecture_page_shows_this_table() -> None:
    rows = {}
    text = ARCHITECTURE.read_text(encoding="utf-8")
    table = text.split("## What each folder may import", 1)[1].split("\n## ", 1)[0]
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`") and cells[0].endswith("`"):
            rows[cells[0].strip("`")] = set() if cells[1] == "–" else {c.strip(" `") for c in cells[1].split(",")}
    assert rows.pop("app") == {"every folder"}
    assert rows == ALLOWED
