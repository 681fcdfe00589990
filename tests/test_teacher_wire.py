"""The simulated teacher's two wire formats, over real HTTP through the official `openai` and
`anthropic` SDKs against the real SQLite warehouse of BBC articles: a whole slice labelled
through each SDK, streamed and not, and the details of each format (finish and stop reasons,
usage, the Anthropic event sequence, the model list, a bad body as a 400 in the route's
shape). The agent stand-in and the SDK callers are in tests/teacher_helpers.py."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest

from agents.teacher import FINGERPRINT
from tests.teacher_helpers import (
    SQL_SCHEMA,
    TOOLS,
    Agent,
    anthropic_caller,
    logged,
    openai_caller,
    opening,
    to_anthropic,
)


# ── labelling through each SDK ─────────────────────────────────────────────────────────────
@pytest.mark.parametrize("sdk, stream", [("openai", False), ("openai", True),
                                         ("anthropic", False), ("anthropic", True)])
def test_each_sdk_labels_the_whole_slice(teacher, engine, gold, sdk, stream):
    server = teacher()
    call = (openai_caller if sdk == "openai" else anthropic_caller)(server, stream=stream)
    agent = Agent(engine, call, page_size=40).run()
    assert agent.accepted == gold and agent.tool_errors == 0 and not agent.rejected
    assert agent.calls == 2 * 5 + 2  # 5 pages read and submitted, an empty page, "done"
    log = logged(server)
    assert {x["api"] for x in log} == {sdk} and all(x["kind"] == "label" for x in log)
    assert all(x["pinned_present"] and x["fault"] is None for x in log)
    assert [x["labelling_calls_so_far"] for x in log] == list(range(1, agent.calls + 1))
    assert server.stats()["labelling_calls"] == agent.calls


# ── the details of each format ─────────────────────────────────────────────────────────────
def test_wire_details_of_both_formats(teacher):
    server = teacher()
    messages = opening(page_size=7)
    reply = openai.OpenAI(base_url=server.base_url, api_key="k").chat.completions.create(
        model="any-model", messages=messages, tools=TOOLS)
    assert reply.model == "any-model" and reply.system_fingerprint == FINGERPRINT
    assert reply.choices[0].finish_reason == "tool_calls"
    body = len(json.dumps({"model": "any-model", "messages": messages, "tools": TOOLS}))
    assert 0.8 < reply.usage.prompt_tokens / (body / 4) < 1.2  # ≈ characters / 4
    assert reply.usage.completion_tokens > 5

    client = anthropic.Anthropic(base_url=server.url, api_key="k")
    system, msgs = to_anthropic(messages)
    message = client.messages.create(model="claude-any", max_tokens=64, system=system,
                                     messages=msgs, tools=[{"name": "sql", "input_schema":
                                                            SQL_SCHEMA}])
    assert message.model == "claude-any" and message.stop_reason == "tool_use"
    text, use = message.content
    assert text.type == "text" and '"after_id": null' in text.text
    assert use.type == "tool_use" and use.name == "sql" and use.id.startswith("toolu_")
    assert use.input == {"query": "SELECT id, title FROM articles ORDER BY id LIMIT 7"}
    u = message.usage
    assert u.input_tokens > 50 and u.output_tokens > 5
    assert (u.cache_read_input_tokens, u.cache_creation_input_tokens) == (0, 0)

    # the real event sequence, as the SDK sees it
    with client.messages.stream(model="claude-any", max_tokens=64, system=system,
                                messages=msgs) as stream:
        events = [e.type for e in stream if e.type in (
            "message_start", "content_block_start", "content_block_delta",
            "content_block_stop", "message_delta", "message_stop")]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-2:] == ["message_delta", "message_stop"]
    assert events.count("content_block_start") == events.count("content_block_stop") == 2
    assert final.content[1].input == use.input and final.usage.output_tokens > 5

    # both SDKs list the models; a body that is not JSON is a 400 in the route's shape
    assert [m.id for m in client.models.list().data] == ["simulated-teacher"]
    bad = httpx.post(f"{server.url}/v1/messages", headers={"x-api-key": "k"}, content=b"{no")
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"

    # no <slice>: a plain answer; query strings are ignored; every answer is announced
    raw = httpx.post(f"{server.url}/v1/messages?beta=true", headers={"x-api-key": "k"}, json={
        "model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    assert raw.status_code == 200 and raw.json()["content"][0]["type"] == "text"
    assert raw.headers["x-posttrain-simulated"] == "true"
