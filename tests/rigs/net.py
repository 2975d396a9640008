"""Network rigs: a free local port, and a real webhook endpoint that records what it got."""

from __future__ import annotations


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

    def start(self) -> WebhookReceiver:
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

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
