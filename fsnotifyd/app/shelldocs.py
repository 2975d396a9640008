"""Shell completion (bash, zsh) and the man page, generated from the real argparse parser.

``python -m fsnotifyd.app.shelldocs --out DIR`` writes, laid out as under ``share/``:

  DIR/bash-completion/completions/fsnotifyd
  DIR/zsh/site-functions/_fsnotifyd
  DIR/man/man8/fsnotifyd.8

``scripts/install.sh`` runs it and installs the result under ``/usr/local/share``; the test
suite runs it on the same parser, so a new verb is completed and documented with no second
list to keep in step. shtab and argparse-manpage are build tools (requirements.lock), not
runtime dependencies: the installed daemon does not import this module.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence

from ..version import __version__
from .output import EXIT_STATUS

# Which arguments complete as files or directories (by dest); the rest complete options only.
_FILES = {"config", "socket", "events_out", "out", "expect", "ve_map", "paths", "rules", "events"}
_DIRS = {"image", "state_dir", "mountpoint", "mount"}

PATHS = {
    "bash": os.path.join("bash-completion", "completions", "fsnotifyd"),
    "zsh": os.path.join("zsh", "site-functions", "_fsnotifyd"),
    "man": os.path.join("man", "man8", "fsnotifyd.8"),
}


def _parser() -> argparse.ArgumentParser:
    from ..cli import build_parser

    return build_parser()


def _walk(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases share a parser
                yield from _walk(sub)


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every verb as typed: "status", "image create", "ve show", ..."""
    out: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append(f"{prefix}{name}")
                out.extend(subcommands(sub, f"{prefix}{name} "))
    return out


def completion(shell: str, parser: argparse.ArgumentParser | None = None) -> str:
    import shtab

    parser = parser or _parser()
    for action in _walk(parser):
        # shtab reads a `complete` attribute it asks callers to set on argparse's actions
        if action.dest in _FILES:
            action.complete = shtab.FILE  # type: ignore[attr-defined]
        elif action.dest in _DIRS:
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]
    return shtab.complete(parser, shell=shell)


def manpage(parser: argparse.ArgumentParser | None = None) -> str:
    from argparse_manpage.manpage import Manpage

    page = Manpage(parser or _parser())
    page.section = 8  # a root daemon and its admin commands, installed in sbin
    page.source = f"fsnotifyd {__version__}"
    page.manual = "System Administration"
    page.description = "kernel filesystem errors as structured, per-VE events"
    page.add_section("exit status", ">", "\n".join(
        f".TP\n.B {code}\n{text}" for code, text in EXIT_STATUS
    ) + "\n.PP\nWith \\fB\\-\\-json\\fR the result, or {\"ok\": false, \"error\": ...}, is one JSON document "
        "on standard output. The per-command notes are in /usr/share/doc/fsnotifyd/docs/cli.md.")
    page.add_section("see also", ">", "/usr/share/doc/fsnotifyd/README.md, docs/config.md, docs/cli.md; "
                     "systemctl(1), journalctl(1)")
    return str(page)


def write_all(out: str) -> list[str]:
    written = []
    for what, rel in PATHS.items():
        path = os.path.join(out, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        text = manpage() if what == "man" else completion(what)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fsnotifyd.app.shelldocs", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, metavar="DIR", help="where to write (laid out as share/)")
    args = p.parse_args(argv)
    for path in write_all(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
