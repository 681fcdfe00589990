"""The two wire formats, translated to and from posttrain's neutral messages.

    OpenAI  POST /v1/chat/completions  -> decode_openai    -> Decoded (neutral)
    Anthropic POST /v1/messages        -> decode_anthropic -> Decoded (neutral)
    the policy answers with a Reply (neutral: content + tool calls)
    Reply -> openai_body | openai_sse | anthropic_body | anthropic_sse

Neutral messages are the ones of docs/agent-runtime.md: OpenAI-chat-shaped dicts, tool
calls with raw JSON text arguments, tools in OpenAI function form. Token counts are
estimates: characters / 4.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from agents.teacher.slips import unfence

FINGERPRINT = "posttrain-simulated-teacher"


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def request_hash(model: str, messages: list[dict], tools: list[dict], params: dict) -> str:
    """sha256 of the canonical JSON of the decoded request: the model, the neutral messages,
    the tools in OpenAI function form and every other body field (`params`). It is the
    formula of agents.agent_prompt.request_hash, so an OpenAI-route request from the agent loop
    hashes as the loop recorded it; both routes hash what the teacher acts on, not bytes."""
    blob = canonical({"model": model, "messages": messages, "tools": tools, "params": params})
    return hashlib.sha256(blob.encode()).hexdigest()


def text_of(content) -> str:
    """The text of a message content: a string, or a list of text parts/blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content
                       if isinstance(p, dict) and isinstance(p.get("text", ""), str))
    return ""


def approx_tokens(chars: int) -> int:
    return max(1, chars // 4)


@dataclass
class Decoded:
    """One request, decoded: what the policy reads and what the request hash covers."""

    api: str                       # "openai" | "anthropic"
    model: str
    messages: list[dict]           # neutral
    tools: list[dict]              # OpenAI function form
    params: dict                   # every other body field
    size: int                      # characters of the body as received
    schema: dict | None = None     # structured output requested (json_schema), if any
    stream: bool = False
    include_usage: bool = False    # OpenAI streams: stream_options.include_usage
    hash: str = field(init=False)

    def __post_init__(self) -> None:
        self.hash = request_hash(self.model, self.messages, self.tools, self.params)


@dataclass
class Reply:
    """The assistant's next message, neutral. tool_calls: [{"name", "arguments" (text)}]."""

    content: str | None
    tool_calls: list[dict] = field(default_factory=list)

    def size(self) -> int:
        return len(self.content or "") + sum(len(c["arguments"]) for c in self.tool_calls)


class BadRequest(ValueError):
    """The body is not a request of this format; the message says what is wrong."""


# ── decoding ───────────────────────────────────────────────────────────────────────────────
def decode_openai(body: dict, size: int) -> Decoded:
    if not isinstance(body.get("model"), str) or not isinstance(body.get("messages"), list):
        raise BadRequest("model (string) and messages (list) are required")
    messages = []
    for m in body["messages"]:
        if not isinstance(m, dict):
            raise BadRequest("every message must be an object")
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role == "assistant":
            out = {"role": role, "content": m.get("content")}
            if isinstance(out["content"], list):
                out["content"] = text_of(out["content"])
            if m.get("tool_calls"):
                out["tool_calls"] = [
                    {"id": c.get("id"), "type": "function",
                     "function": {"name": (c.get("function") or {}).get("name"),
                                  "arguments": (c.get("function") or {}).get("arguments")}}
                    for c in m["tool_calls"]]
        elif role == "tool":
            out = {"role": role, "tool_call_id": m.get("tool_call_id"),
                   "content": text_of(m.get("content"))}
        else:
            out = {"role": role, "content": text_of(m.get("content"))}
        messages.append(out)
    params = {k: v for k, v in body.items() if k not in ("model", "messages", "tools")}
    fmt = body.get("response_format") or {}
    schema = (fmt.get("json_schema") or {}).get("schema", {}) if fmt.get("type") == "json_schema" \
        else None
    return Decoded("openai", body["model"], messages, list(body.get("tools") or []), params,
                   size, schema, bool(body.get("stream")),
                   bool((body.get("stream_options") or {}).get("include_usage")))


def decode_anthropic(body: dict, size: int) -> Decoded:
    if not isinstance(body.get("model"), str) or not isinstance(body.get("messages"), list):
        raise BadRequest("model (string) and messages (list) are required")
    messages = []
    if body.get("system"):
        messages.append({"role": "system", "content": text_of(body["system"])})
    for m in body["messages"]:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise BadRequest("every message must be an object with role user or assistant")
        blocks = m.get("content")
        if isinstance(blocks, str):
            messages.append({"role": m["role"], "content": blocks})
            continue
        if not isinstance(blocks, list):
            raise BadRequest("message content must be a string or a list of blocks")
        blocks = [b for b in blocks if isinstance(b, dict)]
        text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
        if m["role"] == "assistant":
            out = {"role": "assistant", "content": text or None}
            calls = [{"id": b.get("id"), "type": "function",
                      "function": {"name": b.get("name"), "arguments": _arguments(b)}}
                     for b in blocks if b.get("type") == "tool_use"]
            if calls:
                out["tool_calls"] = calls
            messages.append(out)
            continue
        for b in blocks:
            if b.get("type") == "tool_result":
                messages.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                                 "content": text_of(b.get("content"))})
        if text or not any(b.get("type") == "tool_result" for b in blocks):
            messages.append({"role": "user", "content": text})
    tools = [{"type": "function", "function": {
        "name": t.get("name"), "description": t.get("description", ""),
        "parameters": t.get("input_schema")}}
        for t in body.get("tools") or [] if isinstance(t, dict) and "input_schema" in t]
    params = {k: v for k, v in body.items() if k not in ("model", "messages", "system", "tools")}
    fmt = (body.get("output_config") or {}).get("format") or {}
    schema = fmt.get("schema", {}) if fmt.get("type") == "json_schema" else None
    return Decoded("anthropic", body["model"], messages, tools, params, size, schema,
                   bool(body.get("stream")))


def _arguments(block: dict) -> str:
    raw = block.get("input")
    return raw if isinstance(raw, str) else json.dumps(raw if raw is not None else {})


# ── encoding: OpenAI chat completions ──────────────────────────────────────────────────────
def _usage(d: Decoded, reply: Reply) -> tuple[int, int]:
    return approx_tokens(d.size), approx_tokens(reply.size())


def _openai_calls(reply: Reply, id_prefix: str) -> list[dict]:
    return [{"id": f"{id_prefix}{i}", "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}}
            for i, c in enumerate(reply.tool_calls)]


def openai_body(d: Decoded, reply: Reply) -> dict:
    prompt, completion = _usage(d, reply)
    message = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = _openai_calls(reply, f"call_{d.hash[:16]}_")
    return {
        "id": f"chatcmpl-{d.hash[:24]}", "object": "chat.completion", "created": int(time.time()),
        "model": d.model, "system_fingerprint": FINGERPRINT,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": "tool_calls" if reply.tool_calls else "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    }


def _pieces(text: str, n: int = 3) -> list[str]:
    """`text` in at most n pieces, so streaming clients really have to join deltas."""
    step = max(1, -(-len(text) // n))
    return [text[i:i + step] for i in range(0, len(text), step)] or [""]


def openai_sse(d: Decoded, reply: Reply) -> Iterator[str]:
    head = {"id": f"chatcmpl-{d.hash[:24]}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": d.model, "system_fingerprint": FINGERPRINT}

    def chunk(delta: dict, finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    yield chunk({"role": "assistant", "content": "" if reply.content else None})
    for piece in _pieces(reply.content) if reply.content else []:
        yield chunk({"content": piece})
    for i, call in enumerate(_openai_calls(reply, f"call_{d.hash[:16]}_")):
        fn = call["function"]
        yield chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                     "function": {"name": fn["name"], "arguments": ""}}]})
        for piece in _pieces(fn["arguments"]):
            yield chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
    yield chunk({}, "tool_calls" if reply.tool_calls else "stop")
    if d.include_usage:
        prompt, completion = _usage(d, reply)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"


# ── encoding: Anthropic messages ───────────────────────────────────────────────────────────
def _anthropic_blocks(d: Decoded, reply: Reply) -> list[dict]:
    blocks = [{"type": "text", "text": reply.content}] if reply.content else []
    for i, c in enumerate(reply.tool_calls):
        try:  # tool_use input is an object: a fence (an OpenAI-route habit) does not survive
            args = json.loads(unfence(c["arguments"]))
        except json.JSONDecodeError:
            args = c["arguments"]  # malformed on purpose: a string where an object belongs
        blocks.append({"type": "tool_use", "id": f"toolu_{d.hash[:16]}_{i}", "name": c["name"],
                       "input": args})
    return blocks


def _anthropic_usage(d: Decoded, reply: Reply) -> dict:
    prompt, completion = _usage(d, reply)
    return {"input_tokens": prompt, "output_tokens": completion,
            "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}


def anthropic_body(d: Decoded, reply: Reply) -> dict:
    return {
        "id": f"msg_{d.hash[:24]}", "type": "message", "role": "assistant", "model": d.model,
        "content": _anthropic_blocks(d, reply),
        "stop_reason": "tool_use" if reply.tool_calls else "end_turn", "stop_sequence": None,
        "usage": _anthropic_usage(d, reply),
    }


def anthropic_sse(d: Decoded, reply: Reply) -> Iterator[str]:
    def event(kind: str, data: dict) -> str:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"

    usage = _anthropic_usage(d, reply)
    start = {**anthropic_body(d, reply), "content": [], "stop_reason": None,
             "usage": {**usage, "output_tokens": 1}}
    yield event("message_start", {"message": start})
    for i, block in enumerate(_anthropic_blocks(d, reply)):
        if block["type"] == "text":
            yield event("content_block_start", {"index": i,
                                                "content_block": {"type": "text", "text": ""}})
            for piece in _pieces(block["text"]):
                yield event("content_block_delta", {"index": i, "delta": {
                    "type": "text_delta", "text": piece}})
        else:
            yield event("content_block_start", {"index": i, "content_block": {
                **block, "input": {}}})
            text = json.dumps(block["input"])  # a string input (malformed) goes in one piece:
            for piece in _pieces(text) if isinstance(block["input"], dict) else [text]:
                yield event("content_block_delta", {"index": i, "delta": {
                    "type": "input_json_delta", "partial_json": piece}})
        yield event("content_block_stop", {"index": i})
    yield event("message_delta", {
        "delta": {"stop_reason": "tool_use" if reply.tool_calls else "end_turn",
                  "stop_sequence": None},
        "usage": {"output_tokens": usage["output_tokens"]}})
    yield event("message_stop", {})


# ── errors, in each format's shape ─────────────────────────────────────────────────────────
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    404: "not_found_error", 429: "rate_limit_error", 500: "api_error",
                    529: "overloaded_error"}
_OPENAI_TYPES = {400: ("invalid_request_error", None),
                 401: ("invalid_request_error", "invalid_api_key"),
                 404: ("invalid_request_error", "not_found"),
                 429: ("requests", "rate_limit_exceeded"),
                 500: ("server_error", None), 503: ("server_error", "overloaded")}


def error_body(api: str, status: int, message: str) -> dict:
    if api == "anthropic":
        return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"),
                                           "message": message}}
    kind, code = _OPENAI_TYPES.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
