"""The simulated teacher's labelling decisions: label noise, drift and bias (and a top-up of
only the wanted labels), paging that survives memory pruned to the pinned messages and the last
turn, and single moves from hand-made conversations (a result cut by the memory, judge
rejections, a correct query that fails)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import sqlalchemy as sa

from tests.teacher_helpers import (
    LABELS,
    Agent,
    anthropic_caller,
    logged,
    openai_caller,
    opening,
)


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
