"""An HTTP proxy that injects storage faults between a client and moto.

It forwards each request to the target endpoint and, drawing from a seeded
RNG, answers a share of them with a fault instead:

- ``slowdown``: 503 with S3's SlowDown XML body (throttling),
- ``drop``: the connection closed without a reply (a reset),
- ``truncate``: the real status and headers, then half the body and a close
  (a connection lost mid-download).

Use ``FaultProxy(target, rate=0.3)`` as a context manager and point the
client at ``proxy.endpoint``.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>faultproxy</RequestId><HostId>faultproxy</HostId></Error>"
)
MODES = ("slowdown", "drop", "truncate")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
_SET_BY_US = {"server", "date", "content-length"}  # send_response writes the first two


class FaultProxy:
    """A threaded forwarding proxy on 127.0.0.1 that fails ``rate`` of the requests."""

    def __init__(self, target: str, rate: float = 0.3, seed: int = 0, modes: tuple[str, ...] = MODES):
        assert all(m in MODES for m in modes), modes
        parts = urlsplit(target)
        self.target_host = parts.hostname or "127.0.0.1"
        self.target_port = parts.port or 80
        self.rate = rate
        self.modes = modes
        self.counts: Counter[str] = Counter()  # "forwarded" and one key per fault mode
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _make_handler(self))
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def draw(self) -> str:
        """The fate of the next request: a fault mode, or "forwarded"."""
        with self._lock:
            fate = self._rng.choice(self.modes) if self._rng.random() < self.rate else "forwarded"
            self.counts[fate] += 1
            return fate

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._server.serve_forever, name="faultproxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # a client that gave up on a dropped connection is part of the test, not news
        log.debug("faultproxy: error serving %s", client_address, exc_info=True)


def _make_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.debug("faultproxy: " + format, *args)

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _drop(self) -> None:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _handle(self) -> None:
            body = self._body()
            fate = proxy.draw()
            if fate == "drop":
                return self._drop()
            if fate == "slowdown":
                self.send_response(503, "Slow Down")
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(SLOWDOWN_BODY) if self.command != "HEAD" else 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(SLOWDOWN_BODY)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            upstream = http.client.HTTPConnection(proxy.target_host, proxy.target_port, timeout=60)
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                resp = upstream.getresponse()
                data = resp.read()
                status, reason, resp_headers = resp.status, resp.reason, resp.getheaders()
            finally:
                upstream.close()
            if fate == "truncate" and len(data) < 2:
                return self._drop()  # nothing to cut in half: a reset is the closest fault
            self.send_response(status, reason)
            for k, v in resp_headers:
                if k.lower() not in _HOP_BY_HOP and k.lower() not in _SET_BY_US:
                    self.send_header(k, v)
            # HEAD: the object's length as upstream said; else the body we hold
            length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
            self.send_header("Content-Length", length)
            self.end_headers()
            if self.command == "HEAD":
                return
            if fate == "truncate":
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                return self._drop()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
