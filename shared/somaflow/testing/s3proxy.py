"""A fault-injecting, request-counting HTTP proxy in front of an HTTP service.

Tests and benchmarks put it between somaflow and a loopback server to see what
a run sends and to make the server misbehave the way real ones do: error
answers (``503``, ``500``), connections reset mid-request, slow answers, or no
answer at all. :class:`FaultProxy` relays any HTTP/1.1 service (the inference
service's Triton endpoint, answering errors as Triton does: a JSON ``error``);
:class:`S3FaultProxy` answers errors as S3 does (``503 Slow Down`` in XML). Point
somaflow at :attr:`FaultProxy.url` instead of the server
(``SOMAFLOW_S3_ENDPOINT_URL``, ``--inference``)::

    with S3FaultProxy("http://127.0.0.1:5000") as proxy:
        proxy.inject(Fault("503", first=20))            # the next 20 requests get 503
        proxy.inject(Fault("reset", during=(5.0, 8.0)))  # seconds 5-8 from now: resets
        ...
        proxy.counts()  # {"GET": 812, "PUT": 97, "COPY": 0, ..., "bytes_in": ..., "bytes_out": ...}

Only the standard library is used; each request is forwarded on a fresh
upstream connection and the answer is relayed whole.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import sys
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

FaultKind = Literal["503", "500", "reset", "slow", "down"]

_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message></Error>")
_INTERNAL = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
             b"<Message>We encountered an internal error. Please try again.</Message></Error>")
#: (content type, body) of the error answers by status, as a Triton server gives them
_JSON_ERRORS = {503: ("application/json", b'{"error":"Service Unavailable"}'),
                500: ("application/json", b'{"error":"Internal Server Error"}'),
                502: ("application/json", b'{"error":"Bad Gateway: the upstream did not answer"}')}
#: ... and as S3 does
_S3_ERRORS = {503: ("application/xml", _SLOW_DOWN), 500: ("application/xml", _INTERNAL),
              502: ("application/xml", _INTERNAL)}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # the client gave up, e.g. on a slow answer
            return
        super().handle_error(request, client_address)


@dataclass
class Fault:
    """One kind of misbehaviour and when it applies.

    Parameters
    ----------
    kind : {"503", "500", "reset", "slow", "down"}
        ``503``/``500``: an S3 error answer; ``reset``: the connection is
        closed with a TCP reset before any answer; ``slow``: the answer comes
        after ``delay`` seconds; ``down``: like ``reset`` for every request
        while it applies (a store that is gone).
    first : int, optional
        Applies to the next ``first`` matching requests, then expires.
    during : (float, float), optional
        Applies from ``during[0]`` to ``during[1]`` seconds after injection.
    probability : float
        Chance that a request it applies to is hit (seeded by ``seed``).
    methods : tuple of str, optional
        Only requests with these methods (``GET``, ``PUT``, ``HEAD``, ...).
    delay : float
        Seconds of delay for ``slow``.
    """

    kind: FaultKind
    first: int | None = None
    during: tuple[float, float] | None = None
    probability: float = 1.0
    methods: tuple[str, ...] | None = None
    delay: float = 2.0
    seed: int = 0
    hits: int = 0
    _start: float = field(default=0.0, repr=False)
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def _applies(self, method: str, now: float) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.first is not None and self.hits >= self.first:
            return False
        if self.during is not None:
            t = now - self._start
            if not self.during[0] <= t < self.during[1]:
                return False
        return self.probability >= 1.0 or self._rng.random() < self.probability

    def expired(self, now: float) -> bool:
        """True once the fault can no longer apply."""
        if self.first is not None and self.hits >= self.first:
            return True
        return self.during is not None and now - self._start >= self.during[1]


class FaultProxy:
    """An HTTP proxy on loopback that forwards to ``upstream`` and injects :class:`Fault` s.

    An upstream that does not answer (refused, reset) gives ``502``.

    Parameters
    ----------
    upstream : str
        ``http://HOST:PORT`` of the server (:meth:`set_upstream` changes it, e.g. for a
        service restarted on another port).
    host, port : optional
        Where to listen (port 0: a free one).
    """

    #: (content type, body) of the error answers by status
    errors: dict[int, tuple[str, bytes]] = _JSON_ERRORS

    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.set_upstream(upstream)
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._log: list[tuple[float, str, str, int]] = []
        self._server = _Server((host, port), self._handler())
        self._thread: threading.Thread | None = None

    def set_upstream(self, upstream: str) -> None:
        """Forward the next requests to ``upstream`` (``http://HOST:PORT``)."""
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """The endpoint URL to give to S3 clients."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ faults and counts

    def inject(self, fault: Fault) -> Fault:
        """Add a fault; its ``during`` window starts now."""
        fault._start = time.monotonic()
        fault._rng = random.Random(fault.seed)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every fault."""
        with self._lock:
            self._faults.clear()

    def counts(self) -> dict[str, int]:
        """Requests by method (``COPY``: a PUT with ``x-amz-copy-source``), faults injected by
        kind (``fault_503`` ...), and ``bytes_in`` (request bodies) / ``bytes_out`` (answers)."""
        with self._lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        """Zero every counter."""
        with self._lock:
            self._counts.clear()
            self._log.clear()

    def requests(self) -> list[tuple[float, str, str, int]]:
        """``(time, method, path, status)`` of every request relayed or faulted."""
        with self._lock:
            return list(self._log)

    def _pick(self, method: str) -> Fault | None:
        now = time.monotonic()
        with self._lock:
            self._faults = [f for f in self._faults if not f.expired(now)]
            for f in self._faults:
                if f._applies(method, now):
                    f.hits += 1
                    self._counts[f"fault_{f.kind}"] += 1
                    return f
        return None

    def _count(self, method: str, path: str, status: int, bytes_in: int, bytes_out: int) -> None:
        with self._lock:
            self._counts[method] += 1
            self._counts["requests"] += 1
            self._counts["bytes_in"] += bytes_in
            self._counts["bytes_out"] += bytes_out
            self._log.append((time.monotonic(), method, path, status))

    # ------------------------------------------------------------------ the handler

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                return

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(parts)
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reset(self) -> None:
                # SO_LINGER 0: close() sends RST, the client sees "connection reset by peer"
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _error(self, status: int) -> int:
                ctype, body = proxy.errors[status]
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return len(body)

            def _relay(self) -> None:
                method = self.command
                body = self._body()
                label = "COPY" if method == "PUT" and "x-amz-copy-source" in self.headers else method
                fault = proxy._pick(label)
                if fault is not None and fault.kind in ("reset", "down"):
                    proxy._count(label, self.path, 0, len(body), 0)
                    self._reset()
                    return
                if fault is not None and fault.kind in ("503", "500"):
                    proxy._count(label, self.path, int(fault.kind), len(body), self._error(int(fault.kind)))
                    return
                if fault is not None and fault.kind == "slow":
                    time.sleep(fault.delay)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection", "proxy-connection")}
                if body or method in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    conn.request(method, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(k, v)
                    # a HEAD answer states the object's length without a body
                    length = resp.getheader("Content-Length") if method == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if method != "HEAD":
                        self.wfile.write(data)
                    proxy._count(label, self.path, resp.status, len(body), len(data))
                except OSError:
                    proxy._count(label, self.path, 502, len(body), self._error(502))
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay  # noqa: N815

        return Handler


class S3FaultProxy(FaultProxy):
    """A :class:`FaultProxy` in front of an S3-compatible server: its error answers are S3's
    (``503 SlowDown``, ``500 InternalError`` in XML), which S3 clients retry."""

    errors = _S3_ERRORS
