"""The simulated teacher's server and its configuration: the auth styles of both SDKs and the
401s in each route's shape, the request log, and the knobs (strict, described, the realistic
profile filling the ones not given)."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from pydantic import ValidationError

from agents.teacher import TeacherConfig, TeacherKnobs
from agents.teacher.config import REALISTIC
from tests.teacher_helpers import LABELS, logged, openai_caller, opening


# ── auth, in each SDK's style ──────────────────────────────────────────────────────────────
def test_auth_styles_and_401_shapes(teacher):
    server = teacher(api_key="right")
    hi = [{"role": "user", "content": "hello"}]
    assert openai.OpenAI(base_url=server.base_url, api_key="right").chat.completions.create(
        model="m", messages=hi).choices[0].message.content
    for client in (anthropic.Anthropic(base_url=server.url, api_key="right"),
                   anthropic.Anthropic(base_url=server.url, auth_token="right")):
        assert client.messages.create(model="m", max_tokens=5, messages=hi).content
    ok = httpx.post(f"{server.base_url}/chat/completions", headers={"x-api-key": "right"},
                    json={"model": "m", "messages": hi})
    assert ok.status_code == 200

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model="m", max_tokens=5, messages=hi)
    o = httpx.post(f"{server.base_url}/chat/completions", json={})
    a = httpx.post(f"{server.url}/v1/messages", headers={"authorization": "Bearer wrong"},
                   json={})
    assert o.status_code == a.status_code == 401
    assert o.json()["error"]["code"] == "invalid_api_key" and o.json()["error"]["type"]
    assert a.json()["type"] == "error" and a.json()["error"]["type"] == "authentication_error"
    assert o.headers["x-posttrain-simulated"] == a.headers["x-posttrain-simulated"] == "true"
    assert server.stats()["unauthorised"] == 4


# ── the knobs, the log ─────────────────────────────────────────────────────────────────────
def test_knobs_are_strict_and_described(small_warehouse_url):
    for name, field in TeacherKnobs.model_fields.items():
        assert field.description, name
    with pytest.raises(ValidationError):
        TeacherKnobs(eror_rate=0.1)
    with pytest.raises(ValidationError):
        TeacherKnobs(fault_429_rate=0.6, fault_500_rate=0.6)
    legacy = TeacherConfig(small_warehouse_url, "articles", "id", "topic", LABELS,
                           error_rate=0.1, off_spec_rate=0.05, seed=7)
    assert (legacy.knobs.error_rate, legacy.knobs.off_spec_rate, legacy.knobs.seed) == (
        0.1, 0.05, 7)
    with pytest.raises(ValueError, match="identifier"):
        TeacherConfig(small_warehouse_url, "articles; drop", "id", "topic", LABELS)


def test_request_log_lines(teacher, engine):
    server = teacher(latency_ms=5)
    call = openai_caller(server)
    call(opening())
    call([{"role": "user", "content": opening()[1]["content"]}])  # no pinned system prompt
    call([{"role": "user", "content": "hello"}])
    lines = logged(server)
    assert set(lines[0]) == {
        "time", "api", "route", "model", "request_hash", "attempt", "kind", "fault", "misuse",
        "style", "n_messages", "context_tokens", "pinned_present", "labelling_calls_so_far"}
    assert [x["pinned_present"] for x in lines] == [True, False, None]
    assert [x["kind"] for x in lines] == ["label", "label", "other"]
    assert [x["labelling_calls_so_far"] for x in lines] == [1, 2, 2]
    assert lines[0]["route"] == "/v1/chat/completions" and lines[0]["context_tokens"] > 50
    assert len({x["request_hash"] for x in lines}) == 3
    stats = server.stats()
    assert stats["requests"] == 3 and stats["kind:label"] == 2 and stats["kind:other"] == 1


def test_realistic_profile_fills_the_knobs_not_given(small_warehouse_url):
    knobs = TeacherKnobs(profile="realistic")
    assert {k: getattr(knobs, k) for k in REALISTIC} == REALISTIC
    assert REALISTIC["think_rate"] == 0.5 and REALISTIC["string_id_rate"] == 0.3
    assert knobs.misuse_rate == 0 and knobs.read_chars == 600  # not in the profile: defaults
    mine = TeacherKnobs.model_validate({"profile": "realistic", "error_rate": 0.05, "seed": 3})
    assert mine.error_rate == 0.05 and mine.seed == 3 and mine.think_rate == 0.5
    assert TeacherKnobs.model_validate(mine.model_dump()) == mine  # a dump round-trips
    assert TeacherKnobs().think_rate == 0 and TeacherKnobs().profile == "custom"
    config = TeacherConfig(small_warehouse_url, "articles", "id", "topic", LABELS,
                           knobs={"profile": "realistic", "empty_rate": 0.0}, error_rate=0.2)
    assert (config.knobs.error_rate, config.knobs.empty_rate, config.knobs.prose_rate) == (
        0.2, 0.0, 0.01)
    with pytest.raises(ValidationError):
        TeacherKnobs(profile="sloppy")
    with pytest.raises(ValidationError, match="empty_rate"):
        TeacherKnobs(prose_rate=0.5, empty_rate=0.6)
