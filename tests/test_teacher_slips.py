"""The slips of a cheap hosted model, as the simulated teacher makes them: tool misuse,
malformed arguments and prose; arguments in a ```json fence, string ids, labels in the wrong
case, two calls in one message, <think> first, empty replies; and the realistic profile, under
which an agent still labels every row."""

from __future__ import annotations

import itertools
import json
import random
import re

import anthropic
import openai
import pytest

from agents.teacher.slips import case_variant
from tests.teacher_helpers import (
    LABELS,
    SQL_SCHEMA,
    TOOLS,
    Agent,
    anthropic_caller,
    logged,
    openai_caller,
    opening,
    to_anthropic,
)


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
