"""Faults the simulated teacher injects, on the first attempt of a request only: 429, 500 and
529 statuses (with retry-after), timeouts and truncated bodies, each followed by a retry that
succeeds, through both SDKs."""

from __future__ import annotations

import json
from collections import Counter

import anthropic
import httpx2
import openai
import pytest

from tests.teacher_helpers import Agent, anthropic_caller, logged, openai_caller, opening


# ── faults: only the first attempt of a request ────────────────────────────────────────────
@pytest.mark.parametrize("knob, sdk, error, status", [
    ("fault_429_rate", "openai", openai.RateLimitError, 429),
    ("fault_429_rate", "anthropic", anthropic.RateLimitError, 429),
    ("fault_500_rate", "openai", openai.InternalServerError, 500),
    ("fault_500_rate", "anthropic", anthropic.InternalServerError, 500),
    ("fault_529_rate", "openai", openai.InternalServerError, 503),
    ("fault_529_rate", "anthropic", anthropic.OverloadedError, 529),
])
def test_status_faults_then_the_retry_succeeds(teacher, engine, knob, sdk, error, status):
    server = teacher(**{knob: 1.0}, retry_after_s=2.5)
    call = (openai_caller if sdk == "openai" else anthropic_caller)(server)
    messages = opening()
    with pytest.raises(error) as raised:
        call(messages)
    assert raised.value.status_code == status
    if status == 429:
        assert raised.value.response.headers["retry-after"] == "2.5"
        assert raised.value.response.headers["retry-after-ms"] == "2500"
    _, calls = call(messages)  # the same request again: attempt 2 is answered
    assert calls[0][1] == "sql"
    log = logged(server)
    assert [(x["attempt"], x["fault"] is None) for x in log] == [(1, False), (2, True)]
    assert log[0]["request_hash"] == log[1]["request_hash"]
    assert server.stats()["retries"] == 1


def test_the_sdk_retries_a_429_on_its_own(teacher, engine, gold):
    server = teacher(fault_429_rate=0.5, retry_after_s=0.01)
    agent = Agent(engine, openai_caller(server, max_retries=2), page_size=50).run()
    assert agent.accepted == gold
    faults = [x for x in logged(server) if x["fault"]]
    assert faults and all(x["fault"] == "rate_limited" and x["attempt"] == 1 for x in faults)


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_timeout_fault(teacher, sdk):
    server = teacher(timeout_rate=1.0, timeout_s=5)
    call = (openai_caller if sdk == "openai" else anthropic_caller)(server, timeout=0.25)
    error = openai.APITimeoutError if sdk == "openai" else anthropic.APITimeoutError
    with pytest.raises(error):
        call(opening())
    assert call(opening())[1][0][1] == "sql"
    assert [x["fault"] for x in logged(server)] == ["timeout", None]


def test_truncated_bodies(teacher):
    server = teacher(truncated_rate=1.0)
    oc = openai_caller(server)
    # a cut body: a connection error (the SDK's, or httpx's mid-stream); bad JSON: the
    # SDK's own json.loads fails
    broken = (openai.APIConnectionError, anthropic.APIConnectionError, json.JSONDecodeError,
              httpx2.RemoteProtocolError)
    for i in range(6):
        for call in (oc, anthropic_caller(server), anthropic_caller(server, stream=True)):
            messages = opening(page_size=10 + i)
            with pytest.raises(broken):
                call(messages)
            assert call(messages)[1][0][1] == "sql"  # the retry gets the whole body
    faults = Counter(x["fault"] for x in logged(server))
    assert faults[None] == 18 and faults["truncated:cut"] > 0 and faults["truncated:bad_json"] > 0
