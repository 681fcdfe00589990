"""The simulated teacher's other roles, as structured output over both SDKs: the judge's
verdicts, preference pairs, the tuner's configs; and the skills those roles follow."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from agents.skills import load_skill
from tests.teacher_helpers import LABELS, logged


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


# ── the roles' skills ──────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("name, contract", [
    ("review-examples", '{"verdicts": [{"row_id"'),
    ("write-preference-pairs", '{"pairs": [{"row_id"'),
    ("propose-training-config", '{"configs": ['),
])
def test_role_skills_load(name, contract):
    skill = load_skill(name)
    assert skill.name == name and "Use when" in skill.description
    assert contract in skill.instructions and "## Output contract" in skill.instructions
