"""``fsnotifyd run`` as a real subprocess, and a subscriber on its control socket."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .loop import LoopFs


class EventStream:
    """A subscriber on a running daemon's socket that collects events in a background thread."""

    def __init__(self, socket_path: str, kinds: list[str] | None = None) -> None:
        import json
        import socket
        import threading

        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(socket_path)
        self._sock.sendall((json.dumps({"op": "tail", "kinds": kinds or []}) + "\n").encode())
        self._file = self._sock.makefile("rb")
        ack = json.loads(self._file.readline() or b"{}")
        if not ack.get("ok"):
            raise RuntimeError(f"subscription refused: {ack}")
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        import json

        for line in self._file:
            with self._cond:
                self.events.append(json.loads(line))
                self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 10.0, *, count: int = 1) -> list[dict]:
        """Events matching ``predicate`` once at least ``count`` arrived (or what came by timeout)."""
        import time

        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if predicate(e)]
                left = deadline - time.monotonic()
                if len(found) >= count or left <= 0:
                    return found
                self._cond.wait(left)

    def settle(self, quiet: float = 1.5, timeout: float = 30.0) -> None:
        """Wait until no event has arrived for ``quiet`` seconds."""
        import time

        end = time.monotonic() + timeout
        with self._cond:
            n = -1
            while n != len(self.events) and time.monotonic() < end:
                n = len(self.events)
                self._cond.wait(quiet)

    def close(self) -> None:
        import contextlib as _cl

        with _cl.suppress(OSError):
            self._sock.close()


class RunningDaemon:
    """``fsnotifyd run`` as a real subprocess with its own state dir, socket and journal."""

    def __init__(self, workdir: Path, *, extra_config: str = "", events_out: bool = True,
                 metrics_port: int | None = None, env: dict[str, str] | None = None,
                 wrapper: list[str] | None = None, state_dir: Path | None = None,
                 journal: Path | None = None) -> None:
        self.workdir = Path(workdir)
        self.env = env
        self.wrapper = wrapper or []  # e.g. setpriv with the systemd unit's capability set
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.workdir / "fsnotifyd.sock")
        # Elsewhere than the workdir, e.g. on a small filesystem a test fills up (the log stays).
        self.state_dir = Path(state_dir) if state_dir else self.workdir / "state"
        self.journal = Path(journal) if journal else self.workdir / "events.jsonl"
        self.events_out = self.workdir / "events-out.jsonl" if events_out else None
        self.config = self.workdir / "config.yaml"
        self.config.write_text(
            f"state_dir: {self.state_dir}\nsocket: {self.socket}\n"
            f"journal: {{path: {self.journal}}}\n"
            f"metrics: {{address: 127.0.0.1, port: {'null' if metrics_port is None else metrics_port}}}\n"
            + extra_config
        )
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> RunningDaemon:
        import sys
        import time

        argv = [*self.wrapper, sys.executable, "-m", "fsnotifyd.cli", "run", "--config", str(self.config)]
        if self.events_out:
            argv += ["--events-out", str(self.events_out)]
        self.stderr = open(self.workdir / "daemon.log", "ab")
        offset = self.stderr.tell()  # a restart appends: look for readiness after this point
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     env=None if self.env is None else {**os.environ, **self.env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()[-2000:]}")
            if b"daemon.ready" in (self.workdir / "daemon.log").read_bytes()[offset:]:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"daemon not ready after {timeout}s: {self.log()[-2000:]}")

    def log(self) -> str:
        return (self.workdir / "daemon.log").read_text(errors="replace")

    def status(self) -> dict:
        import json
        import socket

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self.socket)
            s.sendall(b'{"op":"status"}\n')
            return json.loads(s.makefile("rb").readline())

    def wait_marked(self, fs: LoopFs, timeout: float = 10.0) -> None:
        """Wait until the fanotify source has marked this mount of ``fs``.

        It re-marks when it notices a mount change, so an error right after ``mount`` may reach
        only kmsg and sysfs; after a umount + mount the device number is the same, so the
        mark is matched by mount id.
        """
        import time

        from fsnotifyd.mountinfo import read_mountinfo

        key = f"{fs.devnum[0]}:{fs.devnum[1]}"
        mount_ids = {e.mount_id for e in read_mountinfo() if e.devnum == fs.devnum}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            marked = self.status()["sources"]["fanotify"].get("detail", {}).get("marked", {})
            if key in marked and marked[key]["mount_id"] in mount_ids:
                return
            time.sleep(0.02)
        raise TimeoutError(f"fanotify did not mark {key} (mount ids {mount_ids}) within {timeout}s")

    def stream(self, kinds: list[str] | None = None) -> EventStream:
        return EventStream(self.socket, kinds)

    def journal_events(self) -> list[dict]:
        import json

        if not self.journal.exists():
            return []
        return [json.loads(line) for line in self.journal.read_text().splitlines() if line.strip()]

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                import signal as _signal
                import time as _time

                self.proc.send_signal(_signal.SIGUSR1)  # stack dump into daemon.log
                _time.sleep(0.5)
                self.proc.kill()  # our own child, by pid
                self.proc.wait()
        self.stderr.close()
        rc, self.proc = self.proc.returncode, None
        return rc

    def __enter__(self) -> RunningDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
