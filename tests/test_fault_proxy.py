"""The fault-injecting proxy (agents/teacher/fault_proxy.py) in front of the real simulated
teacher, driven by the official `openai` and `anthropic` SDKs: each fault reaches the SDK as
the error a real provider's would, a clean profile changes nothing, and no key is logged."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import anthropic
import openai
import pytest

from agents.providers import to_provider_error
from agents.teacher.fault_proxy import FaultProxy
from tests.teacher_helpers import TOOLS, opening

KEY = "sk-test-fault-proxy-0d1c7e"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def proxied(teacher, tmp_path):
    """(teacher, proxy): a clean teacher (no faults of its own) behind a started proxy."""
    server = teacher()
    with FaultProxy(server.base_url, seed=0, log_path=tmp_path / "proxy.jsonl") as proxy:
        yield server, proxy


def openai_client(base_url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, **kw)


def anthropic_client(proxy: FaultProxy) -> anthropic.Anthropic:
    # the Anthropic SDK wants the root; the proxy forwards any path of the upstream host
    return anthropic.Anthropic(base_url=proxy.url.removesuffix("/v1"), api_key=KEY,
                               max_retries=0)


def chat(client: openai.OpenAI):
    return client.chat.completions.create(model="sim", messages=opening(), tools=TOOLS)


def message(client: anthropic.Anthropic):
    return client.messages.create(model="claude-sim", max_tokens=256, system=opening()[0][
        "content"], messages=[{"role": "user", "content": opening()[1]["content"]}])


def test_url_keeps_the_upstream_path(proxied):
    server, proxy = proxied
    assert proxy.url == f"http://127.0.0.1:{proxy.port}/v1"
    assert server.base_url.endswith("/v1") and proxy.port != server.port


def test_429_is_answered_by_the_proxy_with_retry_after(proxied):
    server, proxy = proxied
    proxy.set_profile(rate_429=1, retry_after_s=2.5)
    with pytest.raises(openai.RateLimitError) as oa:
        chat(openai_client(proxy.url))
    with pytest.raises(anthropic.RateLimitError) as an:
        message(anthropic_client(proxy))
    for e in (oa.value, an.value):
        assert e.response.headers["retry-after"] == "2.5"
        assert e.response.headers["retry-after-ms"] == "2500"
        # what posttrain's gateway makes of it: throttle and wait the server's time
        err = to_provider_error(e)
        assert err.kind == "rate_limited" and err.retryable and err.retry_after == 2.5
    assert oa.value.code == "rate_limit_exceeded"  # the OpenAI error shape, read by both SDKs
    assert an.value.body["error"]["code"] == "rate_limit_exceeded"
    assert server.stats()["requests"] == 0  # never forwarded
    assert proxy.snapshot() == {"requests": 2, "forwarded": 0, "fault_429": 2, "fault_500": 0,
                                "fault_truncated": 0, "fault_not_json": 0,
                                "upstream_errors": 0}


def test_500_is_an_internal_server_error(proxied):
    server, proxy = proxied
    proxy.set_profile(rate_500=1)
    with pytest.raises(openai.InternalServerError) as oa:
        chat(openai_client(proxy.url))
    with pytest.raises(anthropic.InternalServerError):
        message(anthropic_client(proxy))
    assert oa.value.status_code == 500 and to_provider_error(oa.value).kind == "server"
    assert server.stats()["requests"] == 0
    assert proxy.stats["fault_500"] == 2


def test_truncated_body_is_a_connection_error(proxied):
    server, proxy = proxied
    proxy.set_profile(rate_truncated=1)
    with pytest.raises(openai.APIConnectionError) as oa:
        chat(openai_client(proxy.url))
    with pytest.raises(anthropic.APIConnectionError):
        message(anthropic_client(proxy))
    assert to_provider_error(oa.value).kind == "connection"
    assert server.stats()["requests"] == 2  # forwarded: the teacher did answer
    stats = proxy.snapshot()
    assert stats["forwarded"] == 2 and stats["fault_truncated"] == 2


def test_truncated_body_on_the_aiohttp_transport(proxied):
    """posttrain's agents use the async clients on aiohttp: the short read is an error there
    too, not a half reply."""
    _, proxy = proxied
    proxy.set_profile(rate_truncated=1)

    async def go():
        async with openai.AsyncOpenAI(base_url=proxy.url, api_key=KEY, max_retries=0,
                                      http_client=openai.DefaultAioHttpClient()) as client:
            await client.chat.completions.create(model="sim", messages=opening(), tools=TOOLS)

    with pytest.raises(openai.APIConnectionError) as e:
        asyncio.run(go())
    assert to_provider_error(e.value).retryable


def test_not_json_body_raises_a_decode_error_in_both_sdks(proxied):
    """Status 200, content-type application/json, an HTML body: both SDKs raise the JSON
    decoder's ValueError (not an SDK error class); posttrain reads it as `malformed`, which its
    gateway retries."""
    server, proxy = proxied
    proxy.set_profile(rate_not_json=1)
    with pytest.raises(json.JSONDecodeError) as oa:
        chat(openai_client(proxy.url))
    with pytest.raises(json.JSONDecodeError):
        message(anthropic_client(proxy))
    err = to_provider_error(oa.value)
    assert err.kind == "malformed" and err.retryable
    raw = openai_client(proxy.url).chat.completions.with_raw_response.create(
        model="sim", messages=opening(), tools=TOOLS)
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json"
    assert raw.http_response.text == "<html>upstream hiccup</html>"
    assert server.stats()["requests"] == 3 and proxy.stats["fault_not_json"] == 3


def test_clean_profile_answers_as_the_teacher_does(proxied):
    server, proxy = proxied
    proxy.set_profile()  # all rates 0
    direct_o, via_o = chat(openai_client(server.base_url)), chat(openai_client(proxy.url))
    direct_a = message(anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0))
    via_a = message(anthropic_client(proxy))
    assert via_o.model_dump() == direct_o.model_dump()
    assert via_a.model_dump() == direct_a.model_dump()
    assert via_o.choices[0].message.tool_calls  # a real labelling answer, not an error
    models = openai_client(proxy.url).models.list()
    assert [m.id for m in models.data] == [m.id for m in
                                          openai_client(server.base_url).models.list().data]
    assert proxy.snapshot()["forwarded"] == 3 and server.stats()["requests"] == 4


def test_log_has_one_line_per_request_and_never_the_key(proxied, tmp_path):
    _, proxy = proxied
    raw = openai_client(proxy.url).chat.completions.with_raw_response.create(
        model="sim", messages=opening(), tools=TOOLS)
    sent = raw.http_response.request.content  # the body the SDK sent, as it sent it
    for profile in ({}, {"rate_429": 1}, {"rate_500": 1}, {"rate_truncated": 1},
                    {"rate_not_json": 1}):
        proxy.set_profile(**profile)
        for call in (lambda: chat(openai_client(proxy.url)),
                     lambda: message(anthropic_client(proxy))):
            try:
                call()
            except (openai.APIError, anthropic.APIError, ValueError):
                pass
    text = (tmp_path / "proxy.jsonl").read_text()
    assert KEY not in text and "Bearer" not in text and "x-api-key" not in text
    lines = [json.loads(x) for x in text.splitlines()]
    assert len(lines) == 11
    assert all(set(x) == {"t", "path", "fault", "status", "request_sha256"} for x in lines)
    assert [x["fault"] for x in lines] == [None, None, None, "429", "429", "500", "500",
                                           "truncated", "truncated", "not_json", "not_json"]
    assert [x["status"] for x in lines] == [200] * 3 + [429, 429, 500, 500] + [200] * 4
    assert {x["path"] for x in lines} == {"/v1/chat/completions", "/v1/messages"}
    # the hash is of the request body: the same call repeated hashes alike, whatever its fate
    assert lines[0]["request_sha256"] == hashlib.sha256(sent).hexdigest()
    assert {x["request_sha256"] for x in lines if x["path"] == "/v1/chat/completions"} == {
        lines[0]["request_sha256"]}


def test_faults_are_seeded(teacher):
    server = teacher()

    def sequence(seed: int) -> list[str]:
        with FaultProxy(server.base_url, seed=seed) as proxy:
            proxy.set_profile(rate_429=0.3, rate_500=0.3)
            seen = []
            for _ in range(30):
                request = urllib.request.Request(proxy.url + "/models",
                                                 headers={"Authorization": f"Bearer {KEY}"})
                try:
                    with urllib.request.urlopen(request, timeout=10) as r:
                        seen.append(str(r.status))
                except urllib.error.HTTPError as e:
                    seen.append(str(e.code))
            return seen

    first = sequence(7)
    assert first == sequence(7) and first != sequence(8)
    assert {"200", "429", "500"} <= set(first)


def test_unreachable_upstream_is_a_502(tmp_path):
    from tests.servers import free_port

    log = tmp_path / "down.jsonl"
    with FaultProxy(f"http://127.0.0.1:{free_port()}/v1", log_path=log) as proxy:
        with pytest.raises(openai.InternalServerError) as e:
            chat(openai_client(proxy.url))
        assert e.value.status_code == 502
        assert proxy.snapshot()["upstream_errors"] == 1
    assert json.loads(log.read_text())["fault"] == "upstream_error"


def test_rates_are_checked(proxied):
    _, proxy = proxied
    with pytest.raises(ValueError):
        proxy.set_profile(rate_429=0.7, rate_500=0.5)
    with pytest.raises(ValueError):
        proxy.set_profile(rate_truncated=-0.1)


def test_command_line_prints_the_url_and_serves(teacher, tmp_path):
    server = teacher()
    log = tmp_path / "cli.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "agents.teacher.fault_proxy", "--upstream",
                             server.base_url, "--rate-429", "1", "--retry-after", "3",
                             "--log", str(log)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        with pytest.raises(openai.RateLimitError) as e:
            chat(openai_client(url))
        assert e.value.response.headers["retry-after"] == "3"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert json.loads(err.strip().splitlines()[-1])["fault_429"] == 1
    assert KEY not in log.read_text()
