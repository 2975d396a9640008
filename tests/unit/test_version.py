"""The version has one source, and every place that shows it reads that one."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from fsnotifyd.cli import main
from fsnotifyd.metrics import Metrics
from fsnotifyd.version import __version__

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_reads_the_version_from_version_py() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fsnotifyd.version.__version__"}


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"fsnotifyd {__version__}\n"


def test_build_info_and_the_standard_collectors() -> None:
    text = generate_latest(Metrics().registry).decode()
    [info] = [line for line in text.splitlines() if line.startswith("fsnotifyd_build_info{")]
    assert f'version="{__version__}"' in info and info.endswith(" 1.0")
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds",
                 "python_info", "python_gc_objects_collected_total"):
        assert f"\n{name}" in text, name
    Metrics()  # a second registry in the same process takes its own collectors (tests, replay)


def test_status_says_when_the_daemon_runs_another_version(tmp_path, capsys, monkeypatch) -> None:
    """A real control socket (SocketSink on its own loop) answers; the command is "newer"."""
    import asyncio
    import threading

    from fsnotifyd import cli
    from fsnotifyd.sinks.socket import SocketSink

    loop = asyncio.new_event_loop()
    sink = SocketSink(str(tmp_path / "s.sock"), status=lambda: {
        "pid": 1, "uptime_s": 2.0, "sources": {}, "ves": [], "events": {}})
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(sink.start(), loop).result(5)
        monkeypatch.setattr(cli, "__version__", "9.9.9")
        assert cli.main(["status", "--socket", sink.path]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first == f"fsnotifyd {__version__} pid 1, up 2.0 s (this command is 9.9.9: restart the daemon to run it)"
    finally:
        loop.call_soon_threadsafe(sink.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
