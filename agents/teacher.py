"""The simulated teacher: a real local HTTP server speaking OpenAI's chat-completions API.

With no API key and no internet, posttrain still runs end to end against this server,
through the real `openai` SDK. It always announces itself (`system_fingerprint:
posttrain-simulated-teacher`, header `x-posttrain-simulated: true`).

It is stateless: each request carries the whole conversation, and the teacher replays it
to decide its next move, like an honest sub-agent following the label-examples skill:

    no <slice> block                        -> a plain message (nothing to do)
    last message: an sql result with rows   -> submit_examples for those rows
    last message: a submit result with rejections it can fix -> resubmit them, gold label
    the last page came back short           -> a plain "done" message
    otherwise                               -> sql: the next page, ORDER BY id LIMIT/OFFSET

Labels come from the warehouse's GOLD column (which agents cannot read), with seeded,
per-row noise: `error_rate` of rows get a wrong but valid label, `off_spec_rate` get a
label outside the set on first submission (the gate must reject it; the resubmission
carries the gold label). Usage tokens are len(text) / 4.
"""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import sqlalchemy as sa
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from agents.loop import request_hash

FINGERPRINT = "posttrain-simulated-teacher"
FIXABLE = {"label_not_in_set", "invalid_schema"}
_SLICE = re.compile(r"<slice>\s*(\{.*?\})\s*</slice>", re.DOTALL)


@dataclass
class TeacherConfig:
    warehouse_url: str
    table: str
    id_column: str
    gold_column: str
    labels: list[str]
    error_rate: float = 0.0
    off_spec_rate: float = 0.0
    seed: int = 0
    api_key: str | None = None
    request_log: str | Path | None = None
    models: list[str] = field(default_factory=lambda: ["simulated-teacher"])


# ── the teacher's mind: conversation in, next move out ─────────────────────────────────────
class Teacher:
    def __init__(self, config: TeacherConfig):
        self.config = config
        self.engine = sa.create_engine(config.warehouse_url)
        for name in (config.table, config.id_column, config.gold_column):
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ValueError(f"{name!r} is not a plain SQL identifier")

    def gold(self, ids: list) -> dict[str, str]:
        c = self.config
        stmt = sa.text(
            f"SELECT {c.id_column}, {c.gold_column} FROM {c.table} WHERE {c.id_column} IN :ids"
        ).bindparams(sa.bindparam("ids", expanding=True))
        with self.engine.connect() as conn:
            return {str(i): g for i, g in conn.execute(stmt, {"ids": list(ids)})}

    def first_label(self, row_id, gold: str) -> str:
        """The label an honest but imperfect labeller gives a row the first time."""
        c = self.config
        rng = random.Random(f"{c.seed}:{row_id}")
        u = rng.random()
        if u < c.off_spec_rate:
            candidates = [x for x in (gold + "s", "world", gold.upper()) if x not in c.labels]
            return rng.choice(candidates)
        if u < c.off_spec_rate + c.error_rate:
            wrong = [x for x in c.labels if x != gold]
            return rng.choice(wrong) if wrong else gold
        return gold

    def decide(self, messages: list[dict]) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of the next assistant message."""
        block = _slice_block(messages)
        if block is None:
            return "I am posttrain's simulated teacher; I found no <slice> block to label.", []
        history = _tool_history(messages)
        if history and messages[-1].get("role") == "tool":
            name, _, res = history[-1]
            if name == "sql" and res.get("rows"):
                return None, [self._submit(res["rows"], block, first=True)]
            if name == "submit_examples":
                fix = [r["row_id"] for r in res.get("rejected", []) if r.get("reason") in FIXABLE]
                fix = [i for i in fix if i is not None]
                if fix:
                    rows = [{block["id_column"]: i} for i in fix]
                    return None, [self._submit(rows, block, first=False)]
            if name == "sql" and "error" in res:
                return f"I could not read slice {block['slice_id']}: {res.get('message')}", []

        reads = [res for name, _, res in history if name == "sql" and "rows" in res]
        page = int(block.get("page_size") or 25)
        if reads and reads[-1]["row_count"] < page and not reads[-1].get("truncated"):
            total = sum(r["row_count"] for r in reads)
            return f"Labelled all {total} rows of slice {block['slice_id']}.", []
        offset = sum(r["row_count"] for r in reads)
        id_col = block["id_column"]
        cols = [id_col] + [c for c in block.get("columns", []) if c != id_col]
        query = (
            f"SELECT {', '.join(cols)} FROM {block['table']} ORDER BY {id_col} "
            f"LIMIT {page} OFFSET {offset}"
        )
        return None, [{"name": "sql", "arguments": {"query": query}}]

    def _submit(self, rows: list[dict], block: dict, first: bool) -> dict:
        ids = [r.get(block["id_column"]) for r in rows]
        gold = self.gold([i for i in ids if i is not None])
        examples = []
        for i in ids:
            g = gold.get(str(i))
            if g is not None and (first or g in self.config.labels):  # never loop on bad gold
                examples.append({"row_id": i, "label": self.first_label(i, g) if first else g})
        return {"name": "submit_examples", "arguments": {"examples": examples}}


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _slice_block(messages: list[dict]) -> dict | None:
    for m in messages:
        if m.get("role") == "user":
            found = _SLICE.search(_text(m.get("content")))
            if found:
                try:
                    block = json.loads(found.group(1))
                except json.JSONDecodeError:
                    return None
                return block if isinstance(block, dict) and "table" in block else None
    return None


def _tool_history(messages: list[dict]) -> list[tuple[str, dict, dict]]:
    """(tool name, arguments, result) for every answered tool call, in order."""
    calls, history = {}, []
    for m in messages:
        if m.get("role") == "assistant":
            for tc in m.get("tool_calls") or []:
                fn = tc.get("function") or {}
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                except json.JSONDecodeError:
                    args = {}
                calls[tc.get("id")] = (fn.get("name"), args)
        elif m.get("role") == "tool" and m.get("tool_call_id") in calls:
            try:
                res = json.loads(_text(m.get("content")))
            except json.JSONDecodeError:
                res = {"error": "unreadable"}
            name, args = calls[m["tool_call_id"]]
            history.append((name, args, res if isinstance(res, dict) else {}))
    return history


# ── the HTTP face ──────────────────────────────────────────────────────────────────────────
def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": None, "code": code}},
        status_code=status,
    )


def create_app(config: TeacherConfig) -> FastAPI:
    teacher = Teacher(config)
    log_lock = threading.Lock()
    app = FastAPI(title="posttrain simulated teacher", docs_url=None, redoc_url=None)

    def authorised(request: Request) -> bool:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        return config.api_key is None or key.strip() == config.api_key

    def unauthorised() -> JSONResponse:
        return _error(401, "Incorrect or missing API key (Authorization: Bearer <key>).",
                      "invalid_request_error", "invalid_api_key")

    @app.middleware("http")
    async def announce(request: Request, call_next):
        response = await call_next(request)
        response.headers["x-posttrain-simulated"] = "true"
        return response

    @app.get("/v1/models")
    def models(request: Request):
        if not authorised(request):
            return unauthorised()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": FINGERPRINT}
                for m in config.models]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if not authorised(request):
            return unauthorised()
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON", "invalid_request_error")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) \
                or not isinstance(body.get("model"), str):
            return _error(400, "model (string) and messages (list) are required",
                          "invalid_request_error")
        if body.get("stream"):
            return _error(400, "the simulated teacher does not stream yet; send stream=false",
                          "invalid_request_error")
        return await run_in_threadpool(respond, body)  # reads the warehouse, appends the log

    def respond(body: dict) -> dict:
        messages = [m for m in body["messages"] if isinstance(m, dict)]
        # the same hash the agent loop records for this call, so the two logs join
        params = {k: v for k, v in body.items() if k not in ("model", "messages", "tools")}
        digest = request_hash(body["model"], body["messages"], body.get("tools") or [], params)
        if config.request_log:
            line = _canonical({"time": time.time(), "request_hash": digest,
                               "model": body["model"], "messages": len(messages)})
            with log_lock, open(config.request_log, "a") as f:
                f.write(line + "\n")

        content, calls = teacher.decide(messages)
        tool_calls = [
            {"id": f"call_{digest[:16]}_{i}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
            for i, c in enumerate(calls)
        ]
        message = {"role": "assistant", "content": content, "refusal": None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        prompt_chars = sum(len(_text(m.get("content"))) + len(_canonical(m.get("tool_calls") or []))
                           for m in messages) + len(_canonical(body.get("tools") or []))
        reply_chars = len(content or "") + sum(len(c["function"]["arguments"]) for c in tool_calls)
        prompt_tokens, completion_tokens = max(1, prompt_chars // 4), max(1, reply_chars // 4)
        return {
            "id": f"chatcmpl-{digest[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "tool_calls" if tool_calls else "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    return app


# ── running it ─────────────────────────────────────────────────────────────────────────────
class TeacherServer:
    """The teacher on a background thread: `url = server.start()`, later `server.stop()`."""

    def __init__(self, config: TeacherConfig, host: str = "127.0.0.1", port: int = 0):
        self.config, self.host, self.port = config, host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url: str | None = None

    def start(self, timeout: float = 15.0) -> str:
        if self._server is not None:
            raise RuntimeError("the teacher server is already running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(
            create_app(self.config), log_level="warning", access_log=False, lifespan="off",
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
        self.base_url = f"http://{self.host}:{self.port}/v1"
        return self.base_url

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
    print(f"posttrain simulated teacher on http://{host}:{port}/v1 (not a real LLM)", flush=True)
    uvicorn.run(create_app(config), host=host, port=port, log_level="warning", access_log=False)
