"""The support-tickets extraction example: its warehouse builder and its spec.

The builder must be deterministic, every gold record must be valid against the spec's
answer_schema (so the gate would accept the gold itself), and every value a gold record holds
must be stated by its ticket (so an honest agent can extract it from the allow-listed body)."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from agents.answers import JsonAnswer
from agents.skills import load_skill
from examples.support_tickets.build_warehouse import COLOURS, FIELDS, ISSUES, NOUNS, build
from flows.spec import load_spec

HERE = Path(__file__).resolve().parent.parent / "examples" / "support_tickets"
SPEC = HERE / "spec.yaml"
ROWS = 150

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# How a ticket says each issue, written apart from the builder's phrases.
ISSUE_WORDS = {
    "damaged": r"(?i)\b(damaged|broken|cracked|dented|smashed)\b",
    "late": r"(?i)\b(late|overdue|not arrived|never came|waiting)\b",
    "wrong_item": r"(?i)(wrong item|instead|not what I ordered|never ordered|someone else's)",
    "refund": r"(?i)\b(refund|money back)\b",
}
URGENCY = re.compile(r"(?i)\b(urgent|asap|immediately|right away)\b")
ORDER_ID = re.compile(r"\b[A-Z]-\d{5}\b")


def read(url: str) -> list[dict]:
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM tickets ORDER BY id")]
    finally:
        conn.close()


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPEC)


@pytest.fixture(scope="module")
def tickets(tmp_path_factory) -> list[dict]:
    url = build(tmp_path_factory.mktemp("tickets") / "warehouse.db", rows=ROWS)
    return read(url)


def test_the_table_has_the_rows_and_columns_the_spec_names(tickets, spec):
    assert [t["id"] for t in tickets] == list(range(1, ROWS + 1))
    assert set(tickets[0]) == {"id", "channel", "body", "record"}
    allowed = spec.warehouse.tables[spec.slicing.table]
    assert set(allowed) == {"id", "channel", "body"}
    assert spec.task.gold_column == "record" and "record" not in allowed
    assert {t["channel"] for t in tickets} == {"email", "chat", "web_form", "phone", "social"}


def test_every_gold_record_is_valid_against_the_answer_schema(tickets, spec):
    schema = spec.task.answer_schema
    validator = jsonschema.Draft202012Validator(schema)
    rule = JsonAnswer(schema)  # the gate's own rule accepts the gold, as text and as an object
    for t in tickets:
        record = json.loads(t["record"])
        assert list(record) == list(FIELDS), t
        assert not list(validator.iter_errors(record)), t
        assert rule.check(record, row_id=t["id"]).ok and rule.check(t["record"]).ok, t


def test_each_ticket_states_every_value_of_its_record(tickets):
    for t in tickets:
        body, record = t["body"], json.loads(t["record"])
        if record["order_id"] is None:
            assert not ORDER_ID.search(body), t
        else:
            assert record["order_id"] in body, t
        products = {f"{c} {n}" for c in COLOURS for n in NOUNS}
        if record["product"] is None:
            assert not any(p in body for p in products), t
        else:
            assert record["product"] in body, t
        if record["quantity"] is not None:
            q = record["quantity"]
            assert re.search(rf"\b({q}|{NUMBER_WORDS[q]})\b", body), t
        said = [issue for issue, words in ISSUE_WORDS.items() if re.search(words, body)]
        assert said == [record["issue"]], t
        assert bool(URGENCY.search(body)) is record["urgent"], t


def test_the_records_vary_and_some_fields_are_missing(tickets):
    records = [json.loads(t["record"]) for t in tickets]
    assert {r["issue"] for r in records} == set(ISSUES)
    assert {r["urgent"] for r in records} == {True, False}
    for field in ("order_id", "product", "quantity"):
        missing = sum(r[field] is None for r in records)
        assert 0 < missing < len(records) / 2, field
    assert len({r["product"] for r in records}) > 40
    assert len({r["order_id"] for r in records}) > 100
    assert len({t["body"] for t in tickets}) == len(tickets)


def test_builds_are_deterministic_and_a_smaller_build_is_a_prefix(tmp_path, tickets):
    again = read(build(tmp_path / "again.db", rows=ROWS))
    assert again == tickets
    rebuilt = read(build(tmp_path / "again.db", rows=ROWS))  # replaces, never appends
    assert rebuilt == tickets
    assert read(build(tmp_path / "small.db", rows=20)) == tickets[:20]
    assert read(build(tmp_path / "other.db", rows=20, seed=1)) != tickets[:20]


def test_the_command_line_builds_the_file(tmp_path):
    out = tmp_path / "cli.db"
    done = subprocess.run([sys.executable, str(HERE / "build_warehouse.py"), "--rows", "12",
                           "--out", str(out)], capture_output=True, text=True, check=True)
    assert "12 tickets" in done.stdout
    assert len(read(f"sqlite:///{out}")) == 12


def test_the_spec_is_an_extraction_task_with_its_skill(spec, tickets):
    task = spec.task
    assert task.kind == "extraction" and task.skill == "extract-records"
    assert load_skill(task.skill).name == "extract-records"
    schema = task.answer_schema
    assert schema["required"] == list(FIELDS) and schema["additionalProperties"] is False
    assert schema["properties"]["issue"]["enum"] == list(ISSUES)
    assert task.template_columns() == ["body"]
    assert task.prompt_template.format(**tickets[0]).startswith("Ticket: ")
    assert task.completion_template.format(answer="{}") == " {}"
    assert spec.slicing.column == "channel" and spec.slicing.max_rows_per_slice == 60
    assert spec.evaluation.promotion.metric == "field_f1"
    assert spec.tracking.registered_model == "support-tickets-extractor"
    assert not spec.dpo.enabled and not spec.tuning.enabled
