"""The teacher's HTTP face: both wire formats, auth, seeded transport faults, the request log.

    POST /v1/chat/completions   OpenAI (Authorization: Bearer K or x-api-key: K)
    POST /v1/messages           Anthropic (either header too; query strings are ignored)
    GET  /v1/models             both SDKs' model-list shapes at once

One request: check the key -> decode into neutral messages (wire.py) -> count this attempt
of its request hash -> maybe a fault (first attempt only, so a retry succeeds) -> the
policy (labeller.py, roles.py or text_roles.py) -> encode the reply in the request's format
(SSE when stream=true) -> log one JSONL line. Every answer says `x-posttrain-simulated: true`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import threading
import time
from collections import Counter
from typing import Self

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from agents.teacher import wire
from agents.teacher.config import TeacherConfig
from agents.teacher.labeller import GoldLabels, Labeller, slice_block
from agents.teacher.roles import judge, pairs, role_block, tune
from agents.teacher.text_roles import compare, rubric_judge
from agents.teacher.wire import FINGERPRINT, BadRequest, Decoded, Reply

PINNED_MARK = "## Your task (pinned)"
_CUT_MESSAGE = "ASGI callable returned without completing response."


class TeacherState:
    """What the server remembers across requests (thread-safe): attempts per request hash,
    the order in which labelling requests first arrived (drift), counters, the log file."""

    def __init__(self, config: TeacherConfig):
        self.config = config
        self.lock = threading.Lock()
        self.attempts: Counter[str] = Counter()
        self.label_order: dict[str, int] = {}
        self.counts: Counter[str] = Counter()

    def arrive(self, digest: str, labelling: bool) -> tuple[int, int | None]:
        """(attempt number of this request, its place among labelling requests or None)."""
        with self.lock:
            self.attempts[digest] += 1
            if not labelling:
                return self.attempts[digest], None
            place = self.label_order.setdefault(digest, len(self.label_order))
            return self.attempts[digest], place

    def count(self, *keys: str) -> None:
        with self.lock:
            self.counts.update(keys)

    def log(self, record: dict) -> None:
        if self.config.request_log:
            line = wire.canonical(record) + "\n"
            with self.lock, open(self.config.request_log, "a") as f:
                f.write(line)

    def stats(self) -> dict:
        with self.lock:
            counts = dict(self.counts)
            return {"requests": counts.pop("requests", 0),
                    "labelling_calls": len(self.label_order),
                    "retries": sum(n - 1 for n in self.attempts.values()),
                    **{k: v for k, v in sorted(counts.items())}}


class Teacher:
    """The policy for every kind of request, on neutral messages."""

    def __init__(self, config: TeacherConfig):
        self.config = config
        self.gold = GoldLabels(config)
        self.labeller = Labeller(config, self.gold)

    @staticmethod
    def kind(messages: list[dict]) -> tuple[str, dict | None]:
        found = role_block(messages)
        if found:
            return found
        block = slice_block(messages)
        return ("label", block) if block is not None else ("other", None)

    def answer(self, d: Decoded, kind: str, block,
               drifted: bool) -> tuple[Reply, dict | None, list[str]]:
        """(the reply, its failing slip or None, the cheap-model habits it shows)"""
        c = self.config
        if kind == "label":
            return self.labeller.answer(d.messages, block, drifted, d.hash)
        if kind == "judge" and "rubric" in block:  # the text kinds' rubric judge
            return Reply(json.dumps(rubric_judge(block, self.gold, c))), None, []
        if kind == "judge":
            return Reply(json.dumps(judge(block, self.gold, c.labels, c.knobs))), None, []
        if kind == "compare":
            return Reply(json.dumps(compare(block, self.gold, c))), None, []
        if kind == "pairs":
            return Reply(json.dumps(pairs(block, self.gold, c.labels, c.knobs))), None, []
        if kind == "tune":
            return Reply(json.dumps(tune(block, c.knobs))), None, []
        return Reply("I am posttrain's simulated teacher; I found no <slice>, <review>, <pairs> "
                     "or <tune> block to act on."), None, []


def _pick_fault(config: TeacherConfig, d: Decoded, attempt: int) -> str | None:
    """A seeded fault for the first attempt of a request; None for every later attempt."""
    k = config.knobs
    if attempt > 1:
        return None
    rng = random.Random(f"{k.seed}:fault:{d.hash}")
    u = rng.random()
    for name, rate in (("rate_limited", k.fault_429_rate), ("server_error", k.fault_500_rate),
                       ("overloaded", k.fault_529_rate), ("timeout", k.timeout_rate),
                       ("truncated", k.truncated_rate)):
        if u < rate:
            if name == "truncated":
                return "truncated:cut" if d.stream or rng.random() < 0.5 else "truncated:bad_json"
            return name
        u -= rate
    return None


class CutResponse(Response):
    """Headers, then the first part of the body, then the connection closes: a body cut short
    (with a Content-Length promising all of it, unless streamed)."""

    def __init__(self, body: bytes, media_type: str, declared_length: bool):
        super().__init__(b"", media_type=media_type)
        self.full = body
        if not declared_length:
            del self.headers["content-length"]
        else:
            self.headers["content-length"] = str(len(body))

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.full[: len(self.full) // 2],
                    "more_body": True})
        # returning now makes uvicorn close the connection mid-body


class Announce:
    """ASGI middleware: every answer carries `x-posttrain-simulated: true` (a plain ASGI
    wrapper, so a cut body stays cut and no per-request task is spawned)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        async def announced(message):
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"x-posttrain-simulated", b"true")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, announced if scope["type"] == "http" else send)


async def _aiter(items):
    for item in items:
        yield item


class _HideCuts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _CUT_MESSAGE


def create_app(config: TeacherConfig) -> FastAPI:
    teacher, state = Teacher(config), TeacherState(config)
    app = FastAPI(title="posttrain simulated teacher", docs_url=None, redoc_url=None)
    app.state.teacher = state
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideCuts) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_HideCuts())  # cut bodies are on purpose: not an error

    def error(api: str, status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(wire.error_body(api, status, message), status_code=status,
                            headers=headers)

    def refuse(api: str) -> JSONResponse:
        state.count("unauthorised")
        return error(api, 401, "Incorrect or missing API key (Authorization: Bearer <key> or "
                     "x-api-key: <key>).")

    def authorised(request: Request) -> bool:
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        keys = {request.headers.get("x-api-key", "").strip()}
        if scheme.lower() == "bearer":
            keys.add(bearer.strip())
        keys.discard("")
        return bool(keys) and (config.api_key is None or config.api_key in keys)

    app.add_middleware(Announce)

    @app.get("/v1/models")
    def models(request: Request):
        if not authorised(request):
            return refuse("openai")
        data = [{"id": m, "object": "model", "type": "model", "created": 0,
                 "created_at": "1970-01-01T00:00:00Z", "display_name": m,
                 "owned_by": FINGERPRINT} for m in config.models]
        return {"object": "list", "data": data, "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "openai")

    @app.post("/v1/messages")
    async def messages(request: Request):
        return await handle(request, "anthropic")

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        if not authorised(request):
            return refuse("anthropic")
        return {"input_tokens": wire.approx_tokens(len(await request.body()))}

    async def handle(request: Request, api: str):
        route = request.url.path
        if not authorised(request):
            return refuse(api)
        raw = await request.body()
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise BadRequest("the body must be a JSON object")
            decode = wire.decode_openai if api == "openai" else wire.decode_anthropic
            d = decode(body, len(raw.decode("utf-8", "replace")))
        except (ValueError, AttributeError, TypeError) as e:  # BadRequest, JSONDecodeError...
            state.count("bad_requests")
            message = str(e) if isinstance(e, BadRequest) else \
                f"the request body is not a valid {api} request ({e.__class__.__name__})"
            return error(api, 400, message)

        kind, block = teacher.kind(d.messages)
        attempt, place = state.arrive(d.hash, kind == "label")
        k = config.knobs
        drifted = place is not None and k.drift_after_calls is not None \
            and place >= k.drift_after_calls
        fault = _pick_fault(config, d, attempt)
        reply, slip, style = None, None, []
        if fault is None or fault == "timeout" or fault.startswith("truncated"):
            reply, slip, style = await run_in_threadpool(teacher.answer, d, kind, block, drifted)
        state.count("requests", f"api:{api}", f"kind:{kind}", *(["drifted"] if drifted else []),
                    *([f"fault:{fault}"] if fault else []),
                    *([":".join(filter(None, (slip["kind"], slip["variant"])))] if slip else []),
                    *(f"style:{s}" for s in style))
        system = next((m for m in d.messages if m.get("role") == "system"), None)
        state.log({
            "time": time.time(), "api": api, "route": route, "model": d.model,
            "request_hash": d.hash, "attempt": attempt, "kind": kind, "fault": fault,
            "misuse": slip, "style": style, "n_messages": len(d.messages),
            "context_tokens": wire.approx_tokens(d.size),
            "pinned_present": (PINNED_MARK in wire.text_of(system.get("content")) if system
                               else False) if kind == "label" else None,
            "labelling_calls_so_far": len(state.label_order),
        })
        if k.latency_ms:
            await asyncio.sleep(k.latency_ms / 1000)
        return await respond(request, api, d, reply, fault)

    async def respond(request: Request, api: str, d: Decoded, reply, fault):
        k = config.knobs
        if fault == "rate_limited":
            return error(api, 429, "Rate limit reached (simulated).", headers={
                "retry-after": f"{k.retry_after_s:g}",
                "retry-after-ms": str(int(k.retry_after_s * 1000))})
        if fault == "server_error":
            return error(api, 500, "Internal server error (simulated).")
        if fault == "overloaded":
            return error(api, 529 if api == "anthropic" else 503, "Overloaded (simulated).")
        if fault == "timeout":  # stall until the client gives up (or timeout_s passes)
            deadline = time.monotonic() + k.timeout_s
            while time.monotonic() < deadline and not await request.is_disconnected():
                await asyncio.sleep(0.05)
        if d.stream:
            events = list((wire.openai_sse if api == "openai" else wire.anthropic_sse)(d, reply))
            if fault == "truncated:cut":
                return CutResponse("".join(events).encode(), "text/event-stream", False)
            return StreamingResponse(_aiter(events), media_type="text/event-stream")
        body = (wire.openai_body if api == "openai" else wire.anthropic_body)(d, reply)
        text = json.dumps(body).encode()
        if fault == "truncated:cut":
            return CutResponse(text, "application/json", True)
        if fault == "truncated:bad_json":
            return Response(text[: len(text) // 2], media_type="application/json")
        return Response(text, media_type="application/json")

    return app


# ── running it ─────────────────────────────────────────────────────────────────────────────
class TeacherServer:
    """The teacher on a background thread: `server.start()` returns the OpenAI base URL
    (`.../v1`); `server.url` is the root (the Anthropic SDK's base_url); `server.stats()`."""

    def __init__(self, config: TeacherConfig, host: str = "127.0.0.1", port: int = 0):
        self.config, self.host, self.port = config, host, port
        self.app = create_app(config)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url: str | None = None
        self.url: str | None = None

    def start(self, timeout: float = 15.0) -> str:
        if self._server is not None:
            raise RuntimeError("the teacher server is already running")
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say they
        # are TCP; without it every answer waits ~40 ms on a delayed ACK
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=2,
        ))
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="simulated-teacher", daemon=True
        )
        self._server = server
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the simulated teacher did not start on {self.host}")
            time.sleep(0.01)
        self.url = f"http://{self.host}:{self.port}"
        self.base_url = f"{self.url}/v1"
        return self.base_url

    def stats(self) -> dict:
        return self.app.state.teacher.stats()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(config: TeacherConfig, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Run the teacher in the foreground (for the CLI) until interrupted."""
    print(f"posttrain simulated teacher on http://{host}:{port} (OpenAI: /v1/chat/completions, "
          f"Anthropic: /v1/messages; not a real LLM)", flush=True)
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning", access_log=False)
