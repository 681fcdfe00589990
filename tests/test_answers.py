"""The answer rules of each task kind (agents/answers.py), alone and through the gate: every
rule rejected with its reason and a message the agent can act on, JSON Schema violations
caught, and the classification rule as the gate always applied it."""

from __future__ import annotations

import json

import jsonschema
import pytest

from agents.agent_tools import tool_specs
from agents.answers import (
    COPIES_PROMPT,
    EMPTY_ANSWER,
    FORBIDDEN_PATTERN,
    INVALID_JSON,
    LABEL_NOT_IN_SET,
    MISSING_PATTERN,
    SCHEMA_VIOLATION,
    TOO_LONG,
    TOO_SHORT,
    JsonAnswer,
    LabelAnswer,
    TextAnswer,
)
from agents.gates import DUPLICATE, INVALID_SCHEMA, ROW_NOT_IN_SLICE, Gate

BODY = ("Shares in the carmaker rose sharply on Monday after it reported record quarterly "
        "profits, beating the forecasts of every analyst polled by the agency.")
ROWS = {"1": {"id": 1, "body": BODY}, "2": {"id": 2, "body": "Another article entirely."}}
HEADLINE = TextAnswer(min_words=3, max_words=12, max_chars=90, forbidden=(r"(?i)click here",),
                      required=(r"[A-Za-z]",))
RECORD = {"type": "object", "additionalProperties": False, "required": ["company", "change"],
          "properties": {"company": {"type": "string", "minLength": 1},
                         "change": {"enum": ["up", "down", "flat"]},
                         "percent": {"type": "number", "minimum": 0}}}


def lookup(ids):
    return {str(i): ROWS[str(i)] for i in ids if str(i) in ROWS}


# ── the rules alone ─────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize(("answer", "reason", "says"), [
    ("", EMPTY_ANSWER, "is empty"),
    ("   ", EMPTY_ANSWER, "is empty"),
    ("Profits soar", TOO_SHORT, "has 2 words; it needs at least 3"),
    (" ".join(["word"] * 13), TOO_LONG, "has 13 words; at most 12"),
    ("Carmaker shares jump on record profits " + "x" * 60, TOO_LONG,
     "characters; at most 90 are allowed"),
    ("Carmaker profits: click HERE for more", FORBIDDEN_PATTERN, "contains 'click HERE'"),
    ("1234 5678 9012", MISSING_PATTERN, "must match /[A-Za-z]/"),
])
def test_each_text_rule_rejects_with_its_message(answer, reason, says):
    verdict = HEADLINE.check(answer, row_id=7)
    assert not verdict.ok and verdict.reason == reason
    assert verdict.message.startswith("row 7: ") and says in verdict.message


def test_a_text_answer_that_copies_the_prompt_is_refused_and_one_that_does_not_is_kept():
    rule = TextAnswer(max_words=40)
    copied = rule.check("Shares in the carmaker rose sharply on Monday after it reported record",
                        prompt=f"Write a headline for: {BODY}")
    assert copied.reason == COPIES_PROMPT and "your own words" in copied.message
    kept = rule.check("  Carmaker shares jump after record quarterly profits ",
                      prompt=f"Write a headline for: {BODY}")
    assert kept.ok and kept.answer == "Carmaker shares jump after record quarterly profits"


def test_bad_patterns_and_bad_schemas_fail_when_the_rule_is_made():
    with pytest.raises(Exception, match="unterminated|missing"):
        TextAnswer(forbidden=("(unclosed",))
    with pytest.raises(jsonschema.SchemaError):
        JsonAnswer({"type": "objekt"})


@pytest.mark.parametrize(("answer", "reason", "says"), [
    ('{"company": "Acme", "change": "up"', INVALID_JSON, "not valid JSON"),
    ({"company": "Acme"}, SCHEMA_VIOLATION, "'change' is a required property"),
    ({"company": "Acme", "change": "sideways"}, SCHEMA_VIOLATION,
     "change: 'sideways' is not one of ['up', 'down', 'flat']"),
    ({"company": "Acme", "change": "up", "percent": -3}, SCHEMA_VIOLATION,
     "percent: -3 is less than the minimum of 0"),
    ({"company": "", "change": "up", "ceo": "X"}, SCHEMA_VIOLATION, "company: '' should be non-empty"),
    ([1, 2], SCHEMA_VIOLATION, "(top level): [1, 2] is not of type 'object'"),
])
def test_json_schema_violations_are_caught_with_the_field_that_breaks(answer, reason, says):
    verdict = JsonAnswer(RECORD).check(answer, row_id="a-1")
    assert not verdict.ok and verdict.reason == reason
    assert verdict.message.startswith("row 'a-1': ") and says in verdict.message


def test_a_valid_record_is_kept_parsed_whether_sent_as_an_object_or_as_json_text():
    rule = JsonAnswer(RECORD)
    record = {"company": "Acme", "change": "up", "percent": 4.5}
    assert rule.check(record).answer == record
    assert rule.check(json.dumps(record)).answer == record


def test_the_label_rule_is_the_classification_gate_as_it_always_was():
    rule = LabelAnswer(["business", "tech", "Tech2"])
    assert rule.check("tech").ok and not rule.check("tech").normalised
    fixed = rule.check(" Tech ")
    assert fixed.ok and fixed.answer == "tech" and fixed.normalised
    bad = rule.check("sport", row_id=3)
    assert bad.reason == LABEL_NOT_IN_SET
    assert bad.message == ("label 'sport' is not one of: business, tech, Tech2; resubmit row 3 "
                           "with one of these, spelled exactly")
    ambiguous = LabelAnswer(["tech", "TECH"]).check("Tech")
    assert ambiguous.reason == LABEL_NOT_IN_SET  # two labels fold alike: no guess


# ── through the gate ────────────────────────────────────────────────────────────────────────
def test_the_gate_checks_shape_then_rule_then_row_then_the_prompt_copy():
    gate = Gate(HEADLINE, prompt_of=lambda row: f"Write a headline for: {row['body']}")
    verdicts = gate.check_batch([
        {"row_id": 1, "label": "Carmaker profits"},             # the classification shape
        {"row_id": 1, "response": "Profits soar"},              # too short
        {"row_id": 9, "response": "Carmaker shares jump after record profits"},  # not in slice
        {"row_id": 1, "response": "Shares in the carmaker rose sharply on Monday after it"},
        {"row_id": 1, "response": "Carmaker shares jump after record profits"},
        {"row_id": 1, "response": "Record profits lift carmaker shares"},  # row already done
    ], lookup)
    assert [v.reason for v in verdicts] == [INVALID_SCHEMA, TOO_SHORT, ROW_NOT_IN_SLICE,
                                           COPIES_PROMPT, None, DUPLICATE]
    assert '"response": <answer>' in verdicts[0].message
    assert verdicts[4].ok and verdicts[4].answer == "Carmaker shares jump after record profits"
    assert verdicts[4].row == ROWS["1"]


def test_the_gate_keeps_an_extraction_answer_as_an_object_and_as_json_text():
    gate = Gate(JsonAnswer(RECORD))
    ok, bad = gate.check_batch([
        {"row_id": 1, "response": {"company": "Acme", "change": "up"}},
        {"row_id": 2, "response": "{\"company\": \"Acme\"}"},
    ], lookup)
    assert ok.ok and ok.answer == {"company": "Acme", "change": "up"}
    assert json.loads(ok.label) == ok.answer  # the text the store and the events hold
    assert bad.reason == SCHEMA_VIOLATION and "'change' is a required property" in bad.message


def test_the_submit_tool_offers_the_kinds_answer_schema():
    labels = tool_specs("articles", LabelAnswer(["a", "b"]))[1]["function"]
    item = labels["parameters"]["properties"]["examples"]["items"]
    assert item["properties"]["label"] == {"type": "string", "enum": ["a", "b"]}
    assert item["required"] == ["row_id", "label"]
    records = tool_specs("articles", JsonAnswer(RECORD))[1]["function"]
    item = records["parameters"]["properties"]["examples"]["items"]
    assert item["properties"]["response"] == RECORD and item["required"] == ["row_id", "response"]
    text = tool_specs("articles", HEADLINE)[1]["function"]
    assert text["parameters"]["properties"]["examples"]["items"]["properties"]["response"] == {
        "type": "string", "maxLength": 90}
