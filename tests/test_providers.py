"""The providers through the real SDKs: httpx2 mock transports (the SDKs' own HTTP layer) serve
wire-accurate replies and record exactly what the SDK sent."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx2
import pytest

from agents.anthropic_provider import to_anthropic
from agents.provider_factory import make_provider
from agents.providers import Completion, ProviderError, ToolCall, retry_after_seconds

OPENAI_BASE = "http://llm.test/v1"
ANTHROPIC_BASE = "http://llm.test/anthropic"


class Wire:
    """A mock transport: answers each request with the next reply and keeps the requests."""

    def __init__(self, *replies):
        self.replies = list(replies)
        self.requests: list[httpx2.Request] = []
        self._lock = threading.Lock()

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        with self._lock:
            self.requests.append(request)
            reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(reply, Exception):
            raise reply
        return reply(request) if callable(reply) else reply

    @property
    def bodies(self) -> list[dict]:
        return [json.loads(r.content) for r in self.requests]

    def provider(self, api: str, **kw):
        base = OPENAI_BASE if api == "openai" else ANTHROPIC_BASE
        client = httpx2.Client(transport=httpx2.MockTransport(self))
        return make_provider(api, base_url=base, api_key="test-key", http_client=client, **kw)


def ok(body: dict, headers: dict | None = None) -> httpx2.Response:
    return httpx2.Response(200, json=body, headers=headers)


def openai_reply(content=None, tool_calls=None, *, prompt=20, completion=5, cached=0,
                 finish="stop", model="gpt-4.1-mini") -> httpx2.Response:
    message = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
            for i, n, a in tool_calls
        ]
    return ok({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000,
        "model": model, "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion,
                  "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0}},
    })


def anthropic_reply(*blocks, stop="end_turn", usage=None,
                    model="claude-haiku-4-5") -> httpx2.Response:
    return ok({
        "id": "msg_01", "type": "message", "role": "assistant", "model": model,
        "content": list(blocks), "stop_reason": stop, "stop_sequence": None,
        "usage": usage or {"input_tokens": 30, "output_tokens": 7,
                           "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
    })


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def tool_use(i: str, name: str, inp: dict) -> dict:
    return {"type": "tool_use", "id": i, "name": name, "input": inp}


SQL_TOOL = {"type": "function", "function": {
    "name": "sql", "description": "Run one SELECT.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                   "required": ["query"]}}}
SUBMIT_TOOL = {"type": "function", "function": {
    "name": "submit_examples",
    "parameters": {"type": "object", "properties": {"examples": {"type": "array"}}}}}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


# ── OpenAI ─────────────────────────────────────────────────────────────────────────────────
def test_openai_text_reply_and_request():
    wire = Wire(openai_reply("hello", prompt=100, completion=9, cached=40))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    c = wire.provider("openai").complete(model="gpt-4.1-mini", messages=messages, tools=None,
                                         temperature=0.3, max_tokens=50)
    assert c == Completion(text="hello", tool_calls=[], stop_reason="stop", model="gpt-4.1-mini",
                           input_tokens=60, output_tokens=9, cache_read_tokens=40)
    (request,) = wire.requests
    assert str(request.url) == f"{OPENAI_BASE}/chat/completions"
    assert request.headers["authorization"] == "Bearer test-key"
    assert request.headers["x-stainless-retry-count"] == "0"
    assert wire.bodies[0] == {"model": "gpt-4.1-mini", "messages": messages,
                              "temperature": 0.3, "max_tokens": 50}


def test_openai_tool_calls():
    calls = [("call_1", "sql", '{"query": "SELECT 1"}'), ("call_2", "sql", "{not json")]
    wire = Wire(openai_reply(None, calls, finish="tool_calls"))
    p = wire.provider("openai")
    c = p.complete(model="gpt-4.1", messages=[{"role": "user", "content": "go"}],
                   tools=[SQL_TOOL], temperature=None, max_tokens=None)
    assert c.text is None and c.stop_reason == "tool_calls"
    assert c.tool_calls == [ToolCall("call_1", "sql", '{"query": "SELECT 1"}'),
                            ToolCall("call_2", "sql", "{not json")]
    assert wire.bodies[0] == {"model": "gpt-4.1", "messages": [{"role": "user", "content": "go"}],
                              "tools": [SQL_TOOL]}
    assert p.api == "openai" and p.endpoint.startswith(OPENAI_BASE)


def test_openai_structured_output():
    wire = Wire(openai_reply('{"ok": true}'), openai_reply("sure! {ok}"))
    p = wire.provider("openai")
    kw = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "judge"}],
          "schema": SCHEMA, "schema_name": "verdict", "temperature": 0.0, "max_tokens": 100}
    data, c = p.complete_json(**kw)
    assert data == {"ok": True} and c.text == '{"ok": true}'
    assert wire.bodies[0]["response_format"] == {
        "type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    with pytest.raises(ProviderError) as e:
        p.complete_json(**kw)
    assert e.value.kind == "malformed" and e.value.retryable
    assert e.value.completion.output_tokens == 5  # the unusable answer still cost tokens


def test_openai_own_api_gets_max_completion_tokens():
    wire = Wire(openai_reply("x"))
    client = httpx2.Client(transport=httpx2.MockTransport(wire))
    p = make_provider("openai", base_url=None, api_key="k", http_client=client)
    p.complete(model="gpt-4.1", messages=[{"role": "user", "content": "x"}], tools=None,
               temperature=None, max_tokens=64)
    assert wire.bodies[0]["max_completion_tokens"] == 64 and "max_tokens" not in wire.bodies[0]


# ── Anthropic ──────────────────────────────────────────────────────────────────────────────
def test_anthropic_text_reply():
    usage = {"input_tokens": 12, "output_tokens": 4, "cache_read_input_tokens": 900,
             "cache_creation_input_tokens": 100}
    wire = Wire(anthropic_reply(text("Hello "), text("there"), usage=usage))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    c = wire.provider("anthropic").complete(model="claude-haiku-4-5", messages=messages,
                                            tools=None, temperature=0.2, max_tokens=300)
    assert c == Completion(text="Hello there", tool_calls=[], stop_reason="stop",
                           model="claude-haiku-4-5", input_tokens=12, output_tokens=4,
                           cache_read_tokens=900, cache_write_tokens=100)
    (request,) = wire.requests
    assert str(request.url) == f"{ANTHROPIC_BASE}/v1/messages"
    assert request.headers["authorization"] == "Bearer test-key"  # anthropic 2.x: not x-api-key
    assert wire.bodies[0] == {"model": "claude-haiku-4-5", "max_tokens": 300,
                              "system": "be brief", "temperature": 0.2,
                              "messages": [{"role": "user", "content": "hi"}]}


MULTI_TOOL_TURN = [
    {"role": "system", "content": "label rows"},
    {"role": "user", "content": "start"},
    {"role": "assistant", "content": "Reading two pages.", "tool_calls": [
        {"id": "toolu_a", "type": "function",
         "function": {"name": "sql", "arguments": '{"query": "SELECT 1"}'}},
        {"id": "toolu_b", "type": "function",
         "function": {"name": "sql", "arguments": '{"query": "SELECT'}},  # truncated JSON
    ]},
    {"role": "tool", "tool_call_id": "toolu_a", "content": '{"rows": []}'},
    {"role": "tool", "tool_call_id": "toolu_b", "content": '{"error": "invalid_arguments"}'},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "toolu_c", "type": "function",
         "function": {"name": "submit_examples", "arguments": "[1, 2]"}}]},  # not an object
    {"role": "tool", "tool_call_id": "toolu_c", "content": '{"accepted": 0}'},
    {"role": "assistant", "content": None},  # stopped without a word: dropped
    {"role": "user", "content": "continue"},
]


def test_anthropic_multi_tool_turn_translation():
    wire = Wire(anthropic_reply(text("Two more."), tool_use("toolu_d", "sql", {"query": "SELECT 2"}),
                                tool_use("toolu_e", "submit_examples", {"examples": []}),
                                stop="tool_use"))
    c = wire.provider("anthropic").complete(
        model="claude-haiku-4-5", messages=MULTI_TOOL_TURN, tools=[SQL_TOOL, SUBMIT_TOOL],
        temperature=None, max_tokens=1000)
    assert c.text == "Two more." and c.stop_reason == "tool_calls"
    assert c.tool_calls == [ToolCall("toolu_d", "sql", '{"query": "SELECT 2"}'),
                            ToolCall("toolu_e", "submit_examples", '{"examples": []}')]
    assert wire.bodies[0] == {
        "model": "claude-haiku-4-5", "max_tokens": 1000, "system": "label rows",
        "tools": [
            {"name": "sql", "description": "Run one SELECT.",
             "input_schema": SQL_TOOL["function"]["parameters"]},
            {"name": "submit_examples",
             "input_schema": SUBMIT_TOOL["function"]["parameters"]},
        ],
        "messages": [
            {"role": "user", "content": "start"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Reading two pages."},
                {"type": "tool_use", "id": "toolu_a", "name": "sql",
                 "input": {"query": "SELECT 1"}},
                {"type": "tool_use", "id": "toolu_b", "name": "sql",
                 "input": {"_raw": '{"query": "SELECT'}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": '{"rows": []}'},
                {"type": "tool_result", "tool_use_id": "toolu_b",
                 "content": '{"error": "invalid_arguments"}'},
            ]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_c", "name": "submit_examples",
                 "input": {"_raw": "[1, 2]"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_c", "content": '{"accepted": 0}'}]},
            {"role": "user", "content": "continue"},
        ],
    }


def test_to_anthropic_leaves_the_input_alone():
    before = json.dumps(MULTI_TOOL_TURN)
    system, messages, tools = to_anthropic(MULTI_TOOL_TURN, [SQL_TOOL])
    assert system == "label rows" and len(messages) == 6 and tools[0]["name"] == "sql"
    assert json.dumps(MULTI_TOOL_TURN) == before


def test_anthropic_structured_output():
    wire = Wire(anthropic_reply(text('{"ok": false}')),
                anthropic_reply(text('<think>hmm</think>\n```json\n{"ok": true}\n```')),
                anthropic_reply(text("I cannot")))
    p = wire.provider("anthropic")
    kw = {"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "judge"}],
          "schema": SCHEMA, "schema_name": "verdict", "temperature": None, "max_tokens": 200}
    data, c = p.complete_json(**kw)
    assert data == {"ok": False} and c.input_tokens == 30
    assert wire.bodies[0] == {
        "model": "claude-haiku-4-5", "max_tokens": 200,
        "messages": [{"role": "user", "content": "judge"}],
        "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}}
    assert p.complete_json(**kw)[0] == {"ok": True}  # compatible servers' think tags and fences
    with pytest.raises(ProviderError) as e:
        p.complete_json(**kw)
    assert e.value.kind == "malformed"


def sse(*events: dict) -> httpx2.Response:
    body = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)
    return httpx2.Response(200, content=body.encode(),
                           headers={"content-type": "text/event-stream"})


def test_anthropic_stream():
    start = {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-opus-4-1",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 50, "output_tokens": 1, "cache_read_input_tokens": 10,
                  "cache_creation_input_tokens": 0}}}
    wire = Wire(sse(
        start,
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Lo"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "tool_use", "id": "toolu_1", "name": "sql", "input": {}}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "input_json_delta", "partial_json": '{"query": "SEL'}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "input_json_delta", "partial_json": 'ECT 1"}'}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 22}},
        {"type": "message_stop"},
    ), sse(start, {"type": "error",
                   "error": {"type": "overloaded_error", "message": "Overloaded"}}),
       sse(start, {"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}))  # cut off
    p = wire.provider("anthropic", stream=True)
    kw = {"model": "claude-opus-4-1", "messages": [{"role": "user", "content": "x"}],
          "tools": [SQL_TOOL], "temperature": None, "max_tokens": 64}
    c = p.complete(**kw)
    assert wire.bodies[0]["stream"] is True
    assert c.text == "Look" and c.stop_reason == "tool_calls"
    assert c.tool_calls == [ToolCall("toolu_1", "sql", '{"query": "SELECT 1"}')]
    assert (c.input_tokens, c.output_tokens, c.cache_read_tokens) == (50, 22, 10)
    with pytest.raises(ProviderError) as e:  # an error event inside a 200 stream
        p.complete(**kw)
    assert e.value.kind == "overloaded" and e.value.retryable
    with pytest.raises(ProviderError) as e:
        p.complete(**kw)
    assert e.value.kind == "connection"


# ── errors ─────────────────────────────────────────────────────────────────────────────────
def status(code: int, headers: dict | None = None, api: str = "openai") -> httpx2.Response:
    kind = {429: "rate_limit_error", 529: "overloaded_error", 401: "authentication_error"}
    if api == "anthropic":
        body = {"type": "error", "error": {"type": kind.get(code, "api_error"), "message": "x"}}
    else:
        body = {"error": {"message": "x", "type": "error", "param": None, "code": None}}
    return httpx2.Response(code, json=body, headers=headers)


ERRORS = [
    (lambda api: status(429, {"retry-after-ms": "1500"}, api), "rate_limited", 1.5),
    (lambda api: status(429, {"retry-after": "7"}, api), "rate_limited", 7.0),
    (lambda api: status(529, {"retry-after": "2"}, api), "overloaded", 2.0),
    (lambda api: status(500, None, api), "server", None),
    (lambda api: status(503, {"retry-after": "1"}, api), "server", 1.0),
    (lambda api: status(401, None, api), "auth", None),
    (lambda api: status(403, None, api), "auth", None),
    (lambda api: status(400, None, api), "bad_request", None),
    (lambda api: status(404, None, api), "bad_request", None),
    (lambda api: status(422, None, api), "bad_request", None),
    (lambda api: httpx2.ReadTimeout("slow"), "timeout", None),
    (lambda api: httpx2.ConnectError("refused"), "connection", None),
    (lambda api: httpx2.Response(200, content=b"{truncated",
                                 headers={"content-type": "application/json"}), "malformed", None),
    (lambda api: ok({"id": "x"}), "malformed", None),
    (lambda api: httpx2.Response(200, text="<html>gateway</html>"), "malformed", None),
]


@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize(("reply", "kind", "retry_after"), ERRORS)
def test_errors_map_to_kinds(api, reply, kind, retry_after):
    wire = Wire(reply(api))
    with pytest.raises(ProviderError) as e:
        wire.provider(api).complete(model="m", messages=[{"role": "user", "content": "x"}],
                                    tools=None, temperature=None, max_tokens=10)
    assert (e.value.kind, e.value.retry_after) == (kind, retry_after)
    assert e.value.retryable == (kind not in ("auth", "bad_request"))
    assert len(wire.requests) == 1  # max_retries=0: the gateway does the retrying


def test_retry_after_http_date():
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 28 <= retry_after_seconds(httpx2.Headers({"retry-after": when})) <= 30
    assert retry_after_seconds(httpx2.Headers({"retry-after": "soon"})) is None
    assert retry_after_seconds(httpx2.Headers({})) is None


def test_completion_round_trip_and_factory():
    c = Completion("t", [ToolCall("1", "sql", "{}")], "tool_calls", "m", 3, 4, 5, 6)
    assert Completion.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert Completion.from_dict({**c.to_dict(), "json": {"x": 1}}) == c
    with pytest.raises(ValueError, match="unknown api"):
        make_provider("gemini", base_url=None, api_key="k")
