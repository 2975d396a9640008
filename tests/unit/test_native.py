"""The one loader of the C modules (fsnotifyd.native): one switch, one ABI check, and a
fallback to the Python side with one warning when a module is missing or speaks another ABI."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from fsnotifyd import native
from fsnotifyd.image import fastio
from fsnotifyd.replay import reader
from fsnotifyd.rules import native as rules_native

ROOT = Path(__file__).resolve().parents[2]
# The Python side of each C module and the ABI it asks for.
MODULES = {"fsnotifyd.rules._decide": rules_native.ABI, "fsnotifyd.replay._jsonl": reader.JSONL_ABI,
           "fsnotifyd.image._fastio": fastio.ABI}
SWITCHES = ("FSNOTIFYD_NO_C", "FSNOTIFYD_PURE_PYTHON", "FSNOTIFYD_FASTIO")


@pytest.fixture
def no_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in SWITCHES:
        monkeypatch.delenv(var, raising=False)


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**clean, "PYTHONPATH": str(ROOT), **env})


@pytest.mark.parametrize("name", sorted(MODULES))
def test_each_built_module_speaks_the_abi_its_python_side_expects(name: str, no_switches: None) -> None:
    """scripts/bootstrap.sh builds all three; a missing build must not pass unseen."""
    loaded = native.load(name, MODULES[name])
    assert loaded.reason is None and loaded.module is not None
    assert loaded.module.ABI == MODULES[name]


def test_one_switch_turns_every_c_module_off(monkeypatch: pytest.MonkeyPatch, no_switches: None) -> None:
    monkeypatch.setenv("FSNOTIFYD_NO_C", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a switch is a choice: no warning
        for name, abi in MODULES.items():
            assert native.load(name, abi) == native.Loaded(None, "FSNOTIFYD_NO_C=1 is set")
    assert fastio.load() is None and reader._native_scanner() is None


def test_the_earlier_switches_still_work_for_their_modules(monkeypatch: pytest.MonkeyPatch,
                                                            no_switches: None) -> None:
    monkeypatch.setenv("FSNOTIFYD_PURE_PYTHON", "1")
    assert native.switched_off("fsnotifyd.rules._decide") == "FSNOTIFYD_PURE_PYTHON=1 is set"
    assert native.switched_off("fsnotifyd.replay._jsonl") == "FSNOTIFYD_PURE_PYTHON=1 is set"
    assert native.switched_off("fsnotifyd.image._fastio") is None
    monkeypatch.delenv("FSNOTIFYD_PURE_PYTHON")
    monkeypatch.setenv("FSNOTIFYD_FASTIO", "0")
    assert native.switched_off("fsnotifyd.image._fastio") == "FSNOTIFYD_FASTIO=0 is set"
    assert native.switched_off("fsnotifyd.rules._decide") is None
    monkeypatch.setenv("FSNOTIFYD_FASTIO", "1")
    monkeypatch.setenv("FSNOTIFYD_NO_C", "0")
    assert all(native.switched_off(n) is None for n in MODULES)


def test_the_rules_core_switched_off_in_a_fresh_process_runs_the_reference_quietly() -> None:
    r = _python("from fsnotifyd.rules import native, decide\n"
                "print(native.NATIVE, native.impl is decide, native.reason)", FSNOTIFYD_NO_C="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(None, 2) == ["False", "True", "FSNOTIFYD_NO_C=1 is set\n"]
    assert r.stderr == ""


def test_a_real_module_of_another_abi_falls_back_with_one_warning() -> None:
    """The built _fastio, asked for by a Python side that speaks ABI 2: refused, said once."""
    r = _python("from fsnotifyd.image import fastio\nfastio.ABI = 2\n"
                "print(fastio.load(), fastio.load())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "None None"
    said = [line for line in r.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(said) == 1, r.stderr
    assert "fsnotifyd.image._fastio not used: built for ABI 1, the Python side speaks 2" in said[0]


def test_a_missing_module_falls_back_with_one_warning(no_switches: None) -> None:
    """In-process (logging set up: a structlog event); the stderr form is checked above."""
    with capture_logs() as logs:
        first = native.load("fsnotifyd._never_built", 1)
        again = native.load("fsnotifyd._never_built", 1)
    assert [(e["event"], e["module"]) for e in logs] == [("native.fallback", "fsnotifyd._never_built")]
    assert first is again and first.module is None and "not built" in (first.reason or "")
    assert "scripts/bootstrap.sh" in (first.reason or "")


def test_a_module_without_abi_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         no_switches: None) -> None:
    """One built before the ABI check existed exports no ABI: it is rebuilt, not trusted."""
    (tmp_path / "fsnd_old_build.py").write_text("OPS = ()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with capture_logs() as logs:
        assert native.load("fsnd_old_build", 1).module is None
    assert len(logs) == 1 and "an older build without an ABI number, the Python side speaks 1" in logs[0]["reason"]


def test_a_refusing_check_is_a_fallback_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            no_switches: None) -> None:
    (tmp_path / "fsnd_other_tables.py").write_text("ABI = 1\nOPS = ('x',)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with capture_logs() as logs:
        loaded = native.load("fsnd_other_tables", 1, lambda m: "other tables" if m.OPS != () else None)
    assert loaded == native.Loaded(None, "other tables") and [e["reason"] for e in logs] == ["other tables"]
