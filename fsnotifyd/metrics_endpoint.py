"""The metrics endpoint: plain HTTP, or HTTPS with an optional client CA.

Plain HTTP is prometheus-client's own ``start_http_server``. For HTTPS that function wraps the
listening socket, so the TLS handshake runs inside ``accept()`` in the one serving thread: a
single client that connects and never sends its hello stops every scrape (seen here: the next
scrape timed out). So the TLS server here accepts plain TCP and does the handshake in the
connection's own thread, under a timeout; a stalled or refused client costs only its thread.
The same :func:`tls_context` builds the context for ``config check``, so a wrong path, a key
that does not match its certificate or an unreadable CA is reported before the daemon starts.
"""

from __future__ import annotations

import socket
import ssl
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import CollectorRegistry

from .config import MetricsTLSConfig

HANDSHAKE_TIMEOUT_S = 10.0
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def tls_context(tls: MetricsTLSConfig) -> ssl.SSLContext:
    """The server context; raises OSError (ssl.SSLError included) naming the file at fault."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    try:
        ctx.load_cert_chain(tls.certfile, tls.keyfile)
    except OSError as e:
        raise type(e)(f"metrics.tls: cannot load certificate {tls.certfile} with key {tls.keyfile}: "
                      f"{e.strerror or e}") from e
    if tls.client_auth:
        try:
            ctx.load_verify_locations(cafile=tls.client_cafile, capath=tls.client_capath)
        except OSError as e:
            where = tls.client_cafile or tls.client_capath
            raise type(e)(f"metrics.tls: cannot load client CA {where}: {e.strerror or e}") from e
        ctx.verify_mode = ssl.CERT_REQUIRED  # a client CA given means: no certificate, no scrape
    return ctx


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # a scrape every 15 s is not worth a log line


class _TLSServer(ThreadingWSGIServer):
    """Accepts TCP; the handshake happens in the connection's thread (see the module doc)."""

    context: ssl.SSLContext

    # TCP only: socketserver's signature also admits a datagram server's (bytes, socket) request.
    def finish_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        request.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            conn = self.context.wrap_socket(request, server_side=True)
        except (OSError, ValueError):
            return  # no hello in time, no or a wrong client certificate: refused, nothing to answer
        try:
            super().finish_request(conn, client_address)
        finally:
            conn.close()


def start(address: str, port: int, registry: CollectorRegistry,
          tls: MetricsTLSConfig | None = None) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``registry`` on ``address:port`` from a daemon thread; ``server.shutdown()`` stops it.
    Raises OSError when the port is taken or the TLS files cannot be loaded."""
    if tls is None:
        from prometheus_client import start_http_server

        return start_http_server(port, addr=address, registry=registry)
    context = tls_context(tls)
    family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]

    class Server(_TLSServer):
        address_family = family

    server = Server((address, port), _QuietHandler)
    server.context = context
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=server.serve_forever, name="metrics-https", daemon=True)
    thread.start()
    return server, thread
