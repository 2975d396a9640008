"""Helpers for tests (shipped so downstream rule authors can use them too).

``LoopFs`` makes a real loop-mounted filesystem and always takes it down again, in order:
umount, then detach the loop device it attached itself (never ``losetup -D``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


def run(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, text=True, capture_output=True, **kw)


@dataclass
class LoopFs:
    image: Path
    loop: str  # /dev/loopN
    mountpoint: Path | None = None
    _cleanups: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.basename(self.loop)

    @property
    def devnum(self) -> tuple[int, int]:
        st = os.stat(self.loop)
        return (os.major(st.st_rdev), os.minor(st.st_rdev))

    @property
    def sysfs(self) -> Path:
        return Path("/sys/fs/ext4") / self.name

    def errors_count(self) -> int:
        return int((self.sysfs / "errors_count").read_text())

    def mount(self, options: str = "errors=continue", target: Path | None = None) -> subprocess.CompletedProcess[str]:
        target = target or self.image.parent / "mnt"
        target.mkdir(exist_ok=True)
        res = run("mount", "-t", "ext4", "-o", options, self.loop, str(target), check=False)
        if res.returncode == 0:
            self.mountpoint = target
        return res

    def umount(self) -> None:
        if self.mountpoint is not None:
            # A lazy umount as last resort keeps a failed test from leaking a busy mount.
            if run("umount", str(self.mountpoint), check=False).returncode != 0:
                run("umount", "-l", str(self.mountpoint), check=False)
            self.mountpoint = None

    def quiet_ratelimits(self) -> None:
        for knob in ("err_ratelimit_interval_ms", "warning_ratelimit_interval_ms", "msg_ratelimit_interval_ms"):
            with contextlib.suppress(OSError):
                (self.sysfs / knob).write_text("0")


@contextlib.contextmanager
def loop_device(image: Path, *, direct_io: bool = False) -> Iterator[str]:
    argv = ["losetup", "--find", "--show"]
    if direct_io:
        argv.append("--direct-io=on")
    dev = run(*argv, str(image)).stdout.strip()
    try:
        yield dev
    finally:
        run("losetup", "-d", dev, check=False)


@contextlib.contextmanager
def loop_ext4(size_mb: int = 32, *, mkfs: bool = True, image: Path | None = None,
              mount_options: str | None = "errors=continue", workdir: Path | None = None) -> Iterator[LoopFs]:
    """A fresh ext4 image on a loop device, mounted unless ``mount_options`` is None."""
    with contextlib.ExitStack() as stack:
        tmp = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fsnd-")))
        if image is None:
            image = tmp / "fs.img"
            with open(image, "wb") as f:
                f.truncate(size_mb << 20)
            if mkfs:
                run("mkfs.ext4", "-q", "-F", str(image))
        dev = stack.enter_context(loop_device(image))
        fs = LoopFs(image=image, loop=dev)
        stack.callback(fs.umount)
        if mount_options is not None:
            res = fs.mount(mount_options, target=tmp / "mnt")
            if res.returncode != 0:
                raise RuntimeError(f"mount {dev} failed: {res.stderr.strip()}")
        yield fs


def cgroup2_root() -> str | None:
    """Where the cgroup v2 hierarchy is mounted (hybrid hosts: ``/sys/fs/cgroup/unified``)."""
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if os.path.exists(os.path.join(root, "cgroup.procs")) and os.path.ismount(root):
            return root
    return None


@contextlib.contextmanager
def scratch_cgroup(name: str) -> Iterator[Path]:
    """A fresh cgroup v2 directory ``<name>-<pid>``, removed afterwards (once its tasks exited)."""
    root = cgroup2_root()
    if root is None:
        raise FileNotFoundError("no cgroup v2 hierarchy mounted")
    path = Path(root) / f"{name}-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(100):  # the last task may still be exiting
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


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

    def start(self, timeout: float = 15.0) -> "RunningDaemon":
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

    def wait_marked(self, fs: "LoopFs", timeout: float = 10.0) -> None:
        """Wait until the fanotify source has marked this mount of ``fs``.

        It re-marks when it notices a mount change, so an error right after ``mount`` may reach
        only kmsg and sysfs; after a umount + mount the device number is the same, so the
        mark is matched by mount id.
        """
        import time

        from .mountinfo import read_mountinfo

        key = "%d:%d" % fs.devnum
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

    def __enter__(self) -> "RunningDaemon":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FakeClock:
    """Virtual monotonic time for correlator tests: advance it instead of sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class MemoryStateStore(dict):
    """An in-memory :class:`fsnotifyd.typing.StateStore`."""

    def set(self, key: str, value: int) -> None:
        self[key] = value

    def flush(self) -> None:
        pass


class CapturingSink:
    name = "capture"

    def __init__(self) -> None:
        self.events: list = []

    def publish(self, event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


class FakeSource:
    """A scripted source: raises ``unavailable`` before ready, fails ``fail_times`` times, then
    sends ``observations`` and idles until cancelled."""

    def __init__(self, name: str, observations=(), *, unavailable: str | None = None,
                 fail_times: int = 0) -> None:
        self.name = name
        self.observations = list(observations)
        self.unavailable = unavailable
        self.fail_times = fail_times
        self.runs = 0

    async def run(self, send, ready) -> None:
        import asyncio

        from .errors import SourceUnavailable

        self.runs += 1
        if self.unavailable:
            raise SourceUnavailable(self.unavailable, hint="scripted")
        if self.runs <= self.fail_times:
            raise RuntimeError(f"scripted failure {self.runs}")
        ready()
        for obs in self.observations:
            send(obs)
        await asyncio.Event().wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on (bound and released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebhookReceiver:
    """A webhook endpoint on 127.0.0.1 (port 0: the kernel's choice) that records every POST.

    ``accept`` False answers 503 (an endpoint that is up but failing: the sender retries the
    same event); what was answered 2xx is in :meth:`delivered_ids`, in arrival order, so
    "exactly once, in order" is checked on what really went over the wire. Use it as a context
    manager: the server and its threads are stopped on the way out, failed test or not.
    """

    def __init__(self) -> None:
        import threading

        self.accept = True
        self.posts: list[tuple[int, dict]] = []  # (status answered, CloudEvent), in arrival order
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def start(self) -> "WebhookReceiver":
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # kept alive, as the sender expects of a real receiver
            disable_nagle_algorithm = True

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver._lock:
                    status = 204 if receiver.accept else 503
                    receiver.posts.append((status, body))
                    receiver._arrived.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # connections the sender drops at its close: expected

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="webhook-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def delivered_ids(self) -> list[str]:
        with self._lock:
            return [body["id"] for status, body in self.posts if 200 <= status < 300]

    def wait_delivered(self, n: int, timeout: float = 30.0) -> list[str]:
        """The delivered ids once there are at least ``n`` (or the timeout passed)."""
        import time

        deadline = time.monotonic() + timeout
        with self._lock:
            while sum(200 <= st < 300 for st, _ in self.posts) < n and (left := deadline - time.monotonic()) > 0:
                self._arrived.wait(left)
        return self.delivered_ids()

    def __enter__(self) -> "WebhookReceiver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_synced(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path`` and fsync them; returns their SHA-256."""
    import hashlib

    data = os.urandom(size)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def churn(root: str | Path, *, rounds: int, fill: float = 0.5, delete: float = 0.65, seed: int = 1,
          min_size: int = 1 << 10, max_size: int = 2 << 20, subdir: str = "churn") -> list[Path]:
    """The issue-16 churn: each round writes a tree of files of ``min_size``..``max_size``
    (log-uniform) until the filesystem is ``fill`` used, then deletes ``delete`` of the live
    files; ``syncfs`` between steps so the data is written back (with delayed allocation a
    file deleted before write-back never gets blocks, and the churn would measure nothing).
    Returns the files left."""
    import math
    import random

    from .image.thinness import syncfs

    rnd = random.Random(seed)
    root = Path(root)
    live: list[Path] = []
    st = os.statvfs(root)
    total = st.f_blocks * st.f_frsize
    n = 0
    for r in range(rounds):
        d = root / subdir / f"r{seed}-{r}"
        d.mkdir(parents=True, exist_ok=True)
        while True:
            st = os.statvfs(root)
            if (st.f_blocks - st.f_bfree) * st.f_frsize >= fill * total:
                break
            size = int(math.exp(rnd.uniform(math.log(min_size), math.log(max_size))))
            p = d / f"f{n}"
            n += 1
            p.write_bytes(rnd.randbytes(size))
            live.append(p)
            if n % 200 == 0:
                syncfs(str(root))
        syncfs(str(root))
        rnd.shuffle(live)
        k = int(len(live) * delete)
        for p in live[:k]:
            p.unlink()
        live = live[k:]
        syncfs(str(root))
    return live


def tree_digests(root: str | Path, skip: tuple[str, ...] = (".fsnotifyd-balloon",)) -> dict[str, str]:
    """SHA-256 of every regular file under ``root`` (relative path -> digest)."""
    import hashlib

    out = {}
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if rel in skip or p.is_symlink():
                continue
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def discards_settled(att: object, *, quiet: float = 1.0, limit: float = 30.0) -> None:
    """Wait until no discard has reached the image's exporter for ``quiet`` seconds (at most
    ``limit``), then flush it: ext4 sends online discards from a work queue after the journal
    commit, not inside ``sync``, so a figure taken at once would miss some."""
    from .image import attach

    seen: object = None
    since = end = time.monotonic()
    end += limit
    while time.monotonic() < end:
        st = attach.status(att)["stats"]  # type: ignore[arg-type]
        now = (st["discards"], st["writes"])
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
        time.sleep(0.1)
    attach.control(att, {"op": "flush"})  # type: ignore[arg-type]
