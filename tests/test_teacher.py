"""The simulated teacher over real HTTP, through the official `openai` and `anthropic` SDKs,
against the real SQLite warehouse of BBC articles.

A small agent stand-in (`Agent` below) plays the agent loop's part: it keeps the
conversation in neutral messages, runs the `sql` and `submit_examples` tools on the
warehouse (simple SELECTs only; a mini gate that, like agents.gates, takes "42" for row 42
and wants labels spelled exactly), nudges after prose or an empty reply, and can prune its
memory down to the pinned messages plus the last turn. Arguments in a ```json fence are an
error unless it is told to strip them (`strip_fences`).
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter

import anthropic
import httpx
import httpx2
import openai
import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from agents.skills import load_skill
from agents.teacher import FINGERPRINT, TeacherConfig, TeacherKnobs, TeacherServer
from agents.teacher.config import REALISTIC
from agents.teacher.slips import case_variant

LABELS = ["business", "entertainment", "politics", "sports", "tech"]
PINNED = "Follow the skill.\n\n## Your task (pinned)\nLabel a BBC article with its topic."
SQL_SCHEMA = {"type": "object", "properties": {"query": {"type": "string"}},
              "required": ["query"]}
SUBMIT_SCHEMA = {"type": "object", "properties": {"examples": {"type": "array"}},
                 "required": ["examples"]}
TOOLS = [{"type": "function", "function": {"name": n, "description": n, "parameters": p}}
         for n, p in (("sql", SQL_SCHEMA), ("submit_examples", SUBMIT_SCHEMA))]
# what this test's stand-in agent lets through: the teacher's paging query, reading whole
# columns or (the default, `read_chars`) the lead of each one
SAFE_SQL = re.compile(r"^SELECT id(, (\w+|substr\(CAST\(\w+ AS TEXT\), 1, \d+\) AS \w+))* "
                      r"FROM articles( WHERE id > \d+)? ORDER BY id LIMIT \d+$")


@pytest.fixture(scope="module")
def gold(engine) -> dict[int, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text("SELECT id, topic FROM articles ORDER BY id")).all())


@pytest.fixture
def teacher(small_warehouse_url, tmp_path):
    """teacher(**knobs) -> a started TeacherServer (stopped after the test); log at .log."""
    started = []

    def start(api_key=None, **knobs) -> TeacherServer:
        knobs.setdefault("read_chars", None)  # exact paging queries below read whole columns
        log = tmp_path / f"requests-{len(started)}.jsonl"
        server = TeacherServer(TeacherConfig(
            small_warehouse_url, "articles", "id", "topic", LABELS, knobs=TeacherKnobs(**knobs),
            api_key=api_key, request_log=str(log)))
        server.start()
        server.log = log
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def logged(server) -> list[dict]:
    return [json.loads(line) for line in server.log.read_text().splitlines()]


def opening(page_size=25, **extra) -> list[dict]:
    block = {"slice_id": "all", "table": "articles", "columns": ["id", "title"],
             "id_column": "id", "rows": 200, "labels": LABELS, "page_size": page_size, **extra}
    return [{"role": "system", "content": PINNED},
            {"role": "user", "content": f"Label every row.\n<slice>\n{json.dumps(block)}\n</slice>"}]


# ── the two SDKs, behind one neutral call ──────────────────────────────────────────────────
def openai_caller(server, stream=False, **client_kw):
    client = openai.OpenAI(base_url=server.base_url, api_key="k", **{"max_retries": 0,
                                                                    **client_kw})

    def call(messages):
        if not stream:
            m = client.chat.completions.create(model="sim", messages=messages,
                                               tools=TOOLS).choices[0].message
            return m.content, [(c.id, c.function.name, c.function.arguments)
                               for c in m.tool_calls or []]
        text, calls = "", {}
        for chunk in client.chat.completions.create(model="sim", messages=messages, tools=TOOLS,
                                                    stream=True):
            delta = chunk.choices[0].delta if chunk.choices else None
            text += (delta.content or "") if delta else ""
            for c in (delta.tool_calls or []) if delta else []:
                slot = calls.setdefault(c.index, ["", "", ""])
                slot[0] = c.id or slot[0]
                slot[1] = (c.function.name or slot[1]) if c.function else slot[1]
                slot[2] += (c.function.arguments or "") if c.function else ""
        return text or None, [tuple(v) for _, v in sorted(calls.items())]

    return call


def to_anthropic(messages: list[dict]) -> tuple[str, list[dict]]:
    """Neutral messages -> (system, Anthropic messages): tool_use and tool_result blocks."""
    system, out = "", []
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "assistant":
            blocks = [{"type": "text", "text": m["content"]}] if m.get("content") else []
            blocks += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                        "input": _input(c["function"]["arguments"])}
                       for c in m.get("tool_calls") or []]
            out.append({"role": "assistant", "content": blocks})
        elif m["role"] == "tool":
            block = {"type": "tool_result", "tool_use_id": m["tool_call_id"],
                     "content": m["content"]}
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                out[-1]["content"].append(block)
            else:
                out.append({"role": "user", "content": [block]})
        else:
            out.append({"role": "user", "content": m["content"]})
    return system, out


def _input(arguments: str):
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return {"_malformed": arguments}


def anthropic_caller(server, stream=False, **client_kw):
    client = anthropic.Anthropic(base_url=server.url, api_key="k", max_retries=0, **client_kw)
    tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
              "input_schema": t["function"]["parameters"]} for t in TOOLS]

    def call(messages):
        system, msgs = to_anthropic(messages)
        kw = {"model": "claude-sim", "max_tokens": 1024, "system": system, "messages": msgs,
              "tools": tools}
        if stream:
            with client.messages.stream(**kw) as s:
                reply = s.get_final_message()
        else:
            reply = client.messages.create(**kw)
        assert reply.stop_reason in ("tool_use", "end_turn")
        text = "".join(b.text for b in reply.content if b.type == "text")
        calls = [(b.id, b.name, b.input if isinstance(b.input, str) else json.dumps(b.input))
                 for b in reply.content if b.type == "tool_use"]
        return text or None, calls

    return call


# ── a stand-in for the agent loop ──────────────────────────────────────────────────────────
class Agent:
    def __init__(self, engine, call, *, keep_last: int | None = None, page_size=25,
                 strip_fences=False, **extra):
        self.engine, self.call, self.keep_last = engine, call, keep_last
        self.strip_fences = strip_fences
        self.pinned, self.turns = opening(page_size, **extra), []
        self.accepted: dict[int, str] = {}
        self.rejected: Counter[str] = Counter()
        self.submitted: list[list[dict]] = []  # per submit call, in order
        self.tool_errors = self.calls = self.nudges = 0
        self.done = False

    def messages(self) -> list[dict]:
        if self.keep_last is None or len(self.turns) <= self.keep_last:
            return self.pinned + [m for turn in self.turns for m in turn]
        note = {"role": "user", "content": f"[memory] {len(self.turns) - self.keep_last} "
                "earlier turns were pruned."}
        return self.pinned + [note] + [m for t in self.turns[-self.keep_last:] for m in t]

    def run(self, max_calls=80) -> Agent:
        while not self.done and self.calls < max_calls:
            self.step()
        return self

    def step(self) -> None:
        self.calls += 1
        text, calls = self.call(self.messages())
        said = {"role": "assistant", "content": text}
        if not calls:
            if len(self.accepted) < 200 and self.nudges < 20 and (
                    not text or "<progress>" in text and '"done": true' not in text):
                self.nudges += 1
                self.turns.append([said, {"role": "user", "content": "Continue with the tools."}])
            else:
                self.done = True
            return
        said["tool_calls"] = [{"id": i, "type": "function",
                               "function": {"name": n, "arguments": a}} for i, n, a in calls]
        answers = [{"role": "tool", "tool_call_id": i,
                    "content": json.dumps(self.sql(a) if n == "sql" else self.submit(a))}
                   for i, n, a in calls]
        self.turns.append([said, *answers])

    def error(self, kind, message) -> dict:
        self.tool_errors += 1
        return {"error": kind, "message": message}

    def parse(self, arguments: str):
        if self.strip_fences:
            found = re.fullmatch(r"```(?:json)?\n(.*)\n```", arguments.strip(), re.DOTALL)
            arguments = found.group(1) if found else arguments
        return json.loads(arguments)

    def sql(self, arguments: str) -> dict:
        try:
            args = self.parse(arguments)
        except json.JSONDecodeError as e:
            return self.error("invalid_arguments", f"arguments are not valid JSON: {e}")
        if not isinstance(args, dict) or set(args) != {"query"} or not isinstance(
                args["query"], str):
            return self.error("invalid_arguments", "expected exactly {query: string}")
        if not SAFE_SQL.match(args["query"]):
            return self.error("sql_rejected", "only a plain SELECT of your table is allowed")
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(sa.text(args["query"])).mappings()]
        return {"rows": rows, "row_count": len(rows), "truncated": False}

    def submit(self, arguments: str) -> dict:
        try:
            examples = self.parse(arguments)["examples"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            return self.error("invalid_arguments", f"not a submission: {e}")
        self.submitted.append(examples)
        accepted, rejected = 0, []
        for e in examples:
            row = int(e["row_id"])  # the gate takes "42" for row 42 too
            reason = ("label_not_in_set" if e["label"] not in LABELS
                      else "duplicate" if row in self.accepted else None)
            if reason:
                self.rejected[reason] += 1
                rejected.append({"row_id": e["row_id"], "reason": reason, "message": reason})
            else:
                self.accepted[row] = e["label"]
                accepted += 1
        return {"accepted": accepted, "rejected": rejected}


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


# ── label noise, drift, bias ───────────────────────────────────────────────────────────────
def test_off_spec_labels_are_fixed_and_noise_is_deterministic(teacher, engine, gold):
    server = teacher(off_spec_rate=0.2, error_rate=0.2, seed=5)
    first = Agent(engine, openai_caller(server), keep_last=4).run()
    again = Agent(engine, anthropic_caller(server), keep_last=2).run()
    assert first.accepted == again.accepted and set(first.accepted) == set(gold)
    assert first.rejected == {"label_not_in_set": first.rejected["label_not_in_set"]}
    assert 20 < first.rejected["label_not_in_set"] < 60  # ≈ 0.2 of 200, then fixed
    wrong = sum(first.accepted[i] != gold[i] for i in gold)
    assert 20 < wrong < 60  # ≈ 0.2 of 200 wrong but valid


def test_drift_switches_at_the_configured_call_count(teacher, engine, gold):
    server = teacher(drift_after_calls=6, drift_error_rate=1.0)
    agent = Agent(engine, openai_caller(server), page_size=20).run()
    # calls alternate read, submit: submits are calls 2, 4, 6, ... (indices 1, 3, 5, ...)
    right = [all(e["label"] == gold[e["row_id"]] for e in batch) for batch in agent.submitted]
    wrong = [all(e["label"] != gold[e["row_id"]] for e in batch) for batch in agent.submitted]
    assert right == [True, True, True] + [False] * 7 and wrong[3:] == [True] * 7
    assert server.stats()["drifted"] == agent.calls - 6


def test_bias_over_represents_the_favoured_labels(teacher, engine, gold):
    server = teacher(bias_labels=["tech"], bias_factor=4.0, seed=1)
    agent = Agent(engine, openai_caller(server)).run()
    per_label = Counter(agent.accepted.values())
    assert per_label["tech"] == 40  # every tech row
    others = [per_label[x] / 40 for x in LABELS if x != "tech"]
    assert 0.15 < sum(others) / len(others) < 0.35  # the rest ≈ 1/4 of theirs
    assert agent.done and agent.nudges == 0


def test_a_top_up_submits_only_the_wanted_labels_without_bias(teacher, engine, gold):
    server = teacher(bias_labels=["tech"], bias_factor=10.0)
    agent = Agent(engine, openai_caller(server), want_labels=["business", "politics"]).run()
    assert agent.accepted == {i: g for i, g in gold.items() if g in ("business", "politics")}


# ── tool misuse, malformed arguments, prose ────────────────────────────────────────────────
def test_misuse_and_malformed_calls_come_at_their_rates_and_are_logged(teacher, engine, gold):
    server = teacher(misuse_rate=0.3, malformed_rate=0.2, seed=2)
    agent = Agent(engine, openai_caller(server), page_size=5, keep_last=4).run(max_calls=300)
    assert agent.accepted == gold and agent.done  # it always recovers
    slips = [x["misuse"] for x in logged(server) if x["misuse"]]
    misuse = [s for s in slips if s["kind"] == "misuse"]
    malformed = [s for s in slips if s["kind"] == "malformed"]
    reads = sum(1 for t in agent.turns for c in t[0].get("tool_calls") or []
                if c["function"]["name"] == "sql")
    # each slip is followed by one recovery read, which never slips
    assert 0.15 < len(misuse) / (reads - len(slips)) < 0.45
    assert 0.08 < len(malformed) / (agent.calls - len(slips) - 1) < 0.35
    assert agent.tool_errors == len(slips)
    assert len({s["variant"] for s in misuse}) >= 5  # a varied list
    assert all(s["emitted"] for s in slips)
    # a slip is never followed by another: the teacher recovers first
    flags = [x["misuse"] is not None for x in logged(server)]
    assert not any(a and b for a, b in itertools.pairwise(flags))
    stats = server.stats()
    assert sum(v for k, v in stats.items() if k.startswith("misuse:")) == len(misuse)


def test_malformed_tool_input_on_the_anthropic_route(teacher):
    server = teacher(malformed_rate=1.0)
    system, msgs = to_anthropic(opening())
    kw = {"model": "m", "max_tokens": 64, "system": system, "messages": msgs,
          "tools": [{"name": "sql", "input_schema": SQL_SCHEMA}]}
    client = anthropic.Anthropic(base_url=server.url, api_key="k")
    use = client.messages.create(**kw).content[1]
    with client.messages.stream(**kw) as stream:
        streamed = stream.get_final_message().content[1]
    # tool input that is not a JSON object: the arguments text, as a string
    for block in (use, streamed):
        assert isinstance(block.input, str) and block.input.startswith("{")
        with pytest.raises(json.JSONDecodeError):
            json.loads(block.input)


def test_prose_replies_continue_after_a_nudge(teacher, engine, gold):
    server = teacher(prose_rate=0.3, seed=4)
    agent = Agent(engine, openai_caller(server), page_size=20, keep_last=4).run(max_calls=100)
    assert agent.accepted == gold and agent.nudges > 0
    prose = [x for x in logged(server) if (x["misuse"] or {}).get("kind") == "prose"]
    assert 0 <= len(prose) - agent.nudges <= 1  # prose after the last row just ends the run


# ── paging under pruned memory ─────────────────────────────────────────────────────────────
@pytest.mark.parametrize("knobs", [{}, {"off_spec_rate": 0.3, "misuse_rate": 0.2,
                                        "malformed_rate": 0.1, "prose_rate": 0.1, "seed": 9}])
def test_paging_survives_pruning_to_the_pinned_messages_and_the_last_turn(
        teacher, engine, gold, knobs):
    server = teacher(**knobs)
    agent = Agent(engine, anthropic_caller(server), keep_last=1, page_size=15).run(150)
    assert agent.accepted == gold and agent.done
    assert agent.rejected["duplicate"] == 0  # no row was submitted twice
    assert all(x["n_messages"] <= 5 for x in logged(server))


def test_a_reanchored_agent_resumes_after_the_noted_id(teacher, gold):
    server = teacher()
    resumed = opening() + [{"role": "user", "content": '[memory] Re-anchored. '
                            '{"resume_after_id": 57} then {"resume_after_id": 120}'}]
    _, calls = openai_caller(server)(resumed)
    assert json.loads(calls[0][2]) == {
        "query": "SELECT id, title FROM articles WHERE id > 120 ORDER BY id LIMIT 25"}


# ── the other roles, as structured output ──────────────────────────────────────────────────
def test_judge_through_both_structured_output_styles(teacher, gold):
    server = teacher(judge_error_rate=0.25, seed=3)
    ids = list(gold)[:40]
    items = [{"row_id": i, "label": gold[i] if n % 2 else "tech", "text": "..."}
             for n, i in enumerate(ids)]
    ask = [{"role": "system", "content": "Review."}, {"role": "user", "content":
           f"<review>{json.dumps({'labels': LABELS, 'items': items})}</review>"}]
    schema = {"type": "object", "properties": {"verdicts": {"type": "array"}},
              "required": ["verdicts"]}
    reply = openai.OpenAI(base_url=server.base_url, api_key="k").chat.completions.create(
        model="m", messages=ask, response_format={"type": "json_schema", "json_schema": {
            "name": "verdicts", "schema": schema}})
    via_openai = json.loads(reply.choices[0].message.content)
    message = anthropic.Anthropic(base_url=server.url, api_key="k").messages.create(
        model="m", max_tokens=4096, system="Review.", messages=ask[1:],
        output_config={"format": {"type": "json_schema", "schema": schema}})
    assert message.content[0].type == "text"
    assert json.loads(message.content[0].text) == via_openai  # seeded per row
    verdicts = via_openai["verdicts"]
    assert [v["row_id"] for v in verdicts] == ids
    assert all(v["label"] in LABELS and v["agree"] == (v["label"] == it["label"])
               for v, it in zip(verdicts, items, strict=True))
    mistaken = sum(v["label"] != gold[v["row_id"]] for v in verdicts)
    assert 3 <= mistaken <= 18  # ≈ judge_error_rate of 40
    assert {x["kind"] for x in logged(server)} == {"judge"}
    assert all(x["pinned_present"] is None for x in logged(server))


def test_preference_pairs_and_messages_parse(teacher, gold):
    from pydantic import BaseModel

    class Pair(BaseModel):
        row_id: int
        chosen: str
        rejected: str

    class Pairs(BaseModel):
        pairs: list[Pair]

    server = teacher()
    items = [{"row_id": i, "prompt": f"Title: ...\nTopic:{i}"} for i in list(gold)[:12]]
    block = {"labels": LABELS, "items": items, "completion_template": " {label}\n"}
    parsed = anthropic.Anthropic(base_url=server.url, api_key="k").messages.parse(
        model="m", max_tokens=2048, output_format=Pairs,
        messages=[{"role": "user", "content": f"<pairs>{json.dumps(block)}</pairs>"}],
    ).parsed_output
    assert [p.row_id for p in parsed.pairs] == [i["row_id"] for i in items]
    for p in parsed.pairs:
        assert p.chosen == f" {gold[p.row_id]}\n" and p.rejected != p.chosen
        assert p.rejected.strip() in LABELS


def test_tuner_configs_are_inside_the_bounds(teacher):
    server = teacher(seed=11)
    bounds = {"learning_rate": [1e-5, 1e-2], "max_steps": [50, 800], "warmup": [0.0, 0.2],
              "batch_size": [8, 16, 32]}
    past = [{"config": {"learning_rate": 3e-4, "max_steps": 400, "warmup": 0.1,
                        "batch_size": 16}, "score": 0.8},
            {"config": {"learning_rate": 1e-2, "max_steps": 50, "warmup": 0.0,
                        "batch_size": 8}, "score": 0.3}]
    client = openai.OpenAI(base_url=server.base_url, api_key="k")

    def ask(past_trials):
        block = {"k": 6, "bounds": bounds, "stats": {"rows": 900}, "past_trials": past_trials}
        reply = client.chat.completions.create(model="m", messages=[
            {"role": "user", "content": f"<tune>{json.dumps(block)}</tune>"}])
        return json.loads(reply.choices[0].message.content)["configs"]

    for configs in (ask([]), ask(past)):
        assert len(configs) == 6
        for c in configs:
            assert set(c) == set(bounds)
            assert 1e-5 <= c["learning_rate"] <= 1e-2 and 0.0 <= c["warmup"] <= 0.2
            assert isinstance(c["max_steps"], int) and 50 <= c["max_steps"] <= 800
            assert c["batch_size"] in (8, 16, 32)
    assert ask(past) == ask(past) and ask([]) != ask(past)  # seeded, and it reads the trials
    near = ask(past)[0]
    assert 1e-4 < near["learning_rate"] < 1e-3  # the first one explores near the best trial


# ── the knobs, the log, the skills ─────────────────────────────────────────────────────────
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


@pytest.mark.parametrize("name, contract", [
    ("review-examples", '{"verdicts": [{"row_id"'),
    ("write-preference-pairs", '{"pairs": [{"row_id"'),
    ("propose-training-config", '{"configs": ['),
])
def test_role_skills_load(name, contract):
    skill = load_skill(name)
    assert skill.name == name and "Use when" in skill.description
    assert contract in skill.instructions and "## Output contract" in skill.instructions


# ── single moves, from hand-made conversations ─────────────────────────────────────────────
def _turn(text, name, arguments, result) -> list[dict]:
    return [{"role": "assistant", "content": text, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": name, "arguments": json.dumps(arguments)}}]},
            {"role": "tool", "tool_call_id": "c1", "content": json.dumps(result)}]


def test_a_result_cut_by_the_memory_is_used_as_far_as_it_is_whole(teacher, engine, gold):
    ask = openai_caller(teacher())
    query = "SELECT id, title FROM articles ORDER BY id LIMIT 25"
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.text(query)).mappings()]
    whole = json.dumps({"rows": rows, "row_count": 25, "truncated": False})
    cut = whole[:700] + "…[memory: cut 1800 of 2500 chars to fit the context budget]"
    turn = _turn('<progress>{"after_id": null}</progress>', "sql", {"query": query}, {})
    turn[1]["content"] = cut
    text, calls = ask(opening() + turn)
    seen = json.loads(calls[0][2])["examples"]
    n = len(seen)
    assert 2 < n < 25 and [e["row_id"] for e in seen] == [r["id"] for r in rows[:n]]
    assert f'"last_id": {rows[n - 1]["id"]}' in text and f'"limit": {n}' in text
    # after the submit, the next page starts after the last whole row, that many rows long
    after = _turn(text, "submit_examples", {"examples": seen}, {"accepted": n, "rejected": []})
    _, calls = ask(opening() + after)
    assert json.loads(calls[0][2])["query"] == (
        f"SELECT id, title FROM articles WHERE id > {rows[n - 1]['id']} ORDER BY id LIMIT {n}")


def test_judge_rejections_are_fixed_once_and_finishing_sticks(teacher, gold):
    ask = openai_caller(teacher(error_rate=1.0))
    row = next(iter(gold))
    note = '<progress>{"after_id": 190, "last_id": 200, "short": true, "fix": false}</progress>'
    rejected = {"accepted": 0, "rejected": [{"row_id": row, "reason": "judge_disagreed",
                                             "message": "a reviewer disagreed"}]}
    turn = _turn(note, "submit_examples", {"examples": [{"row_id": row, "label": "x"}]},
                 rejected)
    text, calls = ask(opening() + turn)
    assert json.loads(calls[0][2]) == {"examples": [{"row_id": row, "label": gold[row]}]}
    assert '"fix": true' in text
    again = _turn(text, "submit_examples", json.loads(calls[0][2]), rejected)
    text, calls = ask(opening() + again)  # no second round: the page was short, so done
    assert not calls and '"done": true' in text
    nudged = [{"role": "assistant", "content": text},
              {"role": "user", "content": "12 rows have no label yet. Continue."}]
    text, calls = ask(opening() + nudged)
    assert not calls and '"done": true' in text


def test_a_correct_query_that_fails_ends_in_a_plain_message(teacher):
    ask = openai_caller(teacher())
    query = "SELECT id, title FROM articles WHERE id > 40 ORDER BY id LIMIT 25"
    turn = _turn('<progress>{"after_id": 40}</progress>', "sql", {"query": query},
                 {"error": "sql_error", "message": "database is locked"})
    text, calls = ask(opening() + turn)
    assert not calls and "database is locked" in text


# ── a cheap hosted model's habits, and the realistic profile ───────────────────────────────
FENCED = re.compile(r"^```json\n(.*)\n```$", re.DOTALL)


def test_fenced_arguments_hold_valid_json_and_a_strict_agent_recovers(teacher, engine, gold):
    server = teacher(fenced_json_rate=1.0)
    call = openai_caller(server)
    _, calls = call(opening())
    fenced = FENCED.match(calls[0][2])
    assert calls[0][1] == "sql" and fenced
    assert json.loads(fenced.group(1)) == {
        "query": "SELECT id, title FROM articles ORDER BY id LIMIT 25"}
    # a tool_use input is an object: on the Anthropic route the fence does not survive
    _, use = anthropic_caller(server)(opening())
    assert json.loads(use[0][2]) == json.loads(fenced.group(1))
    # an agent that strips fences labels everything; a strict one gets an error, after which
    # the teacher redoes the page without a fence
    assert Agent(engine, call, page_size=50, strip_fences=True).run().accepted == gold
    strict = Agent(engine, call, page_size=50)
    for _ in range(2):
        strict.step()
    assert strict.tool_errors == 1
    redo = strict.turns[-1][0]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(redo) == {"query": "SELECT id, title FROM articles ORDER BY id LIMIT 50"}
    assert [x["style"] for x in logged(server)][:2] == [["fenced_json"], ["fenced_json"]]


def test_string_ids_are_sent_and_a_fix_uses_the_stored_ids(teacher, engine, gold):
    server = teacher(string_id_rate=1.0, case_error_rate=1.0)
    agent = Agent(engine, openai_caller(server), page_size=40).run()
    assert agent.accepted == gold and agent.rejected == {"label_not_in_set": 200}
    first, fixes = agent.submitted[0::2], agent.submitted[1::2]
    assert all(isinstance(e["row_id"], str) for batch in first for e in batch)
    assert [e["row_id"] for e in first[0]] == [str(i) for i in list(gold)[:40]]
    # the fix round slips nothing: integer ids, the labels spelled right
    assert all(isinstance(e["row_id"], int) and e["label"] == gold[e["row_id"]]
               for batch in fixes for e in batch)
    assert server.stats()["style:string_ids"] == 5 and server.stats()["style:case_error"] == 200


def test_labels_in_the_wrong_case_then_the_right_one_on_the_fix_round(teacher, engine, gold):
    server = teacher(case_error_rate=1.0)
    call = openai_caller(server)
    agent = Agent(engine, call, page_size=50)
    for _ in range(2):
        agent.step()
    first = agent.submitted[0]
    assert all(e["label"] not in LABELS and e["label"].lower() == gold[e["row_id"]]
               for e in first)
    assert len({e["label"] for e in first}) >= 4  # "Tech", "TECH", "Sports", ...
    agent.step()  # the fix round: every rejected row, spelled right, in one call
    assert agent.submitted[1] == [{"row_id": e["row_id"], "label": gold[e["row_id"]]}
                                  for e in first]
    assert agent.run().accepted == gold
    # a spelling no label of the set has; a label without letters is submitted unchanged
    assert case_variant("Tech", ["tech", "Tech", "TECH"], random.Random(0)) == "tECH"
    assert case_variant("42", ["42", "7"], random.Random(0)) == "42"


def test_two_submit_calls_in_one_message_and_both_calls_rejections_are_fixed(
        teacher, engine, gold):
    server = teacher(multi_call_rate=1.0, off_spec_rate=1.0)
    agent = Agent(engine, openai_caller(server), page_size=30)
    for _ in range(2):
        agent.step()
    said = agent.turns[-1][0]
    parts = [json.loads(c["function"]["arguments"])["examples"] for c in said["tool_calls"]]
    assert [c["function"]["name"] for c in said["tool_calls"]] == ["submit_examples"] * 2
    assert [e["row_id"] for e in parts[0] + parts[1]] == list(gold)[:30]
    assert (len(parts[0]), len(parts[1])) == (15, 15)
    assert agent.rejected["label_not_in_set"] == 30  # every row of both calls
    agent.step()  # one fix round, one call, for the rejections of both calls
    fix = agent.turns[-1][0]["tool_calls"]
    assert len(fix) == 1 and [e["row_id"] for e in agent.submitted[-1]] == list(gold)[:30]
    agent.run()
    assert agent.accepted == gold and agent.rejected["duplicate"] == 0
    assert server.stats()["style:multi_call"] == 200 // 30 + 1


def test_think_comes_first_and_the_progress_note_is_still_found(teacher, engine, gold):
    server = teacher(think_rate=1.0)
    agent = Agent(engine, openai_caller(server), page_size=40, keep_last=1).run()
    assert agent.accepted == gold and agent.calls == 2 * 5 + 2 and agent.nudges == 0
    said = [t[0]["content"] for t in agent.turns]
    assert all(re.match(r"<think>[^<]{20,}</think>\n<progress>\{", s) for s in said)
    assert [x["style"] for x in logged(server)] == [["think"]] * agent.calls


def test_an_empty_reply_then_a_nudge_redoes_the_page_it_was_on(teacher, engine, gold):
    clean, empty = teacher(), teacher(empty_rate=1.0)
    client = openai.OpenAI(base_url=empty.base_url, api_key="k", max_retries=0)
    reply = client.chat.completions.create(model="m", messages=opening(), tools=TOOLS)
    assert reply.choices[0].message.content == "" and not reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "stop"
    # three clean moves (read page 1, submit it, read page 2), then the empty teacher
    agent = Agent(engine, openai_caller(clean), page_size=20)
    for _ in range(3):
        agent.step()
    agent.call = openai_caller(empty)
    agent.step()  # instead of submitting page 2: nothing, then a nudge
    assert not agent.turns[-1][0]["content"] and agent.nudges == 1
    agent.step()  # it reads page 2 again: not from the start, not past it
    query = json.loads(agent.turns[-1][0]["tool_calls"][0]["function"]["arguments"])["query"]
    assert query.endswith(f"WHERE id > {list(gold)[19]} ORDER BY id LIMIT 20")
    assert [(x["misuse"] or {}).get("kind") for x in logged(empty)] == [
        "empty", "empty", None]
    # memory kept only the silence and the nudge: the id the nudge names
    nudged = [{"role": "assistant", "content": ""}, {"role": "user", "content":
              "160 rows of your slice have no accepted label yet (read on after id 57). "
              "Continue with the sql tool and label them."}]
    _, calls = openai_caller(clean)(opening() + nudged)
    assert json.loads(calls[0][2])["query"].endswith("WHERE id > 57 ORDER BY id LIMIT 25")
    # on the Anthropic route: no content blocks at all, end_turn
    system, msgs = to_anthropic(opening())
    message = anthropic.Anthropic(base_url=empty.url, api_key="k").messages.create(
        model="m", max_tokens=64, system=system, messages=msgs)
    assert message.content == [] and message.stop_reason == "end_turn"
    # and a whole run at a high rate still labels every row
    agent = Agent(engine, openai_caller(teacher(empty_rate=0.3, seed=4)), page_size=20,
                  keep_last=2).run(max_calls=150)
    assert agent.accepted == gold and agent.nudges > 0 and agent.rejected["duplicate"] == 0


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


@pytest.mark.parametrize("sdk, strip_fences", [("openai", False), ("openai", True),
                                               ("anthropic", False)])
def test_a_realistic_teacher_still_labels_every_row(teacher, engine, gold, sdk, strip_fences):
    server = teacher(profile="realistic", seed=7)
    call = (openai_caller if sdk == "openai" else anthropic_caller)(server)
    agent = Agent(engine, call, page_size=10, keep_last=4,
                  strip_fences=strip_fences).run(max_calls=200)
    assert set(agent.accepted) == set(gold) and agent.done
    wrong = sum(agent.accepted[i] != gold[i] for i in gold)
    assert 5 < wrong < 40  # ≈ error_rate 0.10 of 200
    stats = server.stats()
    assert stats["style:think"] > agent.calls / 4 and stats["style:string_ids"] > 3
    assert sum(v for k, v in stats.items() if k.startswith("style:")) > agent.calls / 2
