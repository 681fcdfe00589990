"""A fault-injecting HTTP reverse proxy for OpenAI- and Anthropic-compatible APIs.

The simulated teacher can fault on its own (TeacherKnobs), but then the thing under test and
the thing judging it share code. This proxy is independent of both: it sits between any SDK
and any upstream (the teacher, vLLM, a hosted API), knows nothing of the wire formats, and
breaks the transport at seeded rates:

    429        answered here, not forwarded: retry-after / retry-after-ms headers, an
               OpenAI-shaped JSON error body
    500        answered here, not forwarded
    truncated  forwarded; the upstream's status and headers, a Content-Length of the whole
               body, half the body, then the connection closes (the SDK sees a short read)
    not_json   forwarded; status 200, content-type application/json, `<html>upstream hiccup</html>`

    with FaultProxy("http://127.0.0.1:9000/v1", seed=0, log_path="proxy.jsonl") as p:
        p.set_profile(rate_429=0.1, rate_500=0.05)
        openai.OpenAI(base_url=p.url, api_key=KEY)      # p.url: http://127.0.0.1:PORT/v1
        p.snapshot()                                    # {"requests": ..., "fault_429": ...}
        with p.paused(): ...                            # no answer leaves while inside

    python -m agents.teacher.fault_proxy --upstream http://127.0.0.1:9000/v1 --rate-429 0.1

The log (one JSON line a request) holds the time the answer left, the path (no query string),
the fault (null, one of the four, or upstream_error: a 502 when the upstream could not be
reached), the status sent and the SHA-256 of the request body; never a header, so API keys
stay out of it. Standard library only; responses are buffered whole (streams arrive as one
body).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import urlsplit

__all__ = ["FAULTS", "FaultProxy"]

FAULTS = ("429", "500", "truncated", "not_json")
NOT_JSON = b"<html>upstream hiccup</html>"
# RFC 9110 7.6.1, plus what the proxy recomputes itself (length, host)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "trailers", "transfer-encoding",
                        "upgrade", "content-length", "host"})
STAT_KEYS = ("requests", "forwarded", "fault_429", "fault_500", "fault_truncated",
             "fault_not_json", "upstream_errors")


def _error_body(status: int, message: str, kind: str, code: str | None) -> bytes:
    """The OpenAI error shape (the Anthropic SDK reads any JSON error body too)."""
    return json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": code}}).encode()


class FaultProxy:
    """A reverse proxy on a background thread (ThreadingHTTPServer) that injects faults.

    `url` is the base URL for clients: the upstream's path kept, on the proxy's host and port.
    Request paths are forwarded as they arrive, so a client may use any path of the upstream
    host (the Anthropic SDK wants the root where the OpenAI SDK wants /v1)."""

    def __init__(self, upstream: str, *, seed: int = 0, log_path: str | Path | None = None,
                 port: int = 0, host: str = "127.0.0.1", timeout: float = 300.0):
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream must be an http(s) URL, not {upstream!r}")
        self.upstream = upstream
        self._scheme, self._up_host = parts.scheme, parts.hostname
        self._up_port = parts.port or (443 if parts.scheme == "https" else 80)
        self._up_netloc = parts.netloc.rpartition("@")[2]  # never forward URL credentials
        self._prefix = parts.path.rstrip("/")
        self._timeout = timeout
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._delivery = threading.Lock()  # held while an answer is logged and written
        self._busy = 0  # requests being handled (forwarded, answered), under _lock
        self._rates = {f: 0.0 for f in FAULTS}
        self._retry_after_s = 1.0
        self._stats: Counter[str] = Counter({k: 0 for k in STAT_KEYS})
        self.log_path = Path(log_path) if log_path is not None else None
        self._server = _Server((host, port), self._handler_class())
        self.host, self.port = host, self._server.server_address[1]
        self.url = f"http://{host}:{self.port}{self._prefix}"
        self._thread: threading.Thread | None = None

    # ── control ─────────────────────────────────────────────────────────────────────────────
    def set_profile(self, *, rate_429: float = 0, rate_500: float = 0, rate_truncated: float = 0,
                    rate_not_json: float = 0, retry_after_s: float = 1.0) -> None:
        """The fault rates for every request from now on (each in [0, 1], sum <= 1)."""
        rates = {"429": rate_429, "500": rate_500, "truncated": rate_truncated,
                 "not_json": rate_not_json}
        if any(not 0 <= r <= 1 for r in rates.values()) or sum(rates.values()) > 1 + 1e-9:
            raise ValueError(f"fault rates must be in [0, 1] and sum to at most 1: {rates}")
        if retry_after_s < 0:
            raise ValueError("retry_after_s must be >= 0")
        with self._lock:
            self._rates = {k: float(v) for k, v in rates.items()}
            self._retry_after_s = float(retry_after_s)

    def snapshot(self) -> dict[str, int]:
        """The counters, copied under the lock."""
        with self._lock:
            return dict(self._stats)

    @property
    def stats(self) -> dict[str, int]:
        return self.snapshot()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No answer leaves the proxy inside this block: requests still arrive and are
        forwarded, their answers wait. Every answer logged before the block has been written
        to its client, none is written during it: a consistent point to act on a client (the
        transient-faults bench kills one here, once it has recorded every answer it got)."""
        with self._delivery:
            yield

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no request is being handled (each answered, to a live client or a dead
        one); False if some still were after `timeout` seconds. After a client is killed,
        its requests in flight end here: what is logged from then on was sent after them."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._busy == 0:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("the fault proxy is already running")
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ── one request ─────────────────────────────────────────────────────────────────────────
    def _decide(self) -> tuple[str | None, float]:
        """The fault for the next request (seeded, under the lock), and the retry-after."""
        with self._lock:
            self._stats["requests"] += 1
            u = self._rng.random()
            for name in FAULTS:
                rate = self._rates[name]
                if u < rate:
                    return name, self._retry_after_s
                u -= rate
            return None, self._retry_after_s

    def _count(self, *keys: str) -> None:
        with self._lock:
            self._stats.update(keys)

    def _log(self, path: str, fault: str | None, status: int, body: bytes) -> None:
        if self.log_path is None:
            return
        line = json.dumps({"t": time.time(), "path": path.partition("?")[0], "fault": fault,
                           "status": status,
                           "request_sha256": hashlib.sha256(body).hexdigest()}) + "\n"
        with self._lock, self.log_path.open("a") as f:
            f.write(line)

    def _forward(self, method: str, path: str, headers: list[tuple[str, str]],
                 body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """The upstream's (status, reason, end-to-end headers, whole body)."""
        cls = (http.client.HTTPSConnection if self._scheme == "https"
               else http.client.HTTPConnection)
        conn = cls(self._up_host, self._up_port, timeout=self._timeout)
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", self._up_netloc)
            if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
                conn.putheader("Content-Length", str(len(body)))
            for k, v in headers:
                conn.putheader(k, v)
            conn.endheaders(body or None)
            resp = conn.getresponse()
            data = resp.read()
            kept = _end_to_end(resp.getheaders())
            return resp.status, resp.reason, kept, data
        finally:
            conn.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "posttrain-fault-proxy"

            def log_message(self, format, *args) -> None:  # quiet: the JSONL log says enough
                pass

            def do_GET(self) -> None:
                with proxy._lock:
                    proxy._busy += 1
                try:
                    self._handle()
                finally:
                    with proxy._lock:
                        proxy._busy -= 1

            do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_GET

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("transfer-encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes,
                      *, length: int | None = None, reason: str | None = None) -> None:
                self.send_response(status, reason)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                self.wfile.flush()

            def _answer(self, fault: str | None, status: int, headers: list[tuple[str, str]],
                        body: bytes, request: bytes, **kw) -> None:
                """Log, then write the answer, under the delivery lock (`paused`)."""
                with proxy._delivery:
                    proxy._log(self.path, fault, status, request)
                    self._send(status, headers, body, **kw)

            def _handle(self) -> None:
                body = self._body()
                fault, retry_after = proxy._decide()
                json_type = [("Content-Type", "application/json"),
                             ("x-posttrain-fault-proxy", fault or "none")]
                if fault == "429":
                    proxy._count("fault_429")
                    self._answer(fault, 429, [*json_type, ("retry-after", f"{retry_after:g}"),
                                              ("retry-after-ms", str(int(retry_after * 1000)))],
                                 _error_body(429, "Rate limit reached (fault proxy).",
                                             "requests", "rate_limit_exceeded"), body)
                    return
                if fault == "500":
                    proxy._count("fault_500")
                    self._answer(fault, 500, json_type, _error_body(
                        500, "Internal server error (fault proxy).", "server_error", None), body)
                    return
                try:
                    status, reason, headers, data = proxy._forward(
                        self.command, self.path, _end_to_end(self.headers.items()), body)
                except (OSError, http.client.HTTPException) as e:
                    proxy._count("upstream_errors")  # logged as its own kind of fault
                    self._answer("upstream_error", 502, json_type, _error_body(
                        502, f"upstream unreachable ({e.__class__.__name__})", "server_error",
                        None), body)
                    return
                proxy._count("forwarded", *([f"fault_{fault}"] if fault else []))
                if fault == "not_json":
                    self._answer(fault, 200, json_type, NOT_JSON, body)
                elif fault == "truncated":
                    # promise the whole body, send half, close: an incomplete read
                    self.close_connection = True
                    self._answer(fault, status, [*headers, ("Connection", "close")],
                                 data[: len(data) // 2], body, length=len(data), reason=reason)
                else:
                    self._answer(None, status, headers, data, body, reason=reason)

        return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client gone mid-answer (killed, or its SDK gave up) is not the proxy's error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _end_to_end(headers) -> list[tuple[str, str]]:
    """Headers without the hop-by-hop ones (and those the Connection header names)."""
    headers = list(headers)
    named = {t.strip().lower() for k, v in headers if k.lower() == "connection"
             for t in v.split(",")}
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP | named]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000/v1")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: any free port")
    ap.add_argument("--rate-429", type=float, default=0.0)
    ap.add_argument("--rate-500", type=float, default=0.0)
    ap.add_argument("--rate-truncated", type=float, default=0.0)
    ap.add_argument("--rate-not-json", type=float, default=0.0)
    ap.add_argument("--retry-after", type=float, default=1.0, help="seconds, sent with a 429")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", help="append one JSON line per request here")
    args = ap.parse_args(argv)
    proxy = FaultProxy(args.upstream, seed=args.seed, log_path=args.log, port=args.port,
                       host=args.host)
    proxy.set_profile(rate_429=args.rate_429, rate_500=args.rate_500,
                      rate_truncated=args.rate_truncated, rate_not_json=args.rate_not_json,
                      retry_after_s=args.retry_after)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with proxy:
        print(proxy.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            print(json.dumps(proxy.snapshot()), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
