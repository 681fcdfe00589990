"""Sub-agents end to end: the real `openai` SDK over HTTP against a started simulated
teacher, a real SQLite warehouse of BBC articles, the real skill file."""

from __future__ import annotations

import json
from collections import Counter

import httpx
import httpx2
import pytest
import sqlalchemy as sa

from agents.agent_types import AgentConfig
from agents.answers import LabelAnswer
from agents.drift import DriftMonitor, DriftPolicy, DriftSettings
from agents.gates import Gate
from agents.gateway import LLMGateway, MemoryCache
from agents.judge import Judge
from agents.ledger import CostLedger
from agents.loop import run_agent
from agents.provider_factory import make_openai_client, make_provider
from agents.ratelimit import AdaptiveLimiter
from agents.skills import Skill, SkillError, load_skill
from agents.sql_tool import ScopedTable, SQLTool
from agents.teacher import FINGERPRINT, TeacherConfig, TeacherKnobs, TeacherServer

LABELS = ["business", "entertainment", "politics", "sports", "tech"]
COLUMNS = ["id", "title", "body", "published_at", "region", "word_count"]
REGION, PAGE = "europe", 10


@pytest.fixture(scope="module")
def gold(engine) -> dict[int, str]:
    """id -> topic for the slice under test (what the teacher answers from)."""
    with engine.connect() as conn:
        q = sa.text("SELECT id, topic FROM articles WHERE region = :r ORDER BY id")
        return dict(conn.execute(q, {"r": REGION}).all())


def make_teacher(url: str, **kw) -> TeacherServer:
    kw = {"error_rate": 0.0, "off_spec_rate": 0.0, **kw}
    return TeacherServer(TeacherConfig(url, "articles", "id", "topic", LABELS, **kw))


def base_url(teacher: TeacherServer, api: str) -> str:
    """openai's base URL ends in /v1; anthropic's is the server root."""
    return teacher.base_url if api == "openai" else teacher.url


def run(url: str | None, engine, *, api="openai", api_key="test-key", max_turns=40,
        provider=None, memory=16000, judge=None, drift=None, sample=0.0, retries=0,
        nudges=2, whole_table=False):
    """Run one agent over the europe slice (or every row); return (result, examples, calls)."""
    where = ("SELECT * FROM articles WHERE region = :r OR :r = :r" if whole_table
             else "SELECT * FROM articles WHERE region = :r")
    scoped = ScopedTable("articles", COLUMNS, where, {"r": REGION}, "id")
    tool = SQLTool(engine, scoped, row_limit=200)
    examples, calls = [], []
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT count(*) FROM ({where}) s"),
                            {"r": REGION}).scalar_one()
    provider = provider or make_provider(api, base_url=url, api_key=api_key, timeout=10)
    gateway = LLMGateway(provider, role="generator", cache=MemoryCache(), ledger=CostLedger(),
                         limiter=AdaptiveLimiter(), on_call=calls.append, max_retries=retries,
                         backoff_base=0.01)
    result = run_agent(
        gateway,
        config=AgentConfig(model="simulated-teacher", max_turns=max_turns,
                           memory_budget_tokens=memory, judge_sample_rate=sample,
                           max_nudges=nudges),
        skill=load_skill("label-examples"),
        task={"description": "Label a BBC News article with its topic.", "labels": LABELS,
              "slice_id": f"region={REGION}", "rows": rows, "page_size": PAGE},
        sql_tool=tool, gate=Gate(LabelAnswer(LABELS)), row_lookup=tool.lookup_row,
        on_example=examples.append, agent_name="agent-europe", slice_id=f"region={REGION}",
        judge=judge, drift=drift,
    )
    return result, examples, calls


@pytest.fixture(params=["openai", "anthropic"])
def api(request) -> str:
    """Every agent test runs through both official SDKs and wire formats."""
    return request.param


# ── the agent loop against the simulated teacher, through both SDKs ─────────────────────────
def test_every_row_gets_its_gold_label(small_warehouse_url, engine, gold, tmp_path, api):
    log = tmp_path / "requests.jsonl"
    with make_teacher(small_warehouse_url, request_log=str(log)) as teacher:
        result, examples, calls = run(base_url(teacher, api), engine, api=api)

    accepted = [e for e in examples if e["status"] == "accepted"]
    assert Counter(e["row_id"] for e in accepted) == Counter(list(gold))  # each row once
    assert all(e["label"] == gold[e["row_id"]] for e in accepted)
    assert all(e["row"]["id"] == e["row_id"] and "topic" not in e["row"] for e in accepted)
    assert result.accepted == len(gold) and result.rejected == {} and result.tool_errors == 0
    assert result.stopped_reason == "completed"

    # each page read then submitted, then a plain "done" message; every call recorded
    pages = -(-len(gold) // PAGE)
    assert result.calls == len(calls) >= 2 * pages + 1
    assert all(c["status"] == "ok" and c["error"] is None and not c["cached"] for c in calls)
    assert all(c["input_tokens"] > 0 and c["output_tokens"] > 0 for c in calls)
    assert all(c["api"] == api and c["role"] == "generator" for c in calls)
    assert all(c["cost_usd"] > 0 for c in calls)  # simulated-teacher is priced as MiniMax

    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(logged) == len(calls) and {x["api"] for x in logged} == {api}
    assert all(x["pinned_present"] for x in logged)


def test_off_spec_labels_are_rejected_then_corrected(small_warehouse_url, engine, gold, api):
    with make_teacher(small_warehouse_url, off_spec_rate=0.3, error_rate=0.3, seed=7) as teacher:
        result, examples, _ = run(base_url(teacher, api), engine, api=api)

    rejected = [e for e in examples if e["status"] == "rejected"]
    accepted = {e["row_id"]: e["label"] for e in examples if e["status"] == "accepted"}
    assert rejected and result.rejected == {"label_not_in_set": len(rejected)}
    assert all(e["label"] not in LABELS for e in rejected)
    assert set(accepted) == set(gold) and result.accepted == len(gold)  # nothing lost
    # wrong-but-valid labels pass the gate: some accepted labels differ from gold
    assert all(label in LABELS for label in accepted.values())
    assert any(accepted[i] != gold[i] for i in gold)
    assert result.stopped_reason == "completed"


def test_teacher_noise_is_deterministic(small_warehouse_url, engine, api):
    with make_teacher(small_warehouse_url, off_spec_rate=0.2, error_rate=0.2, seed=3) as t:
        first = run(base_url(t, api), engine, api=api)[1]
        second = run(base_url(t, api), engine, api=api)[1]
    assert first == second


def test_max_turns_is_honoured(small_warehouse_url, engine, api):
    with make_teacher(small_warehouse_url) as teacher:
        result, examples, calls = run(base_url(teacher, api), engine, api=api, max_turns=3)
    assert result.stopped_reason == "max_turns"
    assert result.calls == len(calls) == 3
    assert result.accepted == len(examples) == PAGE  # read, submit, read


def test_small_memory_budget_still_labels_everything(small_warehouse_url, engine, gold, api,
                                                      tmp_path):
    log = tmp_path / "requests.jsonl"
    with make_teacher(small_warehouse_url, request_log=str(log)) as teacher:
        result, examples, _ = run(base_url(teacher, api), engine, api=api, memory=3000)
    accepted = {e["row_id"]: e["label"] for e in examples if e["status"] == "accepted"}
    assert accepted == gold and result.stopped_reason == "completed"
    assert result.pruned_turns > 0 and result.max_context_tokens <= 3000
    assert all(x["pinned_present"] for x in map(json.loads, log.read_text().splitlines()))


def test_faults_are_retried_and_recorded(small_warehouse_url, engine, gold, api):
    knobs = {"fault_429_rate": 0.15, "fault_500_rate": 0.1, "fault_529_rate": 0.1,
             "truncated_rate": 0.1, "retry_after_s": 0.01, "seed": 5}
    with make_teacher(small_warehouse_url, knobs=TeacherKnobs(**knobs)) as teacher:
        result, examples, calls = run(base_url(teacher, api), engine, api=api, retries=3)
    accepted = {e["row_id"]: e["label"] for e in examples if e["status"] == "accepted"}
    assert accepted == gold and result.stopped_reason == "completed"
    errors = [c for c in calls if c["status"] == "error"]
    assert errors and all(c["attempt"] == 1 for c in errors)  # the retry succeeded
    assert len(calls) - len(errors) == result.calls


def test_drift_is_caught_reanchored_then_stopped(small_warehouse_url, engine, gold, api):
    """Noise jumps to 60% after 2 labelling calls on a 200-row slice: the judge sees it, the
    agent is re-anchored, its recent unjudged labels re-reviewed, then stopped; what stays
    accepted is right."""
    knobs = TeacherKnobs(drift_after_calls=2, drift_error_rate=0.6, seed=1)
    with make_teacher(small_warehouse_url, knobs=knobs) as teacher:
        judge_provider = make_provider("anthropic", base_url=teacher.url, api_key="k")
        judge = Judge(LLMGateway(judge_provider, role="judge", cache=MemoryCache()),
                      model="simulated-judge", skill=load_skill("review-examples"),
                      labels=LABELS)
        drift = DriftPolicy(DriftMonitor(DriftSettings(warmup=0, min_observations=5),
                                         horizon=400))
        result, examples, _ = run(base_url(teacher, api), engine, api=api, judge=judge,
                                  drift=drift, sample=0.5, whole_table=True, max_turns=80)
    assert result.reanchors == 1 and result.stopped_reason.startswith("drift:")
    # the re-anchor note resumes after the highest row accepted in the alarmed turn, so the
    # fresh memory never re-reads and resubmits rows it already had accepted
    note = next(e for e in result.transcript if e.get("event") == "reanchor")
    before = [e["row_id"] for e in examples[:next(
        i for i, e in enumerate(examples) if e["status"] == "revoked")]
        if e["status"] == "accepted"]
    assert f'"resume_after_id": {max(before)}' in note["note"]
    assert "duplicate" not in result.rejected
    final: dict = {}
    for e in examples:
        if e["status"] == "accepted":
            final[e["row_id"]] = e["label"]
        elif e["status"] == "revoked":
            final.pop(e["row_id"], None)
    with engine.connect() as conn:
        every = dict(conn.execute(sa.text("SELECT id, topic FROM articles")).all())
    assert final and sum(final[i] == every[i] for i in final) / len(final) >= 0.9
    assert result.rejected.get("judge_disagreed", 0) > 0


def test_wrong_key_is_401_and_ends_the_agent(small_warehouse_url, engine, api):
    with make_teacher(small_warehouse_url, api_key="right-key") as teacher:
        result, examples, calls = run(base_url(teacher, api), engine, api=api,
                                      api_key="wrong-key")
        client = make_openai_client(teacher.base_url, "right-key")
        assert client.models.list().data
        reply = client.chat.completions.create(
            model="any-name", messages=[{"role": "user", "content": "hello"}])
        assert reply.model == "any-name" and reply.system_fingerprint == FINGERPRINT
        no_key = httpx.post(f"{teacher.base_url}/chat/completions", json={})
        assert no_key.status_code == 401
        assert no_key.headers["x-posttrain-simulated"] == "true"
    assert result.stopped_reason.startswith("llm_error: auth")
    assert result.calls == 0 and examples == []
    assert len(calls) == 1 and calls[0]["status"] == "error" and "401" in calls[0]["error"]


def test_an_agent_that_stops_early_is_nudged_on(small_warehouse_url, engine, gold, api):
    """Off-spec prose replies mid-task: the loop tells the agent rows remain."""
    with make_teacher(small_warehouse_url, knobs=TeacherKnobs(prose_rate=0.3, seed=2)) as t:
        result, examples, _ = run(base_url(t, api), engine, api=api, max_turns=80)
    accepted = {e["row_id"] for e in examples if e["status"] == "accepted"}
    assert accepted == set(gold) and result.stopped_reason == "completed"


def test_unreachable_llm_is_recorded_not_dropped(small_warehouse_url, engine, api):
    teacher = make_teacher(small_warehouse_url)
    teacher.start()
    url = base_url(teacher, api)
    teacher.stop()
    result, _, calls = run(url, engine, api=api)
    assert result.stopped_reason.startswith("llm_error: connection")
    assert len(calls) == 1 and calls[0]["status"] == "error"


# ── tool misuse, scripted through the SDK's own HTTP transport ─────────────────────────────
def scripted_provider(replies: list[dict], seen: list[dict]):
    """An OpenAI provider whose HTTP transport answers with `replies` in order."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(json.loads(request.content))
        message = replies[len(seen) - 1]
        return httpx2.Response(200, json={
            "id": f"chatcmpl-{len(seen)}", "object": "chat.completion", "created": 0,
            "model": "scripted", "choices": [{
                "index": 0, "message": {"role": "assistant", **message},
                "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        })

    return make_provider("openai", base_url="http://scripted.invalid/v1", api_key="k",
                         async_http_client=httpx2.AsyncClient(
                             transport=httpx2.MockTransport(handler)))


def tool_call(name: str, arguments: str, i: int = 0) -> dict:
    return {"content": None, "tool_calls": [
        {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": arguments}}]}


def test_tool_misuse_goes_back_as_tool_errors(engine, gold):
    some_id = next(iter(gold))
    with engine.connect() as conn:
        outsider = conn.execute(sa.text("SELECT id FROM articles WHERE region = 'uk'")).scalar()
    replies = [
        tool_call("sql", "{not json"),
        tool_call("sql", json.dumps({"query": "SELECT topic FROM articles"})),
        tool_call("sql", json.dumps({"query": "DELETE FROM articles"})),
        tool_call("sql", json.dumps({"sql": "SELECT 1"})),
        tool_call("drop_table", "{}"),
        tool_call("submit_examples", json.dumps({"examples": [{"row_id": 1}] * 101})),
        tool_call("submit_examples", json.dumps({"examples": [
            {"row_id": some_id, "label": "sport"},
            {"row_id": some_id, "label": gold[some_id]},
            {"row_id": some_id, "label": gold[some_id]},
            {"row_id": outsider, "label": "tech"},
            {"row_id": some_id},
        ]})),
        {"content": "done"},
    ]
    seen: list[dict] = []
    result, examples, calls = run(None, engine, provider=scripted_provider(replies, seen),
                                  nudges=0)

    # it said "done" with one row of 28 labelled: that is not a finished slice
    assert result.stopped_reason == f"unfinished: {len(gold) - 1} of {len(gold)} rows never labelled"
    assert result.calls == len(replies)
    assert result.tool_errors == 6
    assert result.misuse == {"invalid_arguments": 3, "sql_rejected": 2, "unknown_tool": 1}
    answers = [json.loads(m["content"]) for m in seen[-1]["messages"] if m["role"] == "tool"]
    assert [a.get("error") for a in answers[:6]] == [
        "invalid_arguments", "sql_rejected", "sql_rejected", "invalid_arguments",
        "unknown_tool", "invalid_arguments"]
    assert "topic" in answers[1]["message"] and "word_count" in answers[1]["message"]
    verdict = answers[6]
    assert verdict["accepted"] == 1
    assert [r["reason"] for r in verdict["rejected"]] == [
        "label_not_in_set", "duplicate", "row_not_in_slice", "invalid_schema"]
    assert "'sport' is not one of: business, entertainment" in verdict["rejected"][0]["message"]
    assert result.rejected == {"label_not_in_set": 1, "duplicate": 1, "row_not_in_slice": 1,
                               "invalid_schema": 1}
    # gate rejections are reported at once; acceptance waits for the (optional) judge
    assert [e["status"] for e in examples] == ["rejected", "rejected", "rejected", "rejected",
                                               "accepted"]
    # the system prompt pins the skill and the task; the first user message holds <slice>
    system, user = seen[0]["messages"][:2]
    assert "submit_examples" in system["content"] and "business, entertainment" in system["content"]
    block = json.loads(user["content"].split("<slice>")[1].split("</slice>")[0])
    assert block["columns"] == COLUMNS and "topic" not in block["columns"]
    assert block["page_size"] == PAGE and block["rows"] == len(gold)
    assert {t["function"]["name"] for t in seen[0]["tools"]} == {"sql", "submit_examples"}
    assert len(calls) == len(replies) and len({c["request_hash"] for c in calls}) == len(calls)


# ── the gate and the skill loader on their own ─────────────────────────────────────────────
def test_gate_reasons_and_messages():
    rows = {1: {"id": 1}, 2: {"id": 2}}
    gate = Gate(LabelAnswer(LABELS))
    lookup = rows.get
    assert gate.check({"row_id": 1, "label": "tech"}, lookup).ok
    assert gate.check({"row_id": 1, "label": "tech"}, lookup).reason == "duplicate"
    assert gate.check({"row_id": 3, "label": "tech"}, lookup).reason == "row_not_in_slice"
    bad = gate.check({"row_id": 2, "label": "world"}, lookup)
    assert (bad.ok, bad.reason) == (False, "label_not_in_set")
    assert "'world' is not one of: business, entertainment, politics, sports, tech" in bad.message
    for item in ({"row_id": 2}, {"row_id": 2, "label": 5}, {"row_id": True, "label": "tech"},
                 {"row_id": 2, "label": "tech", "why": "x"}, "2:tech", None):
        assert gate.check(item, lookup).reason == "invalid_schema"
    ok = gate.check({"row_id": 2, "label": "sports"}, lookup)
    assert ok.ok and ok.row == {"id": 2} and gate.accepted_count == 2


def test_load_default_skill():
    skill = load_skill("label-examples")
    assert isinstance(skill, Skill) and skill.name == "label-examples"
    assert skill.description and "submit_examples" in skill.instructions
    assert len(skill.version) == 12 and not skill.instructions.startswith("---")


@pytest.mark.parametrize(
    "folder, text, says",
    [
        ("my-skill", "---\ndescription: d\n---\nbody", "'name' is missing or blank"),
        ("my-skill", "---\nname: my-skill\ndescription: '  '\n---\nbody", "'description'"),
        ("my-skill", "---\nname: other-skill\ndescription: d\n---\nbody", "does not match"),
        ("my-skill", "---\nname: My_Skill\ndescription: d\n---\nbody", "kebab-case"),
        ("my-skill", "no front matter", "front matter"),
        ("my-skill", "---\nname: my-skill\n", "not closed"),
        ("my-skill", "---\nname: my-skill\ndescription: d\n---\n", "no instructions"),
    ],
)
def test_skill_front_matter_is_validated(tmp_path, folder, text, says):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "SKILL.md").write_text(text)
    with pytest.raises(SkillError, match=says):
        load_skill(folder, tmp_path)


def test_unknown_or_unsafe_skill_names(tmp_path):
    with pytest.raises(SkillError, match="not found.*label-examples"):
        load_skill("no-such-skill")
    with pytest.raises(SkillError, match="kebab-case"):
        load_skill("../label-examples")
