"""AgentMemory: the budget holds, pins stay first, turns stay whole, importance counts."""

from __future__ import annotations

import json
import random

import pytest

from agents.memory import MARKER, AgentMemory, MemoryBudgetError, approx_tokens

LABELS = ["business", "entertainment", "politics", "sports", "tech"]
WORDS = ("the", "market", "rose", "as", "ministers", "met", "fans", "cheered", "a", "new",
         "phone", "launched", "in", "london")


def pins() -> list[dict]:
    system = {"role": "system", "content": "# Label the rows of your slice\n" + "rule. " * 600}
    user = {"role": "user", "content": "<slice>" + json.dumps({"slice_id": "region=asia",
                                                               "rows": 1000}) + "</slice>"}
    return [system, user]


def sql_turn(k: int, rng: random.Random, n: int = 25) -> tuple[list[dict], str]:
    """One page: an sql call and its n rows of long article text (25: ~4k tokens)."""
    rows = [{"id": 25 * k + i, "title": f"title {i}",
             "body": " ".join(rng.choice(WORDS) for _ in range(rng.randint(80, 160)))}
            for i in range(n)]
    cid = f"call_sql_{k}"
    query = f"SELECT id, title, body FROM articles ORDER BY id LIMIT 25 OFFSET {25 * k}"
    return [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": cid, "type": "function",
            "function": {"name": "sql", "arguments": json.dumps({"query": query})}}]},
        {"role": "tool", "tool_call_id": cid,
         "content": json.dumps({"rows": rows, "row_count": 25, "truncated": False})},
    ], f"read rows {25 * k + 1}-{25 * k + 25}"


def submit_turn(k: int, rng: random.Random) -> tuple[list[dict], str]:
    """The page's labels in one submit call (sometimes split in two calls)."""
    examples = [{"row_id": 25 * k + i, "label": rng.choice(LABELS)} for i in range(25)]
    parts = [examples] if k % 3 else [examples[:12], examples[12:]]
    assistant = {"role": "assistant", "content": "Submitting this page.", "tool_calls": []}
    results = []
    for j, part in enumerate(parts):
        cid = f"call_submit_{k}_{j}"
        assistant["tool_calls"].append({"id": cid, "type": "function", "function": {
            "name": "submit_examples", "arguments": json.dumps({"examples": part})}})
        results.append({"role": "tool", "tool_call_id": cid,
                        "content": json.dumps({"accepted": len(part) - 1, "rejected": [
                            {"row_id": part[0]["row_id"], "reason": "label_not_in_set",
                             "message": "use one of the labels"}]})})
    return [assistant, *results], f"submitted 25 ({25 - len(parts)} accepted)"


def check_pairs(msgs: list[dict]) -> None:
    """Every tool result follows its call, and every call has its result."""
    declared: set[str] = set()
    answered: set[str] = set()
    for m in msgs:
        for c in m.get("tool_calls") or []:
            declared.add(c["id"])
        if m["role"] == "tool":
            assert m["tool_call_id"] in declared, "tool result without its tool_use"
            answered.add(m["tool_call_id"])
    assert declared == answered, "tool_use without its tool_result"


def test_approx_tokens():
    assert approx_tokens("abcd" * 10) == 10
    assert approx_tokens({"role": "user", "content": "abcd" * 10}) == 14
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "x", "type": "function", "function": {"name": "sql", "arguments": "a" * 9}}]}
    assert approx_tokens(call) == 3 + 4  # (3 + 9) / 4 + overhead
    assert approx_tokens([call, call]) == 14


def test_thousand_turns_stay_within_budget():
    rng = random.Random(7)
    budget = 12_000
    memory = AgentMemory(budget)
    pinned = pins()
    for p in pinned:
        memory.pin(p)
    for k in range(500):
        page = sql_turn(k, rng, n=100 if k % 97 == 0 else 25)  # now and then, too big
        for turn, note in (page, submit_turn(k, rng)):
            memory.add_turn(turn, note=note)
            msgs = memory.messages()
            assert sum(approx_tokens(m) for m in msgs) <= budget
            assert msgs[:2] == pinned  # first, intact
            summary = msgs[2]
            if memory.pruned_turns:
                assert summary["role"] == "user" and summary["content"].startswith("[memory]")
                assert approx_tokens(summary) <= memory.summary_tokens
                assert sum(m["content"].startswith("[memory]") for m in msgs
                           if m["role"] == "user") == 1
            # the newest turn is present (its tool contents maybe cut, ids intact)
            tail = msgs[-len(turn):]
            assert [m.get("tool_call_id") for m in tail] == [m.get("tool_call_id") for m in turn]
            assert tail[0]["tool_calls"] == turn[0]["tool_calls"]
            check_pairs(msgs)
    stats = memory.stats()
    assert stats["turns_added"] == 1000
    assert memory.pruned_turns == 1000 - stats["turns_kept"] > 900
    assert memory.max_tokens_seen <= budget
    assert stats["cut_renders"] == 6  # the six 100-row pages, each cut once while newest
    assert "tool calls: sql 4" in summary["content"]  # counts kept even when detail is dropped
    assert "read rows 12476-12500" not in summary["content"]  # the newest is not pruned


def test_newest_turn_too_big_is_cut_with_a_marker():
    memory = AgentMemory(2_000)
    for p in pins()[1:]:
        memory.pin(p)
    turn, note = sql_turn(0, random.Random(1))  # ~5k tokens of rows
    memory.add_turn(turn, note=note)
    msgs = memory.messages()
    assert sum(approx_tokens(m) for m in msgs) <= 2_000
    assert "…[memory: cut " in msgs[-1]["content"]
    assert msgs[-1]["content"].startswith(turn[1]["content"][:500])  # the head is kept
    assert MARKER.split("{")[0] in msgs[-1]["content"]
    assert memory.stats()["cut_renders"] == 1
    check_pairs(msgs)
    # a small next turn evicts the big one whole, and nothing is cut any more
    small = [{"role": "assistant", "content": "done"}]
    memory.add_turn(small, note="said done")
    msgs = memory.messages()
    assert msgs[-1] == small[0] and "read rows 1-25" in msgs[1]["content"]
    assert memory.stats()["cut_renders"] == 1


def test_importance_outlives_low_importance_turns_of_similar_age():
    memory = AgentMemory(3_000)
    memory.pin({"role": "system", "content": "skill " * 100})

    def turn(k):
        cid = f"c{k}"
        return [{"role": "assistant", "content": None, "tool_calls": [
            {"id": cid, "type": "function", "function": {"name": "sql", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": cid, "content": f"page {k} " + "x" * 3000}]

    for k in range(10):
        memory.add_turn(turn(k), importance=4.0 if k == 3 else 1.0, note=f"page {k}")
    kept = {m["tool_call_id"] for m in memory.messages() if m["role"] == "tool"}
    assert kept == {"c3", "c8", "c9"}  # c3 is worth 2 * half_life turns of recency
    note = memory.messages()[1]["content"]
    assert "page 0; page 1; page 2; page 4; page 5; page 6; page 7." in note
    # and it goes once it is old enough: importance 4 buys 16 turns, not forever
    for k in range(10, 40):
        memory.add_turn(turn(k))
    assert "c3" not in {m["tool_call_id"] for m in memory.messages() if m["role"] == "tool"}


def test_zero_importance_goes_first_and_ties_go_oldest_first():
    memory = AgentMemory(1_000)
    memory.pin({"role": "system", "content": "s"})
    turns = [[{"role": "assistant", "content": f"t{k} " + "y" * 1400}] for k in range(4)]

    def kept():
        return [m["content"][:2] for m in memory.messages() if m["role"] == "assistant"]

    memory.add_turn(turns[0])
    memory.add_turn(turns[1], importance=0)
    memory.add_turn(turns[2])
    assert kept() == ["t0", "t2"]  # t1 (importance 0) went before the older t0
    memory.add_turn(turns[3])
    assert kept() == ["t2", "t3"]


def test_summary_note_is_bounded_and_aggregates_notes():
    memory = AgentMemory(2_000)
    memory.pin({"role": "system", "content": "spec"})
    for k in range(300):
        memory.add_turn([{"role": "assistant", "content": "z" * 2400}],
                        note="read rows" if k % 10 < 5 else f"submitted 25 ({k} accepted)")
    msgs = memory.messages()
    note = msgs[1]["content"]
    assert memory.pruned_turns == 300 - memory.stats()["turns_kept"]
    assert note.startswith(f"[memory] {memory.pruned_turns} earlier turns pruned")
    assert approx_tokens(msgs[1]) <= memory.summary_tokens
    assert "older without detail" in note and "submitted 25 (297 accepted)." in note
    assert "read rows ×5" in note  # consecutive equal digests are collapsed
    assert note.index("older without detail") < note.index("(295 accepted)")  # oldest first


def test_reset_reanchors():
    memory = AgentMemory(4_000)
    pinned = pins()
    for p in pinned:
        memory.pin(p)
    rng = random.Random(3)
    for k in range(6):
        memory.add_turn(sql_turn(k, rng)[0], note=f"page {k}")
    assert memory.pruned_turns > 0
    memory.reset("Re-anchored after drift: 14 of 40 rejected; rows 1-150 done.")
    msgs = memory.messages()
    assert msgs[:2] == pinned and len(msgs) == 3
    assert msgs[2] == {"role": "user", "content":
                       "[memory] Re-anchored after drift: 14 of 40 rejected; rows 1-150 done."}
    assert memory.stats()["resets"] == 1 and memory.stats()["turns_kept"] == 0
    for k in range(6, 12):
        memory.add_turn(sql_turn(k, rng)[0], note=f"page {k}")
    note = memory.messages()[2]["content"]
    assert note.startswith("[memory] Re-anchored after drift") and "Since then, " in note
    assert "page 6" in note and "page 0" not in note


def test_budget_errors_and_bad_turns():
    memory = AgentMemory(1_000)
    with pytest.raises(MemoryBudgetError, match="pinned messages take"):
        memory.pin({"role": "system", "content": "x" * 4_000})
    assert memory.messages() == []  # the refused pin left nothing behind
    memory.pin({"role": "system", "content": "x" * 1_000})
    with pytest.raises(ValueError, match="answers no earlier tool_call"):
        memory.add_turn([{"role": "tool", "tool_call_id": "a", "content": "{}"}])
    with pytest.raises(ValueError, match="without a tool result"):
        memory.add_turn([{"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "sql", "arguments": "{}"}}]}])
    with pytest.raises(ValueError, match="pin system prompts"):
        memory.add_turn([{"role": "system", "content": "late"}])
    with pytest.raises(ValueError, match="importance"):
        memory.add_turn([{"role": "assistant", "content": "x"}], importance=-1)
    with pytest.raises(ValueError, match="budget_tokens"):
        AgentMemory(0)


def test_huge_arguments_are_cut_too_and_memory_is_deterministic():
    def build():
        memory = AgentMemory(800)
        memory.pin({"role": "system", "content": "s" * 1000})
        big = json.dumps({"examples": [{"row_id": i, "label": "tech"} for i in range(100)]})
        memory.add_turn([
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "a", "type": "function",
                 "function": {"name": "submit_examples", "arguments": big}}]},
            {"role": "tool", "tool_call_id": "a", "content": "r" * 3000}])
        return memory.messages()

    msgs = build()
    assert sum(approx_tokens(m) for m in msgs) <= 800
    args = json.loads(msgs[-2]["tool_calls"][0]["function"]["arguments"])  # still valid JSON
    assert args == {"_memory": "arguments cut (3304 chars)"} or "examples" in args
    check_pairs(msgs)
    assert build() == msgs
