"""What each part of the package may import, read from the source (ast), not from a running
import: an import inside a function counts as much as one at the top.

``fsnotifyd/app/`` is the composition root: it wires the parts together, so nothing below it
may import it (the parts would then depend on one way of wiring them). The entry points
``fsnotifyd/cli.py`` and ``fsnotifyd/__main__.py`` sit above it. ``replay/`` reads recorded
kernel text with the parsers the sources use, from their own home, not from a source.
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
