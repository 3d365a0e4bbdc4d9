"""An HTTP proxy that injects storage faults between a client and moto.

It forwards each request to the target endpoint and, drawing from a seeded
RNG, answers a share of them with a fault instead (a *storm*):

- ``slowdown``: 503 with S3's SlowDown XML body (throttling),
- ``drop``: the connection closed without a reply (a reset),
- ``truncate``: the real status and headers, then half the body and a close
  (a connection lost mid-download).

On top of the storm, targeted faults switch on and off while a job runs:

- ``proxy.deny(path_prefix, code=..., status=..., methods=...)``: requests
  under a path answer an S3 XML error (revoked or expired credentials, a
  missing bucket, a redirect) — from now, after ``after_requests`` matching
  requests (a credential that expires mid-job) or from the monotonic time
  ``at``; ``proxy.allow()`` lifts every denial;
- ``proxy.slow(path_prefix, delay_s)``: matching requests wait first (slow
  reads); ``proxy.fast()`` lifts it;
- ``proxy.storm(rate, modes, path_prefix)``: the random faults above, aimed
  at one prefix (e.g. only DEST), changed mid-run; ``proxy.clear()`` lifts
  every fault.

Paths are path-style S3 (``/bucket/key``), percent-decoded, without the
query. A bucket-level request with ``?prefix=p`` (a listing) is matched as
``/bucket/p``, so denying ``/bucket/src/`` also denies listing ``src/``.

Use ``FaultProxy(target, rate=0.3)`` as a context manager and point the
client at ``proxy.endpoint``. ``proxy.counts`` counts requests (``requests``,
``request:GET``, ...), what was forwarded untouched (``forwarded``), each
storm mode, ``denied`` / ``denied:<Code>`` and ``slowed``; ``proxy.denied``
lists the (method, path) of every denied request.
"""

from __future__ import annotations

import http.client
import logging
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

log = logging.getLogger(__name__)

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
    b"<RequestId>faultproxy</RequestId><HostId>faultproxy</HostId></Error>"
)
MODES = ("slowdown", "drop", "truncate")
ALL_METHODS = ("GET", "HEAD", "PUT", "POST", "DELETE")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "expect",
}
_SET_BY_US = {"server", "date", "content-length"}  # send_response writes the first two
_MESSAGES = {  # what S3 says for each code (the message is what a client may show)
    "AccessDenied": "Access Denied",
    "ExpiredToken": "The provided token has expired.",
    "InvalidAccessKeyId": "The AWS Access Key Id you provided does not exist in our records.",
    "SignatureDoesNotMatch": "The request signature we calculated does not match the signature you provided.",
    "RequestTimeTooSkewed": "The difference between the request time and the current time is too large.",
    "NoSuchBucket": "The specified bucket does not exist",
    "PermanentRedirect": "The bucket you are attempting to access must be addressed using the specified endpoint.",
}


@dataclass
class DenyRule:
    """Requests under ``path_prefix`` with a method in ``methods`` answer ``status`` with S3 error ``code``,
    once ``after_requests`` matching requests have passed and (when set) the monotonic clock reached ``at``."""

    path_prefix: str
    code: str
    status: int
    methods: tuple[str, ...]
    after_requests: int = 0
    at: float | None = None
    seen: int = 0  # matching requests so far, the denied included
    denied: int = 0

    def matches(self, method: str, path: str) -> bool:
        return method in self.methods and path.startswith(self.path_prefix)

    def fires(self) -> bool:
        """Count one matching request; whether it is denied (call under the proxy's lock)."""
        self.seen += 1
        if self.seen <= self.after_requests or (self.at is not None and time.monotonic() < self.at):
            return False
        self.denied += 1
        return True


@dataclass
class SlowRule:
    path_prefix: str
    delay_s: float
    methods: tuple[str, ...] = ("GET",)

    def matches(self, method: str, path: str) -> bool:
        return method in self.methods and path.startswith(self.path_prefix)


@dataclass
class Storm:
    """The random faults: ``rate`` of the requests under ``path_prefix`` (methods in ``methods``) fail."""

    rate: float
    modes: tuple[str, ...] = MODES
    path_prefix: str = "/"
    methods: tuple[str, ...] = ALL_METHODS

    def matches(self, method: str, path: str) -> bool:
        return method in self.methods and path.startswith(self.path_prefix)


@dataclass
class _Fate:
    """What happens to one request."""

    mode: str  # "forwarded", a storm mode, or "denied"
    delay_s: float = 0.0
    rule: DenyRule | None = None
    extra: dict[str, str] = field(default_factory=dict)


class FaultProxy:
    """A threaded forwarding proxy on 127.0.0.1 that fails ``rate`` of the requests, plus targeted faults."""

    def __init__(
        self,
        target: str,
        rate: float = 0.3,
        seed: int = 0,
        modes: tuple[str, ...] = MODES,
        path_prefix: str = "/",
    ):
        assert all(m in MODES for m in modes), modes
        parts = urlsplit(target)
        self.target_host = parts.hostname or "127.0.0.1"
        self.target_port = parts.port or 80
        self._storm = Storm(rate, tuple(modes), path_prefix)
        self.counts: Counter[str] = Counter()  # see the module docstring for the keys
        self.denied: list[tuple[str, str]] = []
        self._deny: list[DenyRule] = []
        self._slow: list[SlowRule] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _make_handler(self))
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # the storm's settings, kept as attributes for callers of the first version
    @property
    def rate(self) -> float:
        return self._storm.rate

    @rate.setter
    def rate(self, value: float) -> None:
        with self._lock:
            self._storm.rate = value

    @property
    def modes(self) -> tuple[str, ...]:
        return self._storm.modes

    # -- switching faults on and off (thread-safe; take effect on the next request) --

    def deny(
        self,
        path_prefix: str = "/",
        *,
        code: str = "ExpiredToken",
        status: int | None = None,
        methods: tuple[str, ...] = ("GET", "HEAD"),
        after_requests: int = 0,
        at: float | None = None,
    ) -> DenyRule:
        """Answer matching requests with S3 error ``code``. ``status`` defaults to S3's own for the code
        (404 NoSuchBucket, 301 PermanentRedirect, else 403). Rules add up; ``allow()`` lifts them all."""
        if status is None:
            status = {"NoSuchBucket": 404, "PermanentRedirect": 301}.get(code, 403)
        rule = DenyRule(path_prefix, code, status, tuple(m.upper() for m in methods), after_requests, at)
        with self._lock:
            self._deny.append(rule)
        return rule

    def allow(self) -> None:
        """Lift every denial (credentials renewed)."""
        with self._lock:
            self._deny.clear()

    def slow(self, path_prefix: str = "/", delay_s: float = 1.0, methods: tuple[str, ...] = ("GET",)) -> SlowRule:
        """Delay matching requests by ``delay_s`` before forwarding them (delays of several rules add up)."""
        rule = SlowRule(path_prefix, delay_s, tuple(m.upper() for m in methods))
        with self._lock:
            self._slow.append(rule)
        return rule

    def fast(self) -> None:
        with self._lock:
            self._slow.clear()

    def storm(
        self,
        rate: float,
        modes: tuple[str, ...] = MODES,
        path_prefix: str = "/",
        methods: tuple[str, ...] = ALL_METHODS,
    ) -> None:
        """Replace the random faults: ``rate`` of the matching requests get one of ``modes``."""
        assert all(m in MODES for m in modes), modes
        with self._lock:
            self._storm = Storm(rate, tuple(modes), path_prefix, tuple(m.upper() for m in methods))

    def clear(self) -> None:
        """Lift every fault: no denial, no delay, no storm."""
        with self._lock:
            self._deny.clear()
            self._slow.clear()
            self._storm = Storm(0.0)

    # -- deciding -----------------------------------------------------------------

    def draw(self, method: str = "GET", path: str = "/") -> str:
        """The storm's fate for the next request: a fault mode, or "forwarded"."""
        with self._lock:
            return self._draw(method, path)

    def _draw(self, method: str, path: str) -> str:
        s = self._storm
        hit = s.matches(method, path) and self._rng.random() < s.rate
        fate = self._rng.choice(s.modes) if hit else "forwarded"
        self.counts[fate] += 1
        return fate

    def _decide(self, method: str, path: str) -> _Fate:
        with self._lock:
            self.counts["requests"] += 1
            self.counts[f"request:{method}"] += 1
            delay = sum(r.delay_s for r in self._slow if r.matches(method, path))
            if delay:
                self.counts["slowed"] += 1
            for rule in self._deny:
                # every matching rule counts the request (each its own after_requests), the first firing one answers
                if rule.matches(method, path) and rule.fires():
                    self.counts["denied"] += 1
                    self.counts[f"denied:{rule.code}"] += 1
                    self.denied.append((method, path))
                    for other in self._deny[self._deny.index(rule) + 1 :]:
                        if other.matches(method, path):
                            other.seen += 1
                    return _Fate("denied", delay, rule)
            return _Fate(self._draw(method, path), delay)

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


def request_path(raw: str) -> str:
    """The path a rule matches: percent-decoded, no query; a bucket-level request's ``prefix=`` joined on."""
    parts = urlsplit(raw)
    path = unquote(parts.path) or "/"
    if path.count("/") == 1 or (path.count("/") == 2 and path.endswith("/")):  # "/bucket" or "/bucket/"
        prefix = parse_qs(parts.query).get("prefix", [""])[0]
        path = "/" + path.strip("/") + "/" + prefix
    return path


def error_body(code: str, path: str, endpoint: str = "") -> bytes:
    """An S3 XML error document for ``code`` about ``path``."""
    bucket = path.lstrip("/").split("/", 1)[0]
    extra = ""
    if code == "NoSuchBucket":
        extra = f"<BucketName>{escape(bucket)}</BucketName>"
    elif code == "PermanentRedirect":
        extra = f"<Bucket>{escape(bucket)}</Bucket><Endpoint>{escape(bucket)}.s3.eu-west-1.amazonaws.com</Endpoint>"
    message = _MESSAGES.get(code, code)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>{extra}"
        f"<Resource>{escape(path)}</Resource><RequestId>faultproxy</RequestId><HostId>faultproxy</HostId></Error>"
    ).encode()


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

        def _reply(self, status: int, reason: str, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status, reason)
            self.send_header("Content-Type", "application/xml")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            # HEAD: a length but no body, as S3 does (botocore then knows the error by its status alone)
            self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _handle(self) -> None:
            body = self._body()
            path = request_path(self.path)
            fate = proxy._decide(self.command, path)
            if fate.delay_s:
                time.sleep(fate.delay_s)
            if fate.mode == "denied":
                rule = fate.rule
                assert rule is not None
                extra = {"x-amz-bucket-region": "eu-west-1"} if rule.code == "PermanentRedirect" else {}
                return self._reply(rule.status, rule.code, error_body(rule.code, path), extra)
            if fate.mode == "drop":
                return self._drop()
            if fate.mode == "slowdown":
                return self._reply(503, "Slow Down", SLOWDOWN_BODY)
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
            if fate.mode == "truncate" and len(data) < 2:
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
            if fate.mode == "truncate":
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                return self._drop()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler
