"""Completion and the man page, generated from the real parser, name every verb and load.

Real tools throughout: bash sources the completion and completes a partial word, zsh's compinit
registers it, man (or groff) renders the page with warnings as errors.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fsnotifyd.app import shelldocs
from fsnotifyd.cli import build_parser

VERBS = shelldocs.subcommands(build_parser())


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shelldocs")
    shelldocs.main(["--out", str(d)])
    return d


def test_the_parser_has_the_verbs_of_every_family() -> None:
    """The walk finds nested verbs, so the checks below cover all of them."""
    for verb in ("run", "status", "events tail", "rules check", "rules test", "bpf check", "config",
                 "image create", "image check", "ve show", "ve destroy"):
        assert verb in VERBS
    assert len(VERBS) >= 40


def test_bash_completion_loads_and_completes_every_verb(out: Path) -> None:
    path = out / shelldocs.PATHS["bash"]
    r = subprocess.run(["bash", "-c", f"source {path}; complete -p fsnotifyd"], capture_output=True, text=True)
    assert r.returncode == 0 and "-F _shtab_fsnotifyd fsnotifyd" in r.stdout, r.stderr
    families: dict[str, list[str]] = {}
    for verb in VERBS:
        head, _, tail = verb.rpartition(" ")
        families.setdefault(head, []).append(tail)
    for head, names in families.items():
        words = ["fsnotifyd", *head.split(), ""]
        script = (f"source {path}; COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; "
                  "_shtab_fsnotifyd; printf '%s\\n' \"${COMPREPLY[@]}\"")
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
        offered = set(r.stdout.split())
        assert set(names) <= offered, (head, set(names) - offered, r.stderr)


def test_bash_completes_options_of_a_verb(out: Path) -> None:
    path = out / shelldocs.PATHS["bash"]
    script = (f"source {path}; COMP_WORDS=(fsnotifyd image check --); COMP_CWORD=3; _shtab_fsnotifyd; "
              "printf '%s\\n' \"${COMPREPLY[@]}\"")
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert {"--json", "--repair", "--state-dir"} <= set(r.stdout.split()), r.stdout + r.stderr


def test_zsh_completion_registers_with_compinit(out: Path, tmp_path: Path) -> None:
    if shutil.which("zsh") is None:
        pytest.skip("zsh not installed (scripts/bootstrap.sh installs it)")
    path = out / shelldocs.PATHS["zsh"]
    assert subprocess.run(["zsh", "-n", str(path)], capture_output=True).returncode == 0
    script = (f"fpath=({path.parent} $fpath); autoload -Uz compinit; compinit -u -d {tmp_path / 'zcd'}; "
              "print -r -- ${_comps[fsnotifyd]}")
    r = subprocess.run(["zsh", "-fc", script], capture_output=True, text=True)
    assert r.stdout.strip() == "_fsnotifyd", r.stdout + r.stderr
    text = path.read_text()
    for verb in VERBS:
        assert verb.split()[-1] in text, verb


def test_man_page_renders_and_names_every_verb(out: Path) -> None:
    page = out / shelldocs.PATHS["man"]
    if shutil.which("man"):
        argv = ["man", "-l", str(page)]
    elif shutil.which("groff"):
        argv = ["groff", "-man", "-Tutf8", str(page)]
    else:
        pytest.skip("neither man nor groff installed")
    r = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "MANWIDTH": "100", "MANPAGER": "cat"})
    assert r.returncode == 0 and r.stderr == "", r.stderr  # troff warnings (a line it cannot fit) fail too
    rendered = r.stdout
    assert rendered.startswith("FSNOTIFYD(8)")
    for verb in VERBS:
        assert f"COMMAND 'fsnotifyd {verb}'" in rendered, verb
    assert "EXIT STATUS" in rendered and "usage or configuration error" in rendered and "nothing was done" in rendered


def test_the_exit_code_table_of_docs_cli_md_is_the_man_pages() -> None:
    """One table: the man page renders output.EXIT_STATUS, docs/cli.md shows the same rows."""
    from fsnotifyd.app.output import EXIT_STATUS

    doc = (Path(__file__).resolve().parents[2] / "docs/cli.md").read_text()
    for code, text in EXIT_STATUS:
        assert f"\n| {code} | {text} |\n" in doc, code
